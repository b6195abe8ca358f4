"""Offline speech synthesis with espeak-ng, loaded through the ``espeakng-loader`` wheel.

The wheel ships ``libespeak-ng`` and its voice data, so no system install or network is needed. The library
is driven through ctypes in synchronous mode: ``espeak_Synth`` blocks and hands 16-bit samples to a callback.

espeak-ng keeps synthesis state in C statics that survive ``espeak_Terminate`` (pitch-flutter phase, gain
control, cycle counters) and seeds its breath noise from the clock, so the same text comes out different on
every call. To make :func:`synthesize` a pure function of its arguments, each call loads the library afresh,
seeds its noise generator, and unloads it again (about 5 ms of overhead). If something else in the process
holds the same library open, the unload is a no-op and outputs are no longer bit-reproducible.
"""

from __future__ import annotations

import _ctypes
import ctypes
import threading

import librosa
import numpy as np

# Base English voices (espeak-ng-data/lang/gmw) and timbre variants (espeak-ng-data/voices/!v) in the wheel.
ENGLISH_VOICES: tuple[str, ...] = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
VOICE_VARIANTS: tuple[str, ...] = ("", "+m1", "+m3", "+m7", "+f1", "+f2", "+f4", "+f5")
PITCHES: tuple[int, ...] = (35, 50, 65)
RATES_WPM: tuple[int, ...] = (140, 175, 210)

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_EE_OK = 0
_NOISE_SEED = 12345

_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()
_paths: dict[str, str] = {}  # library and data paths, resolved on first use


def _resolve_paths() -> dict[str, str]:
    if not _paths:
        try:
            import espeakng_loader
        except ImportError as error:
            raise RuntimeError("espeak-ng unavailable: install the 'espeakng-loader' package") from error
        _paths.update(library=espeakng_loader.get_library_path(), data=espeakng_loader.get_data_path())
    return _paths


def _load_library(path: str) -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        raise RuntimeError(f"could not load the espeak-ng library at {path}: {error}") from error
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
    library.espeak_SetSynthCallback.restype = None
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    library.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return library


def _synthesize_native(text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> tuple[np.ndarray, int]:
    """Run one utterance through a freshly loaded engine; returns int16 samples and the native rate."""
    paths = _resolve_paths()
    chunks: list[np.ndarray] = []

    def on_samples(samples, count, _events) -> int:
        if count > 0 and samples:
            chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0 = keep synthesising

    callback = _CALLBACK_TYPE(on_samples)
    library = _load_library(paths["library"])
    try:
        native_rate = library.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, paths["data"].encode(), _INITIALIZE_DONT_EXIT
        )
        if native_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {native_rate}) with data {paths['data']}")
        try:
            library.espeak_SetSynthCallback(callback)
            if library.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise RuntimeError(f"espeak-ng has no voice named {voice!r}")
            parameters = {_PARAM_RATE: rate_wpm, _PARAM_PITCH: pitch, _PARAM_RANGE: pitch_range}
            for parameter, value in parameters.items():
                if library.espeak_SetParameter(parameter, int(value), 0) != _EE_OK:
                    raise RuntimeError(f"espeak_SetParameter({parameter}, {value}) failed")
            library.espeak_ng_SetRandSeed(_NOISE_SEED)
            encoded = text.encode() + b"\0"
            status = library.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        finally:
            library.espeak_Terminate()  # also joins espeak's worker thread, so unloading below is safe
    finally:
        _ctypes.dlclose(library._handle)
    if status != _EE_OK or not chunks:
        raise RuntimeError(f"espeak_Synth returned no samples for {text!r} with voice {voice!r} (status {status})")
    return np.concatenate(chunks), native_rate


def synthesize(
    text: str,
    *,
    voice: str = "en",
    rate_wpm: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng; the same arguments always give the same samples.

    Args:
        text: What to say.
        voice: espeak voice name, optionally with a variant (``"en-us+f2"``).
        rate_wpm: Speaking rate in words per minute (espeak accepts 80-450).
        pitch: Base pitch, 0-100.
        pitch_range: Pitch variation, 0-100 (0 is monotone).
        sample_rate: Output sample rate in Hz.

    Returns:
        float32 mono waveform in [-1, 1] with leading and trailing silence trimmed.
    """
    if not text.strip():
        raise ValueError("text must not be empty")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    with _lock:
        samples, native_rate = _synthesize_native(text, voice, rate_wpm, pitch, pitch_range)
    audio = samples.astype(np.float32) / 32768.0
    if sample_rate != native_rate:
        audio = librosa.resample(audio, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")
    audio, _ = librosa.effects.trim(audio, top_db=40)
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced only silence for {text!r} with voice {voice!r}")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)
