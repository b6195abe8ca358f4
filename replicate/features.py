"""librosa-exact features, computed in batches in worker threads and cached on disk.

The cache stores what does not depend on the data set as a whole (e.g. mel *power*); transforms that
need data-set statistics (the DACON global dB reference and z-score) are applied per batch by
`Normalizer`, so one cache serves every normalisation option and nothing is held in memory twice.

Same bits as librosa. `melspectrogram` does librosa's arithmetic step for step: a periodic Hann window
of `win_length` zero-padded to `n_fft`, centred frames over the signal padded by n_fft // 2 at each end with
`np.pad(mode=pad_mode)` (librosa pads only the ends, with the same samples), the window applied in float64,
the FFT of librosa's FFT library (`librosa.get_fftlib()`) rounded to complex64, `abs(.) ** 2` in float32,
then the float32 product with `librosa.filters.mel` (its `htk` and `norm` from `mel_scale` and `mel_norm`).
What differs is the bookkeeping: librosa builds the mel filters anew on every call and walks the frames in
blocks of 256 KiB, about 50 FFT calls per second of audio at n_fft 2048. Here the filters and the window are
built once and each FFT call takes whole clips (about `FFT_BLOCK_VALUES` samples). The work is then a few
large numpy calls that release the GIL, so threads use every core (`cached_features`). tests/test_features.py
checks that the result has the same bits as librosa's, clip by clip, at the same number of BLAS threads (a
different number changes the mel product's last bit): the mel product is handed to BLAS exactly as librosa
hands it (same shapes, strides and transpose flags), as OpenBLAS's kernels round differently for a
transposed product on some CPUs. With pad_mode "reflect", mel_scale "htk", mel_norm "none" and an even n_fft
it is `torchaudio.transforms.MelSpectrogram`'s definition (its other defaults are these too: f_min 0, f_max
sr / 2, centred frames, periodic Hann window, power 2, one-sided spectrum); tests/test_features.py compares
it with `torch.stft`.

The feature cache (`cached_features`): the cache key (`files.cache_key`) hashes the feature parameters
(everything that changes the numbers) and the file list with each file's size and modification time, so a
changed file or parameter computes anew and a second run with the same inputs reads the cache. Work is
resumable: an interrupted extraction continues from the last finished chunk. The finished cache is renamed
into place atomically (`files.cached_folder`, the package's one cache mechanism).

A finished cache records the SHA-256 of every 16 MiB block of its array (`files.checksums`), and is checked
against them each time it is opened: a cache damaged on disk (garbage written into it, a truncated file) is
computed again, said on the log, never read as features. Checking reads the whole array once (in the worker
threads), which a run does anyway, twice, to fit its normalisation statistics; checking only sizes and
headers would miss garbage inside. While a cache is built, it is locked (`files.folder_lock`): another
process that needs it stops at once with `files.LockedError`.

Chunks are read and extracted in worker threads: reading (libsndfile) and the extractors' numpy, FFT and
BLAS calls release the GIL, so threads use every core without the start-up, imports and pickling of worker
processes. BLAS is held to one thread meanwhile: the workers do not oversubscribe the cores, and the numbers
do not depend on the worker count (BLAS threads change the round-off of a matrix product).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from replicate import files
from replicate import recipe as recipe_lib
from replicate.audio import AudioError, read_audio

PAD_MODES = ("constant", "reflect")  # frames' ends: zeros (librosa >= 0.9), a mirror (librosa <= 0.8, torchaudio)
MEL_SCALES = ("slaney", "htk")  # librosa's default scale, and HTK's 2595·log10(1 + f/700) (torchaudio's default)
MEL_NORMS = ("slaney", "none")  # filters of equal area (librosa's default), or peaks of 1 (torchaudio's default)
# The recipe rules (`Task.rules`) of the keys every mel-power recipe has: its audio, STFT, mel and dB settings.
MEL_POWER_RULES = {
    "data.sample_rate": recipe_lib.positive,
    "data.clip_samples": recipe_lib.positive,
    "features.n_fft": recipe_lib.positive,
    "features.hop_length": recipe_lib.positive,
    "features.n_mels": recipe_lib.positive,
    "features.pad_mode": recipe_lib.one_of(*PAD_MODES),
    "features.top_db": recipe_lib.positive,
    "features.db_reference": recipe_lib.one_of("global", "per_clip"),
}


@dataclass(frozen=True)
class MelResolution:
    """One mel resolution of centred frames; the defaults of the last three fields are librosa's.

    Attributes:
        n_fft, win_length, hop_length, n_mels: as in `librosa.feature.melspectrogram`.
        pad_mode: "constant" (zeros, librosa ≥ 0.9) or "reflect" (torchaudio, librosa ≤ 0.8: sources from before 2022).
        mel_scale: "slaney" (librosa) or "htk" (torchaudio).
        mel_norm: "slaney" (librosa: each filter divided by its width in Hz) or "none" (torchaudio).
    """

    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    pad_mode: str = "constant"
    mel_scale: str = "slaney"
    mel_norm: str = "slaney"


@dataclass(frozen=True)
class AudioSpec:
    """How clips are read: rate, fixed length and the stated rules for other rates and lengths."""

    sample_rate: int
    num_samples: int | None = None
    resample: bool = False
    fix_length: bool = False

    @classmethod
    def from_recipe(cls, data: Mapping[str, Any]) -> AudioSpec:
        """A recipe's `[data]` table: `sample_rate`, `clip_samples`, `resample` and `fix_length`."""
        return cls(data["sample_rate"], data["clip_samples"], data["resample"], data["fix_length"])


CHECKPOINT_SECONDS = 10.0  # at most this much extraction is redone after a hard kill (SIGKILL, power loss)
FFT_BLOCK_VALUES = 1 << 17  # windowed float64 samples per FFT call (1 MiB, within cache: measured fastest)


def melspectrogram(
    audio: np.ndarray,
    sample_rate: int,
    *,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    n_mels: int = 128,
    pad_mode: str = "constant",
    mel_scale: str = "slaney",
    mel_norm: str = "slaney",
) -> np.ndarray:
    """`librosa.feature.melspectrogram` of a batch of equal-length clips: the same numbers, several times faster.

    The arithmetic is librosa's, step for step; only the bookkeeping differs (the module docstring says how,
    and how the bits are kept equal).

    Args:
        audio: float32 array (clips, samples); other dtypes are converted to float32, as `read_audio` gives.
        sample_rate: sampling rate in Hz.
        n_fft, hop_length, win_length, n_mels: as in `librosa.feature.melspectrogram` (power 2, centred
            frames, Hann window).
        pad_mode: "constant" (librosa's default) or "reflect" (`pad_mode` of librosa and torchaudio).
        mel_scale: "slaney" (librosa's default) or "htk" (torchaudio's default; librosa's `htk=True`).
        mel_norm: "slaney" (librosa's default) or "none" (torchaudio's default; librosa's `norm=None`).
        With "reflect", "htk" and "none" and an even n_fft this is torchaudio's `MelSpectrogram`.

    Returns:
        float32 array (clips, n_mels, 1 + samples // hop_length).

    Example:
        >>> melspectrogram(np.zeros((2, 16000), np.float32), 16000, n_fft=512, hop_length=160, n_mels=64).shape
        (2, 64, 101)
    """
    import librosa

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (clips, samples), got shape {audio.shape}")
    _check_mel_options(pad_mode=pad_mode, mel_scale=mel_scale, mel_norm=mel_norm)
    window = _hann_window(n_fft, win_length or n_fft)
    filters = _mel_filters(sample_rate, n_fft, n_mels, mel_scale, mel_norm)
    # As librosa <= 0.8 did: the whole signal extended, np.pad(y, n_fft // 2, mode=pad_mode), then framed.
    # librosa >= 0.10 pads the head and the tail apart; with "reflect" its last frame differs where the tail it
    # reflects is shorter than n_fft // 2 + 1 samples and the window reaches the end (e.g. n_fft 256, hop 160,
    # win_length 256), never at DACON's resolutions (tests/test_features.py compares with both).
    padded = np.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode=pad_mode)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop_length]
    mel = np.empty((len(audio), n_mels, frames.shape[1]), dtype=np.float32)
    rfft = librosa.get_fftlib().rfft
    step = max(1, FFT_BLOCK_VALUES // (frames.shape[1] * n_fft))
    for start in range(0, len(audio), step):
        spectrum = rfft(frames[start : start + step] * window, axis=-1).astype(np.complex64)
        # librosa's product, clip by clip: filters @ power with power (bins, frames) in Fortran order, so BLAS
        # gets the same shapes, strides and transpose flags (other orientations change the last bit on some CPUs)
        np.matmul(filters, (np.abs(spectrum) ** 2).transpose(0, 2, 1), out=mel[start : start + step])
    return mel


def _check_mel_options(pad_mode: str, mel_scale: str, mel_norm: str) -> None:
    """Raise `ValueError` naming the first option that is not one of its allowed values."""
    for name, value, allowed in (
        ("pad_mode", pad_mode, PAD_MODES),
        ("mel_scale", mel_scale, MEL_SCALES),
        ("mel_norm", mel_norm, MEL_NORMS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@functools.lru_cache(maxsize=64)
def _hann_window(n_fft: int, win_length: int) -> np.ndarray:
    import librosa

    window = librosa.util.pad_center(librosa.filters.get_window("hann", win_length, fftbins=True), size=n_fft)
    window.flags.writeable = False  # shared between calls and threads
    return window


@functools.lru_cache(maxsize=64)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int, mel_scale: str, mel_norm: str) -> np.ndarray:
    import librosa

    norm = None if mel_norm == "none" else mel_norm
    filters = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, htk=mel_scale == "htk", norm=norm)
    filters.flags.writeable = False
    return filters


def mel_power(audio: np.ndarray, sample_rate: int, resolutions: Sequence[MelResolution]) -> np.ndarray:
    """Mel power spectrograms of a batch of equal-length clips, one channel per resolution (`melspectrogram`).

    Args:
        audio: float32 array (clips, samples).
        sample_rate: sampling rate in Hz.
        resolutions: the resolutions to stack; all must give the same number of mels and frames.

    Returns:
        float32 array (clips, n_mels, frames, len(resolutions)).
    """
    channels = [melspectrogram(audio, sample_rate, **asdict(resolution)) for resolution in resolutions]
    return np.stack(channels, axis=-1)


def mfcc(
    audio: np.ndarray,
    sample_rate: int,
    *,
    n_mfcc: int,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    n_mels: int = 128,
) -> np.ndarray:
    """librosa MFCCs of a batch of equal-length clips, equal to `librosa.feature.mfcc` clip by clip.

    The mel spectrograms (`melspectrogram`) and the DCT run on the whole batch; the dB conversion runs per
    clip, because `power_to_db`'s top_db floor (80 dB below the maximum) is taken over the whole array it is
    given, so on a batch a loud clip would raise the floor of a quiet one.

    Args:
        audio: float32 array (clips, samples).
        sample_rate: sampling rate in Hz.
        n_mfcc, n_fft, hop_length, win_length, n_mels: as in `librosa.feature.mfcc`.

    Returns:
        float32 array (clips, n_mfcc, frames).
    """
    import librosa

    mel = melspectrogram(audio, sample_rate, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels)
    db = np.stack([librosa.power_to_db(clip) for clip in mel])
    return librosa.feature.mfcc(S=db, n_mfcc=n_mfcc).astype(np.float32, copy=False)


def power_to_db(power: np.ndarray, ref: np.ndarray | float, top_db: float = 80.0, amin: float = 1e-10):
    """librosa.power_to_db with a given reference, term for term, so results are bit-identical.

    librosa clips at (maximum of the result) − top_db. When `ref` is the maximum power of the data the
    reference was taken from (global or per clip, as the recipes do), that maximum is 0 dB, so the floor
    is −top_db; fixing it there lets a batch (or a new clip at inference) be transformed on its own.

    Args:
        power: mel power, any shape; a per-channel `ref` broadcasts against its last axis.
        ref: the reference power (scalar, per channel, or per clip with broadcastable shape).
        top_db: dynamic range kept below the reference.
        amin: the smallest power (avoids log of zero).
    """
    power = np.asarray(power)
    ref = np.asarray(ref, dtype=power.dtype)
    # librosa's operations in its order, in place (one array, not four), with `_channel_rows` operands
    rows, floor = _channel_rows(power, np.asarray(amin, np.result_type(power, amin)))
    log_spec = np.maximum(rows, floor).reshape(power.shape)
    np.log10(log_spec, out=log_spec)
    log_spec *= 10.0
    rows, reference_db = _channel_rows(log_spec, 10.0 * np.log10(np.maximum(amin, ref)))
    rows -= reference_db
    rows, floor = _channel_rows(log_spec, np.asarray(-top_db, log_spec.dtype))
    np.maximum(rows, floor, out=rows)
    return log_spec


def channel_max(arrays: Sequence[np.ndarray], chunk: int = 1024) -> np.ndarray:
    """The maximum of each channel (last axis) over one or more (memory-mapped) arrays, read in chunks of rows."""
    maxima = [
        _per_channel(np.maximum, array[start : start + chunk])
        for array in arrays
        for start in range(0, len(array), chunk)
    ]
    if not maxima:
        raise ValueError("no rows to take the maximum of")
    return np.max(maxima, axis=0)


def _channel_rows(array: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`array` (..., frames, channels) and a scalar or per-channel `values` ((channels,) or (..., 1, 1,
    channels)) as operands of the same element-wise operation over rows as wide as the last two axes: a view
    of the array with them merged, and the values repeated along the row. numpy runs an operation broadcast
    against a (..., 4) array 4 elements at a time, and a maximum against a scalar without its vector
    instructions: 1.5 ms of a batch of 16 DACON clips, where the same operations on rows take 0.4 ms. Each
    element meets the same value in the same operation, so the results are the same bits. Arrays of another
    shape, or not contiguous, come back as they are."""
    if array.ndim < 2 or not array.flags.c_contiguous:
        return array, values
    if values.ndim == 0:
        return array.reshape(*array.shape[:-2], -1), np.full(array.shape[-2] * array.shape[-1], values)
    if values.shape[-1] != array.shape[-1] or not (values.ndim == 1 or values.shape[-2] == 1):
        return array, values
    if values.ndim > 1:
        values = values[..., 0, :]  # (..., 1, channels): the frames axis goes, the merged axis takes its place
    return array.reshape(*array.shape[:-2], -1), np.tile(values, array.shape[-2])


def _per_channel(ufunc: np.ufunc, array: np.ndarray) -> np.ndarray:
    """`ufunc.reduce` over every axis but the last. numpy reduces a (..., 4) array over its outer axes one
    4-wide row at a time (0.6 s for 300 MB); rows as wide as the last two axes vectorise (0.05 s)."""
    rows = array.reshape(-1, array.shape[-2] * array.shape[-1]) if array.ndim > 2 else array
    return ufunc.reduce(ufunc.reduce(rows, axis=0).reshape(-1, array.shape[-1]), axis=0)


@dataclass(frozen=True)
class Normalizer:
    """dB conversion and z-score of cached mel power, with statistics that travel in the manifest.

    Attributes:
        reference: "global" (one reference per channel: the maximum over the data set, as the DACON
            source did by calling power_to_db on the whole array) or "per_clip" (each clip's maximum).
        ref: per-channel global reference power (unused for "per_clip").
        mean, std: per-channel mean and standard deviation of the dB values.
        top_db: the dB range kept.
    """

    reference: str
    ref: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    top_db: float = 80.0

    def __call__(self, power: np.ndarray) -> np.ndarray:
        """(clips, mels, frames, channels) power → standardised dB, float32."""
        db = power_to_db(np.asarray(power, dtype=np.float32), self._reference_of(power), self.top_db)
        rows, mean = _channel_rows(db, np.float32(self.mean))
        rows -= mean
        rows, std = _channel_rows(db, np.float32(self.std))
        rows /= std
        return db

    def _reference_of(self, power: np.ndarray) -> np.ndarray:
        if self.reference == "per_clip":
            return power.max(axis=(1, 2), keepdims=True)
        return np.asarray(self.ref, dtype=np.float32)

    @classmethod
    def fit(
        cls,
        arrays: Sequence[np.ndarray],
        reference: str,
        top_db: float = 80.0,
        chunk: int = 1024,
        name: str = "the data set",
    ) -> Normalizer:
        """Compute the reference and the dB mean/std over one or more (memory-mapped) arrays, in chunks.

        Args:
            arrays: (clips, mels, frames, channels) mel power, e.g. the training and test caches.
            reference: "global" or "per_clip" (see the class).
            top_db: the dB range kept.
            chunk: clips read at a time.
            name: what the arrays are, for errors (e.g. "dacon-train + dacon-test").

        Raises:
            DataError: naming `name`: no clips, statistics that are not finite (NaN or infinite features), or
                a channel with the same value everywhere (silent clips), which a z-score cannot scale.
        """
        from replicate.task import DataError

        if reference not in ("global", "per_clip"):
            raise ValueError(f"reference must be 'global' or 'per_clip', got {reference!r}")
        if not any(len(array) for array in arrays):
            raise DataError(f"{name}: no clips to fit the normalisation statistics on (an empty data set)")
        channels = arrays[0].shape[-1]
        ref = channel_max(arrays, chunk) if reference == "global" else np.zeros(channels, dtype=np.float32)
        provisional = cls(reference, tuple(map(float, ref)), (0.0,) * channels, (1.0,) * channels, top_db)
        total = np.zeros(channels)
        total_squares = np.zeros(channels)
        count = 0
        for array in arrays:
            for start in range(0, len(array), chunk):
                db = provisional(array[start : start + chunk]).astype(np.float64)
                total += _per_channel(np.add, db)
                total_squares += _per_channel(np.add, np.square(db, out=db))
                count += db.size // channels
        mean = total / count
        std = np.sqrt(np.maximum(total_squares / count - np.square(mean), 0.0))
        if not (np.isfinite(ref).all() and np.isfinite(mean).all() and np.isfinite(std).all()):
            raise DataError(
                f"{name}: the normalisation statistics are not finite (reference {ref.tolist()}, mean "
                f"{mean.tolist()}, std {std.tolist()}): the features hold NaN or infinite values"
            )
        if (std == 0).any():
            raise DataError(
                f"{name}: feature channel(s) {np.flatnonzero(std == 0).tolist()} have the same value in every "
                "clip (std 0), which a z-score cannot scale: are the clips silent?"
            )
        return cls(reference, provisional.ref, tuple(map(float, mean)), tuple(map(float, std)), top_db)

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> Normalizer:
        return cls(
            config["reference"],
            tuple(config["ref"]),
            tuple(config["mean"]),
            tuple(config["std"]),
            float(config["top_db"]),
        )


def read_and_extract(
    paths: Sequence[str], audio: AudioSpec, extractor: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray | None, list[str], Counter]:
    """Read a chunk of files and extract features for the whole chunk at once.

    Returns:
        (features or None when any file failed, error messages, counts of what was changed).
    """
    clips, errors, notes = [], [], Counter()
    for path in paths:
        try:
            samples, note = read_audio(
                path,
                audio.sample_rate,
                resample=audio.resample,
                num_samples=audio.num_samples,
                fix_length=audio.fix_length,
            )
        except AudioError as error:
            errors.append(str(error))
            continue
        clips.append(samples)
        notes.update(key for key, changed in asdict(note).items() if changed)
    if errors:
        return None, errors, notes
    return extractor(np.stack(clips)), errors, notes


def mel_power_extractor(sample_rate: int, resolutions: Sequence[MelResolution]) -> Callable:
    """An extractor computing `mel_power` (a picklable partial: it can also go to other processes)."""
    return functools.partial(mel_power, sample_rate=sample_rate, resolutions=tuple(resolutions))


def extract_features(
    paths: Sequence[str | os.PathLike],
    *,
    audio: AudioSpec,
    extractor: Callable[[np.ndarray], np.ndarray],
    chunk_size: int = 64,
) -> np.ndarray:
    """Features of a few files in this process, without the cache (inference on new clips).

    Raises:
        FeatureCacheError: listing every file that could not be used, on one line.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no audio files given")
    with threadpool_limits(1):  # as `cached_features` computes, so a cached and a new clip get the same bits
        results = [
            read_and_extract(paths[start : start + chunk_size], audio, extractor)
            for start in range(0, len(paths), chunk_size)
        ]
    errors = [error for _, chunk_errors, _ in results for error in chunk_errors]
    if errors:  # one line: this is what a command that predicts prints
        raise FeatureCacheError(f"{len(errors)} of {len(paths)} audio files cannot be used: " + "; ".join(errors))
    return np.concatenate([features for features, _, _ in results])


class FeatureCacheError(ValueError):
    """Feature extraction that found unusable inputs; the message lists the files and reasons."""


def cached_features(
    paths: Sequence[str | os.PathLike],
    *,
    audio: AudioSpec,
    extractor: Callable[[np.ndarray], np.ndarray],
    params: dict,
    cache_dir: str | os.PathLike,
    name: str,
    chunk_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict]:
    """Features of `paths`, computed once and memory-mapped from `cache_dir` afterwards.

    Keyed by `params`, the audio rules and the files' sizes and times; resumable, checked against its
    checksums on every open, locked while built, extracted in `workers` threads with BLAS at one thread (the
    module docstring says why).

    Args:
        paths: audio files, in the order of the rows of the result.
        audio: how to read them.
        extractor: (clips, samples) float32 → (clips, ...) float32; called from several threads at once
            when workers > 1.
        params: the feature parameters that define the cache key (JSON-able).
        cache_dir: the cache root.
        name: a readable prefix for the cache folder (e.g. "dacon-train").
        chunk_size: clips per extractor call.
        workers: threads (default: all cores, at most one per chunk).
        progress: show a progress bar.
        log: where a line goes when a damaged cache is computed again.

    Returns:
        (read-only memory-mapped array, metadata with counts of mixed/resampled/padded/cropped files and
        the array's `checksums`, which name its content, e.g. in what a member was trained from).

    Raises:
        FeatureCacheError: listing every file that could not be used, after the whole pass.
        files.LockedError: another process is building the same cache.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"{name}: no audio files to extract features from")
    try:
        key = files.cache_key({"params": params, "audio": asdict(audio)}, paths)
    except OSError as error:
        raise FeatureCacheError(f"{error.filename}: cannot read audio ({error.strerror})") from error
    folder = Path(cache_dir) / f"{name}-{key}"
    threads = max(1, workers or os.cpu_count() or 1)
    meta = files.cached_folder(
        folder,
        lambda partial: _build_cache(
            paths, audio, extractor, params, partial, key, name, chunk_size, workers, progress
        ),
        what="feature cache",
        workers=threads,
        resume=True,
        log=log,
    )
    return np.load(folder / "features.npy", mmap_mode="r"), meta


def _build_cache(paths, audio, extractor, params, partial_dir, key, name, chunk_size, workers, progress) -> dict:
    """Extract the features of `paths` into `partial_dir` (`files.cached_folder`'s), resuming what an
    interrupted extraction left there; returns the cache's metadata."""
    state_path = partial_dir / "state.json"
    state = files.read_json(state_path) if state_path.is_file() else {"done": 0, "notes": {}}

    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    first_done = state["done"] // chunk_size
    notes, errors, done = Counter(state["notes"]), [], state["done"]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks) - first_done))
    task = functools.partial(read_and_extract, audio=audio, extractor=extractor)
    bar = tqdm(total=len(paths), initial=done, desc=f"features {name}", unit="clip", disable=not progress)
    saved_at = time.monotonic()
    with bar, threadpool_limits(1), _RowWriter(partial_dir / "features.npy", len(paths), done > 0) as rows:
        try:
            for index, (features, chunk_errors, chunk_notes) in enumerate(
                _ordered_map(task, chunks[first_done:], workers), start=first_done
            ):
                bar.update(len(chunks[index]))
                errors.extend(chunk_errors)
                if errors:  # keep going to report every bad file, but write nothing more
                    continue
                rows.write(index * chunk_size, features)
                notes.update(chunk_notes)
                done = index * chunk_size + len(features)
                if time.monotonic() - saved_at > CHECKPOINT_SECONDS:
                    rows.checkpoint(state_path, done, notes)
                    saved_at = time.monotonic()
        finally:  # also on an error or Ctrl-C: the next run resumes after the last written chunk
            if done > state["done"]:
                rows.checkpoint(state_path, done, notes)
    if errors:
        listed = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise FeatureCacheError(f"{len(errors)} of {len(paths)} audio files cannot be used:\n  {listed}{more}")
    state_path.unlink()
    return {
        "name": name,
        "key": key,
        "params": params,
        "audio": asdict(audio),
        "count": len(paths),
        "notes": {k: notes.get(k, 0) for k in ("mixed_to_mono", "resampled", "padded", "cropped")},
    }


class _RowWriter:
    """Writes rows of a float32 .npy file in place with plain file writes; created at the first write.

    Writing through a memory map costs a page fault per 4 KiB page, which on some virtual machines made
    writing the cache slower than computing it; `os.pwrite` copies a chunk in one system call. Progress is
    recorded by `checkpoint`, after the rows are on disk; the caller does it every `CHECKPOINT_SECONDS` and
    when it stops, not per chunk: a sync per chunk of a growing file cost 75 ms each (a journal commit).

    Args:
        path: the .npy file.
        rows: rows of the whole array.
        resume: open the file an interrupted run left (its header gives the shape) instead of creating it.
    """

    def __init__(self, path: Path, rows: int, resume: bool):
        self.path, self.rows = path, rows
        self.handle = self.offset = self.shape = None
        if resume:
            with open(path, "rb") as handle:
                np.lib.format.read_magic(handle)
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
                offset = handle.tell()
            if shape[0] != rows or fortran_order or dtype != np.float32:
                raise FeatureCacheError(f"{path}: an unfinished cache of another shape or type; delete it")
            self._open(shape, offset)

    def _open(self, shape: tuple[int, ...], offset: int) -> None:
        self.shape, self.offset = shape, offset
        self.handle = os.open(self.path, os.O_WRONLY)

    def write(self, start: int, features: np.ndarray) -> None:
        if self.handle is None:
            shape = (self.rows, *features.shape[1:])
            with open(self.path, "wb") as handle:
                header = {"descr": "<f4", "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(handle, header)
                offset = handle.tell()
                handle.truncate(offset + int(np.prod(shape, dtype=np.int64)) * 4)  # sparse until written
            self._open(shape, offset)
        if features.shape[1:] != self.shape[1:]:
            raise FeatureCacheError(
                f"{self.path}: the extractor gave rows of shape {features.shape[1:]}, earlier {self.shape[1:]}"
            )
        data = memoryview(np.ascontiguousarray(features, dtype="<f4")).cast("B")
        position = self.offset + start * (data.nbytes // len(features))
        while data:  # a write may take fewer bytes than asked for
            written = os.pwrite(self.handle, data, position)
            data, position = data[written:], position + written

    def checkpoint(self, state_path: Path, done: int, notes: Counter) -> None:
        """Record that rows [0, done) are written, once they are on disk (a crash never leaves the record ahead)."""
        getattr(os, "fdatasync", os.fsync)(self.handle)  # macOS has no fdatasync
        files.write_json(state_path, {"done": done, "notes": dict(notes)})

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, *exc) -> bool:
        if self.handle is not None:
            os.close(self.handle)
        return False


def _ordered_map(function: Callable, items: Sequence, workers: int):
    """`map(function, items)` over `workers` threads, in order, with at most 2 × workers items in flight."""
    if workers == 1:
        yield from map(function, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as executor:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(executor.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # on an error or an interruption, start nothing more
            for future in pending:
                future.cancel()


# --- feature kinds: one object per kind gives the cache key, the extractor, the manifest entry, inference ---


class FeatureSpec:
    """The settings of one feature kind, from which everything about it follows.

    `params()` is what changes the numbers: it keys the cache (`cached`), and with the audio rules it is the
    manifest entry (`to_manifest`), from which `FeatureSpec.from_manifest` rebuilds the same spec at inference
    (`compute`: the same extractor on new files, without the cache, with the same bits as the cached rows).
    A task builds its spec from its recipe once and uses it for all four, so the cache key, the training
    features and the inference features cannot drift apart.

    Subclasses are frozen dataclasses with an `audio: AudioSpec` field, a `kind` (the manifest's "kind"),
    `params()` and `extractor()`, registered in `FEATURE_KINDS` by `feature_kind`.
    """

    kind: ClassVar[str]
    audio: AudioSpec

    def params(self) -> dict:
        """Everything that changes the numbers, JSON-able, with "kind" first."""
        raise NotImplementedError(f"{type(self).__name__} must define params()")

    def extractor(self) -> Callable[[np.ndarray], np.ndarray]:
        """(clips, samples) float32 → (clips, ...) float32, picklable and safe to call from several threads."""
        raise NotImplementedError(f"{type(self).__name__} must define extractor()")

    @classmethod
    def from_params(cls, audio: AudioSpec, params: Mapping[str, Any]) -> FeatureSpec:
        """The spec of these `params()` values and audio rules."""
        raise NotImplementedError(f"{cls.__name__} must define from_params()")

    def to_manifest(self) -> dict:
        return {**self.params(), "audio": asdict(self.audio)}

    @staticmethod
    def from_manifest(entry: Mapping[str, Any]) -> FeatureSpec:
        """The spec a manifest entry (`to_manifest`) describes."""
        kind = entry.get("kind")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {kind!r} in the manifest; known: {', '.join(FEATURE_KINDS)}")
        return FEATURE_KINDS[kind].from_params(AudioSpec(**entry["audio"]), entry)

    def cached(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        cache_dir: str | os.PathLike,
        name: str,
        workers: int | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> tuple[np.ndarray, dict]:
        """The features of `paths` from the cache, computed the first time (`cached_features`)."""
        return cached_features(
            paths,
            audio=self.audio,
            extractor=self.extractor(),
            params=self.params(),
            cache_dir=cache_dir,
            name=name,
            workers=workers,
            progress=progress,
            log=log,
        )

    def compute(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """The features of a few new files, without the cache (inference): the bits `cached` gives."""
        return extract_features(paths, audio=self.audio, extractor=self.extractor())


FEATURE_KINDS: dict[str, type[FeatureSpec]] = {}


def feature_kind(cls: type[FeatureSpec]) -> type[FeatureSpec]:
    """Register a `FeatureSpec` subclass under its `kind`, so that manifests naming it can be read."""
    FEATURE_KINDS[cls.kind] = cls
    return cls


def saved_transform(
    manifest: Mapping[str, Any],
    input_name: str,
    spec_of_recipe: Callable[[dict], FeatureSpec],
    legacy_features: Mapping[str, Any],
) -> tuple[FeatureSpec, Normalizer]:
    """The feature spec and normaliser of a run's normalised input, for inference, from its manifest.

    Args:
        manifest: the run's manifest: its `features[input_name]` entry and `preprocessing.normalization`;
            for a run made before the manifest schema (no `schema_version`), the recipe tables it saved and
            its top-level `normalization`.
        input_name: the models' input the features feed.
        spec_of_recipe: the task's spec of a recipe (its `data` and `features` tables), for a run made before
            the manifest schema.
        legacy_features: what such a run computed for the `features` keys the recipe gained since.
    """
    if "schema_version" in manifest:
        spec = FeatureSpec.from_manifest(manifest["features"][input_name])
        return spec, Normalizer.from_config(manifest["preprocessing"]["normalization"])
    saved = manifest["recipe"]
    spec = spec_of_recipe({"data": saved["data"], "features": {**legacy_features, **saved["features"]}})
    return spec, Normalizer.from_config(manifest["normalization"])


@feature_kind
@dataclass(frozen=True)
class MelPowerSpec(FeatureSpec):
    """Mel power spectrograms, one channel per resolution (`mel_power`): (clips, n_mels, frames, channels).

    DACON stacks four resolutions; DCASE uses one with torchaudio's definition. The dB conversion and the
    z-score depend on the data set and are applied by `Normalizer`, outside the cache.
    """

    kind: ClassVar[str] = "mel_power"
    audio: AudioSpec
    resolutions: tuple[MelResolution, ...]

    def params(self) -> dict:
        return {
            "kind": self.kind,
            "sample_rate": self.audio.sample_rate,
            "resolutions": [asdict(resolution) for resolution in self.resolutions],
        }

    def extractor(self) -> Callable[[np.ndarray], np.ndarray]:
        return mel_power_extractor(self.audio.sample_rate, self.resolutions)

    @classmethod
    def from_params(cls, audio: AudioSpec, params: Mapping[str, Any]) -> MelPowerSpec:
        return cls(audio, tuple(MelResolution(**resolution) for resolution in params["resolutions"]))


@feature_kind
@dataclass(frozen=True)
class MfccSpec(FeatureSpec):
    """librosa MFCCs of each clip (`mfcc`, the dB floor per clip) as one-channel images:
    (clips, n_mfcc, frames, 1). AI CUP trains one variant per n_mfcc."""

    kind: ClassVar[str] = "mfcc"
    audio: AudioSpec
    n_mfcc: int
    n_fft: int
    hop_length: int

    def params(self) -> dict:
        return {
            "kind": self.kind,
            "sample_rate": self.audio.sample_rate,
            "n_mfcc": self.n_mfcc,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
        }

    def extractor(self) -> Callable[[np.ndarray], np.ndarray]:
        return functools.partial(
            _mfcc_image,
            sample_rate=self.audio.sample_rate,
            n_mfcc=self.n_mfcc,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
        )

    @classmethod
    def from_params(cls, audio: AudioSpec, params: Mapping[str, Any]) -> MfccSpec:
        return cls(audio, params["n_mfcc"], params["n_fft"], params["hop_length"])


def _mfcc_image(audio: np.ndarray, *, sample_rate: int, **parameters) -> np.ndarray:
    return mfcc(audio, sample_rate, **parameters)[..., np.newaxis]
