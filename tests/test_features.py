"""Features equal a direct librosa computation; the cache skips work, notices changes and resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf
from threadpoolctl import threadpool_limits

from replicate import features, files
from tests.conftest import ROOT, write_tone

RESOLUTIONS = [features.MelResolution(n, w, 160, 64) for n, w in ((256, 200), (512, 400), (1024, 800), (2048, 1600))]
AUDIO = features.AudioSpec(sample_rate=16000, num_samples=16000)


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    rng = np.random.default_rng(0)
    time = np.arange(16000) / 16000
    tones = [0.2 * np.sin(2 * np.pi * f * time) for f in (220, 440, 880, 1760, 3000)]
    return (np.stack(tones) + 0.01 * rng.normal(size=(5, 16000))).astype(np.float32)


def _librosa_one_clip(clip: np.ndarray, resolutions=RESOLUTIONS) -> np.ndarray:
    return np.stack(
        [
            librosa.feature.melspectrogram(
                y=clip,
                sr=16000,
                n_fft=r.n_fft,
                win_length=r.win_length,
                hop_length=r.hop_length,
                n_mels=r.n_mels,
                pad_mode=r.pad_mode,
            )
            for r in resolutions
        ],
        axis=-1,
    )


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_batched_mel_power_equals_librosa_clip_by_clip(clips, pad_mode):
    resolutions = [dataclasses.replace(r, pad_mode=pad_mode) for r in RESOLUTIONS]
    batched = features.mel_power(clips, 16000, resolutions)
    assert batched.shape == (5, 64, 101, 4) and batched.dtype == np.float32
    expected = np.stack([_librosa_one_clip(clip, resolutions) for clip in clips])
    np.testing.assert_array_equal(batched, expected)  # librosa's arithmetic step for step: the same bits


@pytest.mark.parametrize(
    "n_fft, hop_length, win_length, samples",
    [
        (256, 160, 200, 16000),  # DACON's first resolution
        (256, 160, 256, 16000),  # where librosa >= 0.10's reflection of the tail alone differs from 0.8's
        (2048, 160, 1600, 1000),  # the clip shorter than the padding: numpy reflects back and forth
    ],
)
def test_reflect_padding_is_librosa_08s(n_fft, hop_length, win_length, samples):
    """librosa <= 0.8 (the DACON source's) reflected the whole signal, then framed it: np.pad + center=False."""
    audio = np.random.default_rng(n_fft).normal(0, 0.1, (3, samples)).astype(np.float32)
    arguments = dict(n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=40)
    ours = features.melspectrogram(audio, 16000, pad_mode="reflect", **arguments)
    expected = np.stack(
        [
            librosa.feature.melspectrogram(
                y=np.pad(clip, n_fft // 2, mode="reflect"), sr=16000, center=False, **arguments
            )
            for clip in audio
        ]
    )
    np.testing.assert_array_equal(ours, expected)
    zeros = features.melspectrogram(audio, 16000, pad_mode="constant", **arguments)
    assert not np.array_equal(ours[..., 0], zeros[..., 0])  # the first frame reaches into the padding
    inside = [t for t in range(ours.shape[-1]) if n_fft // 2 <= t * hop_length <= samples - n_fft // 2]
    np.testing.assert_array_equal(ours[..., inside], zeros[..., inside])  # frames within the signal: the same


@pytest.mark.parametrize(
    "n_fft, hop_length, win_length, samples, n_mels",
    [
        (1024, 512, None, 32000, 128),  # DCASE's resolution
        (512, 160, None, 16537, 128),  # AI CUP's, on an odd length
        (2048, 160, 1600, 1000, 64),  # n_fft longer than the clip (librosa pads and warns)
        (1023, 100, 700, 5000, 40),  # odd n_fft, window shorter than the frame
    ],
)
def test_melspectrogram_equals_librosa_on_other_shapes(n_fft, hop_length, win_length, samples, n_mels):
    audio = np.random.default_rng(n_fft).normal(0, 0.1, (3, samples)).astype(np.float32)
    audio[1, samples // 3 :] *= 1e-4  # a quiet stretch: small powers are where round-off would show
    ours = features.melspectrogram(
        audio, 16000, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "n_fft is too large for input signal"
        expected = np.stack(
            [
                librosa.feature.melspectrogram(
                    y=clip, sr=16000, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels
                )
                for clip in audio
            ]
        )
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


TORCHAUDIO_DEFINITION = {"pad_mode": "reflect", "mel_scale": "htk", "mel_norm": "none"}  # DCASE's default


@pytest.mark.parametrize(
    "options",
    [
        TORCHAUDIO_DEFINITION,
        {"pad_mode": "reflect"},  # librosa <= 0.8's padding with its filters
        {"mel_scale": "htk"},  # HTK scale, Slaney norm
        {"mel_norm": "none"},
    ],
)
@pytest.mark.parametrize(
    "n_fft, hop_length, win_length, samples, n_mels",
    [
        (1024, 512, None, 16537, 128),  # DCASE's resolution, on an odd length (a partial last frame)
        (2048, 160, 1600, 1000, 64),  # n_fft longer than the clip: the mirror folds back (np.pad's "reflect")
        (1023, 100, 700, 5000, 40),  # odd n_fft, window shorter than the frame
    ],
)
def test_melspectrogram_options_equal_librosa(options, n_fft, hop_length, win_length, samples, n_mels):
    audio = np.random.default_rng(samples).normal(0, 0.1, (2, samples)).astype(np.float32)
    audio[0, : samples // 2] *= 1e-4  # a quiet stretch at the start: the mirrored edge is small
    audio[1] += np.linspace(-0.5, 0.5, samples, dtype=np.float32)  # a ramp: zeros and a mirror differ at the ends
    ours = features.melspectrogram(
        audio, 16000, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels, **options
    )
    librosa_options = {
        "pad_mode": options.get("pad_mode", "constant"),
        "htk": options.get("mel_scale") == "htk",
        "norm": None if options.get("mel_norm") == "none" else "slaney",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "n_fft is too large for input signal"
        expected = np.stack(
            [
                librosa.feature.melspectrogram(
                    y=clip,
                    sr=16000,
                    n_fft=n_fft,
                    hop_length=hop_length,
                    win_length=win_length,
                    n_mels=n_mels,
                    **librosa_options,
                )
                for clip in audio
            ]
        )
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)
    default = features.melspectrogram(audio, 16000, n_fft=n_fft, hop_length=hop_length, win_length=win_length)
    assert not np.array_equal(ours[:, :n_mels], default[:, :n_mels]), "an option that changes nothing"


def _htk_mel_filters(sample_rate: int, n_fft: int, n_mels: int):
    """torchaudio's default filter bank, written here from its definition, in float64 (torch tensors).

    HTK mel m(f) = 2595 log10(1 + f / 700); n_mels + 2 points equally spaced in mel from m(0) to m(sr / 2)
    (torchaudio's f_min 0 and f_max sr // 2); filter i rises linearly from point i to 1 at point i + 1 and falls
    to 0 at point i + 2, evaluated at the n_fft // 2 + 1 FFT-bin frequencies, equally spaced from 0 to sr // 2
    (torchaudio's `linspace`, exact for an even n_fft); no normalisation (torchaudio's norm=None).
    """
    import torch

    bins = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    top = 2595.0 * np.log10(1.0 + (sample_rate // 2) / 700.0)
    points = 700.0 * (10.0 ** (torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)  # (n_mels, bins)


@pytest.mark.parametrize(
    "n_fft, hop_length, win_length, n_mels",
    [(1024, 512, None, 128), (512, 160, 400, 64)],  # DCASE's resolution; a window shorter than the frame
)
def test_torchaudio_definition_equals_torch_stft_with_an_htk_filter_bank(n_fft, hop_length, win_length, n_mels):
    """`torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length, hop_length, n_mels=n_mels)` with its
    defaults (torchaudio cannot be installed here), computed independently: `torch.stft` with a periodic Hann
    window (torch.hann_window's default), centred frames padded by reflection, one-sided, |X|², then the HTK
    filter bank above. The reference runs in float64, so its round-off is negligible and the bound is ours:
    the FFT rounded to complex64 (2u on |X|²), |.| and the square in float32 (3u), the filters rounded to
    float32 (u), and a float32 sum of at most n_fft // 2 + 1 non-negative terms (one u per term, relative to
    the sum), with u = 2⁻²⁴ — 3.1e-5 for n_fft 1024, within the 1e-4 asked for. Noise keeps every band's power
    far above the float64 FFT's absolute error, so a relative comparison holds in every band.
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n_fft)
    time = np.arange(16537) / 16000
    audio = (0.05 * rng.normal(size=(3, 16537)) + 0.3 * np.sin(2 * np.pi * 440 * time)).astype(np.float32)
    ours = features.melspectrogram(
        audio, 16000, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels, **TORCHAUDIO_DEFINITION
    )
    window_length = win_length or n_fft
    spectrum = torch.stft(
        torch.from_numpy(audio).double(),
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=window_length,
        window=torch.hann_window(window_length, dtype=torch.float64),
        center=True,
        pad_mode="reflect",
        onesided=True,
        return_complex=True,
    )
    expected = (_htk_mel_filters(16000, n_fft, n_mels) @ spectrum.abs() ** 2).numpy()
    assert ours.shape == expected.shape == (3, n_mels, 1 + 16537 // hop_length)
    unit_roundoff = np.finfo(np.float32).eps / 2
    bound = (n_fft // 2 + 1 + 6) * unit_roundoff
    assert bound < 1e-4
    np.testing.assert_allclose(ours, expected, rtol=bound, atol=0)


def test_melspectrogram_refuses_unknown_options():
    audio = np.zeros((1, 4000), np.float32)
    for option, value in (("pad_mode", "edge"), ("mel_scale", "bark"), ("mel_norm", None)):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            features.melspectrogram(audio, 16000, n_fft=512, hop_length=160, **{option: value})


def test_mel_power_passes_each_resolutions_definition(clips):
    resolution = features.MelResolution(1024, 1024, 160, 64, **TORCHAUDIO_DEFINITION)
    channel = features.mel_power(clips, 16000, [RESOLUTIONS[2], resolution])[..., 1]
    np.testing.assert_array_equal(
        channel,
        features.melspectrogram(clips, 16000, n_fft=1024, hop_length=160, n_mels=64, **TORCHAUDIO_DEFINITION),
    )


def test_melspectrogram_rejects_a_single_clip():
    with pytest.raises(ValueError, match=r"\(clips, samples\)"):
        features.melspectrogram(np.zeros(16000, np.float32), 16000, n_fft=512, hop_length=160)
    with pytest.raises(ValueError, match=r"pad_mode must be one of \('constant', 'reflect'\), got 'edge'"):
        features.melspectrogram(np.zeros((1, 16000), np.float32), 16000, n_fft=512, hop_length=160, pad_mode="edge")


def test_global_normalisation_reproduces_the_source(clips):
    """The source: power_to_db(all clips of a channel, ref=np.max), then one mean/std over that array."""
    power = features.mel_power(clips, 16000, RESOLUTIONS)
    normalizer = features.Normalizer.fit([power[:3], power[3:]], "global")  # statistics over both parts
    ours = normalizer(power)
    for channel in range(4):
        db = librosa.power_to_db(power[..., channel], ref=np.max)
        expected = (db - db.mean()) / db.std()
        np.testing.assert_allclose(ours[..., channel], expected, rtol=1e-4, atol=1e-4)
    # A batch transformed on its own gives the same numbers (the statistics are global, not per batch).
    np.testing.assert_array_equal(normalizer(power[1:2]), ours[1:2])


def test_power_to_db_has_librosas_bits(clips):
    power = features.mel_power(clips, 16000, RESOLUTIONS)[..., 3]
    power[2] = 0.0  # silence: the amin floor
    expected = librosa.power_to_db(power, ref=np.max)
    np.testing.assert_array_equal(features.power_to_db(power, power.max()), expected)
    assert features.power_to_db(power, power.max()).min() == -80.0


def test_channel_max_and_fitted_statistics_equal_plain_numpy():
    rng = np.random.default_rng(3)
    parts = [rng.random((5, 7, 9, 3)).astype(np.float32) ** 4, rng.random((2, 7, 9, 3)).astype(np.float32) ** 4]
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(features.channel_max(parts, chunk=3), whole.max(axis=(0, 1, 2)))
    np.testing.assert_array_equal(features.channel_max([whole[:, 0, 0]]), whole[:, 0, 0].max(axis=0))  # 2-D rows
    normalizer = features.Normalizer.fit(parts, "global", chunk=3)
    db = features.power_to_db(whole, np.float32(normalizer.ref)).astype(np.float64)
    np.testing.assert_allclose(normalizer.mean, db.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(normalizer.std, db.std(axis=(0, 1, 2)), rtol=1e-9)
    with pytest.raises(ValueError, match="empty"):
        features.Normalizer.fit([whole[:0]], "global")


def test_per_clip_reference_option(clips):
    power = features.mel_power(clips, 16000, RESOLUTIONS)
    normalizer = features.Normalizer.fit([power], "per_clip")
    db = (normalizer(power) * np.float32(normalizer.std)) + np.float32(normalizer.mean)
    for index in range(len(power)):
        for channel in range(4):
            expected = librosa.power_to_db(power[index, ..., channel], ref=np.max)
            np.testing.assert_allclose(db[index, ..., channel], expected, atol=1e-3)


def _broadcast_normalizer(normalizer, power):
    """The normalisation written as plain broadcasting against the channel axis, in the same operations."""
    power = np.asarray(power, dtype=np.float32)
    ref = power.max(axis=(1, 2), keepdims=True) if normalizer.reference == "per_clip" else np.float32(normalizer.ref)
    db = np.maximum(1e-10, power)
    np.log10(db, out=db)
    db *= 10.0
    db -= 10.0 * np.log10(np.maximum(1e-10, ref))
    np.maximum(db, -normalizer.top_db, out=db)
    db -= np.float32(normalizer.mean)
    db /= np.float32(normalizer.std)
    return db


@pytest.mark.parametrize("reference", ["global", "per_clip"])
def test_the_normalisation_over_merged_axes_has_the_bits_of_plain_broadcasting(reference):
    rng = np.random.default_rng(4)
    power = rng.exponential(size=(5, 6, 7, 4)).astype(np.float32) ** 3
    power[0, 0, 0] = 0.0  # the amin floor
    power[1] *= 1e-9  # the top_db floor
    normalizer = features.Normalizer.fit([power], reference)
    for batch in (power, power[2:3], power[:, :, ::2], power[..., :4][:, 1:]):  # contiguous or not
        np.testing.assert_array_equal(normalizer(batch), _broadcast_normalizer(normalizer, batch))
    whole = features.power_to_db(power, 3.0)  # a scalar reference, and a 2-D array
    np.testing.assert_array_equal(features.power_to_db(power[0, :, :, 1], 3.0), whole[0, ..., 1])


def test_normalizer_round_trips_through_its_config(clips):
    power = features.mel_power(clips, 16000, RESOLUTIONS)
    normalizer = features.Normalizer.fit([power], "global")
    again = features.Normalizer.from_config(normalizer.to_config())
    np.testing.assert_array_equal(again(power), normalizer(power))
    with pytest.raises(ValueError, match="reference"):
        features.Normalizer.fit([power], "per_batch")


def _tones(folder, count):
    folder.mkdir(exist_ok=True)
    return [write_tone(folder / f"{index}.wav") for index in range(count)]


class CountingExtractor:
    """mel_power that counts its calls in a file (it may run in another process) and can fail on demand."""

    def __init__(self, counter, fail_after=None):
        self.counter, self.fail_after = counter, fail_after

    def __call__(self, audio):
        calls = int(self.counter.read_text()) if self.counter.exists() else 0
        if self.fail_after is not None and calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.counter.write_text(str(calls + 1))
        return features.mel_power(audio, 16000, RESOLUTIONS[:1])


def test_cache_is_reused_and_keyed_by_files_and_parameters(tmp_path):
    paths = _tones(tmp_path / "wav", 5)
    counter = tmp_path / "calls"
    arguments = dict(
        audio=AUDIO, params={"p": 1}, cache_dir=tmp_path / "cache", name="t", chunk_size=2, workers=1, progress=False
    )
    first, meta = features.cached_features(paths, extractor=CountingExtractor(counter), **arguments)
    assert first.shape == (5, 64, 101, 1) and meta["count"] == 5 and counter.read_text() == "3"
    samples, _ = sf.read(paths[4], dtype="float32")
    np.testing.assert_allclose(first[4], _librosa_one_clip(samples)[..., :1], rtol=1e-5, atol=1e-10)
    second, _ = features.cached_features(paths, extractor=CountingExtractor(counter), **arguments)
    assert counter.read_text() == "3"  # nothing recomputed
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, second)

    features.cached_features(paths, extractor=CountingExtractor(counter), **{**arguments, "params": {"p": 2}})
    assert counter.read_text() == "6"  # other parameters: computed anew
    write_tone(paths[0], seconds=1.0, channels=2)  # a changed file: computed anew
    features.cached_features(paths, extractor=CountingExtractor(counter), **arguments)
    assert counter.read_text() == "9"


def test_interrupted_extraction_resumes_from_the_last_chunk(tmp_path):
    paths = _tones(tmp_path / "wav", 6)
    counter = tmp_path / "calls"
    arguments = dict(
        audio=AUDIO, params={}, cache_dir=tmp_path / "cache", name="t", chunk_size=2, workers=1, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        features.cached_features(paths, extractor=CountingExtractor(counter, fail_after=2), **arguments)
    assert counter.read_text() == "2"
    resumed, _ = features.cached_features(paths, extractor=CountingExtractor(counter), **arguments)
    assert counter.read_text() == "3"  # only the third chunk was computed
    fresh, _ = features.cached_features(
        paths, extractor=CountingExtractor(tmp_path / "c2"), **{**arguments, "cache_dir": tmp_path / "other"}
    )
    np.testing.assert_array_equal(resumed, fresh)


def test_every_bad_file_is_listed(tmp_path):
    paths = _tones(tmp_path / "wav", 3)
    (tmp_path / "wav" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    (tmp_path / "wav" / "empty.wav").write_bytes(b"")
    paths += [tmp_path / "wav" / "broken.wav", tmp_path / "wav" / "empty.wav"]
    with pytest.raises(features.FeatureCacheError) as error:
        features.cached_features(
            paths,
            audio=AUDIO,
            extractor=CountingExtractor(tmp_path / "c"),
            params={},
            cache_dir=tmp_path / "cache",
            name="t",
            workers=1,
            progress=False,
        )
    message = str(error.value)
    assert message.startswith("2 of 5 audio files cannot be used")
    assert "broken.wav" in message and "empty.wav" in message
    assert not list((tmp_path / "cache").glob("t-*"))  # no finished cache was written


def test_worker_threads_give_the_same_features_in_order(tmp_path):
    # 7 chunks over 2 threads: more than the 4 chunks kept in flight, so the queue refills while results go out.
    paths = [write_tone(tmp_path / f"{index}.wav", seconds=0.5 + 0.1 * index) for index in range(13)]
    audio = features.AudioSpec(sample_rate=16000, num_samples=16000, fix_length=True)
    extractor = features.mel_power_extractor(16000, RESOLUTIONS)
    arguments = dict(audio=audio, extractor=extractor, params={}, name="t", chunk_size=2, progress=False)
    threaded, meta = features.cached_features(paths, cache_dir=tmp_path / "a", workers=2, **arguments)
    serial, _ = features.cached_features(paths, cache_dir=tmp_path / "b", workers=1, **arguments)
    np.testing.assert_array_equal(threaded, serial)
    assert meta["notes"]["padded"] == 5 and meta["notes"]["cropped"] == 7  # 0.5-0.9 s padded, 1.1-1.7 s cropped
    samples, _ = sf.read(paths[12], dtype="float32")
    with threadpool_limits(1):  # the cache's BLAS setting: more BLAS threads change the product's last bit
        np.testing.assert_array_equal(threaded[12], _librosa_one_clip(samples[:16000]))


class FailingExtractor:
    """mel_power that raises on clips of one length (a thread's error must reach the caller)."""

    def __init__(self, bad_samples: int):
        self.bad_samples = bad_samples

    def __call__(self, audio):
        if audio.shape[1] == self.bad_samples:
            raise RuntimeError("extractor failed")
        return features.mel_power(audio, 16000, RESOLUTIONS[:1])


def test_an_error_in_a_worker_thread_stops_the_pass_and_the_rest_resumes(tmp_path):
    paths = _tones(tmp_path / "wav", 8)
    arguments = dict(params={}, cache_dir=tmp_path / "cache", name="t", chunk_size=2, progress=False)
    short = features.AudioSpec(sample_rate=16000, num_samples=8000, fix_length=True)
    with pytest.raises(RuntimeError, match="extractor failed"):
        features.cached_features(paths, audio=short, extractor=FailingExtractor(8000), workers=2, **arguments)
    assert not list((tmp_path / "cache").glob("t-*"))  # nothing finished
    done, _ = features.cached_features(paths, audio=short, extractor=FailingExtractor(1), workers=2, **arguments)
    assert done.shape == (8, 64, 51, 1)
    samples, _ = sf.read(paths[7], dtype="float32")
    np.testing.assert_array_equal(done[7], features.mel_power(samples[None, :8000], 16000, RESOLUTIONS[:1])[0])


def test_batched_mfcc_equals_librosa_clip_by_clip(clips):
    batched = features.mfcc(clips, 16000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40)
    assert batched.shape == (5, 13, 101) and batched.dtype == np.float32
    for index, clip in enumerate(clips):
        expected = librosa.feature.mfcc(y=clip, sr=16000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40)
        np.testing.assert_allclose(batched[index], expected, rtol=1e-5, atol=1e-4)


def test_batched_mfcc_keeps_each_clips_own_db_floor(clips):
    # power_to_db floors at 80 dB below the maximum of what it is given: a loud clip in the batch must not
    # change a quiet clip's floor.
    mixed = np.stack([clips[0] * 30.0, clips[1] * 0.001, np.zeros_like(clips[2])]).astype(np.float32)
    batched = features.mfcc(mixed, 16000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40)
    for index, clip in enumerate(mixed):
        expected = librosa.feature.mfcc(y=clip, sr=16000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40)
        np.testing.assert_allclose(batched[index], expected, rtol=1e-5, atol=1e-3)


def test_mel_power_over_several_fft_blocks_keeps_the_clip_order(clips):
    many = np.concatenate([clips * (1 + index) for index in range(4)])  # 20 clips
    assert len(many) * 101 * 256 > features.FFT_BLOCK_VALUES  # n_fft 256 takes several FFT calls
    batched = features.mel_power(many, 16000, RESOLUTIONS)
    np.testing.assert_array_equal(batched[17], _librosa_one_clip(many[17]))
    np.testing.assert_array_equal(batched[:5], features.mel_power(clips, 16000, RESOLUTIONS))


def test_block_checksums_are_computed_in_threads_and_name_the_damaged_block(tmp_path):
    path = tmp_path / "x.bin"
    content = np.random.default_rng(1).bytes(2500)
    path.write_bytes(content)
    recorded = files.checksums(path, block_bytes=1000, workers=2)
    blocks = [hashlib.sha256(content[start : start + 1000]).hexdigest() for start in (0, 1000, 2000)]
    assert recorded == {"bytes": 2500, "block_bytes": 1000, "sha256": blocks}
    assert files.checksum_mismatch(path, recorded, workers=2) is None
    path.write_bytes(content[:1500] + bytes([content[1500] ^ 1]) + content[1501:])  # one bit
    assert files.checksum_mismatch(path, recorded) == "bytes 1000..1999 of x.bin differ from their checksum"
    path.write_bytes(bytes([content[0] ^ 1]) + content[1:1500] + bytes([content[1500] ^ 1]) + content[1501:])
    assert files.checksum_mismatch(path, recorded, workers=2) == (
        "bytes 0..999 of x.bin differ from their checksum (and 1 more block)"
    )
    path.write_bytes(content[:2400])
    assert files.checksum_mismatch(path, recorded) == "x.bin has 2400 bytes, 2500 recorded"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "meta"])
def test_a_damaged_cache_is_detected_and_computed_again(tmp_path, damage):
    paths = _tones(tmp_path / "wav", 5)
    counter = tmp_path / "calls"
    arguments = dict(
        audio=AUDIO, params={}, cache_dir=tmp_path / "cache", name="t", chunk_size=2, workers=1, progress=False
    )
    first, meta = features.cached_features(paths, extractor=CountingExtractor(counter), **arguments)
    expected = np.array(first)
    (cache,) = (tmp_path / "cache").glob("t-*")
    array_file = cache / "features.npy"
    size = array_file.stat().st_size
    if damage == "garbage":  # 4 KiB of garbage in the middle of the rows: the size and the header stay right
        with open(array_file, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(np.random.default_rng(0).bytes(4096))
        problem = f"bytes 0..{size - 1} of features.npy differ from their checksum"
    elif damage == "truncated":
        with open(array_file, "r+b") as handle:
            handle.truncate(size - 100)
        problem = f"features.npy has {size - 100} bytes, {size} recorded"
    else:
        (cache / "meta.json").write_text('{"name": "t", "co')
        problem = "meta.json is not valid JSON"
    logged = []
    again, again_meta = features.cached_features(
        paths, extractor=CountingExtractor(counter), log=logged.append, **arguments
    )
    assert logged == [f"feature cache {cache} is damaged ({problem}); computing it again"]
    assert counter.read_text() == "6"  # every chunk computed again
    np.testing.assert_array_equal(again, expected)
    assert again_meta["checksums"] == meta["checksums"]
    features.cached_features(paths, extractor=CountingExtractor(counter), log=logged.append, **arguments)
    assert counter.read_text() == "6" and len(logged) == 1  # whole again: read from the cache, nothing said


class WaitingExtractor:
    """An extractor that never finishes: the process building the cache is killed meanwhile."""

    def __call__(self, audio):
        print("building", flush=True)
        time.sleep(600)


def test_a_cache_being_built_by_another_process_is_an_error_and_its_killed_builder_blocks_nothing(tmp_path):
    paths = _tones(tmp_path / "wav", 3)
    arguments = dict(audio=AUDIO, params={}, cache_dir=tmp_path / "cache", name="t", workers=1, progress=False)
    builder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from replicate import features\n"
            "from tests.test_features import AUDIO, WaitingExtractor\n"
            f"features.cached_features({[str(p) for p in paths]!r}, audio=AUDIO, extractor=WaitingExtractor(), "
            f"params={{}}, cache_dir={str(tmp_path / 'cache')!r}, name='t', workers=1, progress=False)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert builder.stdout.readline().strip() == "building"
        with pytest.raises(files.LockedError) as error:
            features.cached_features(paths, extractor=CountingExtractor(tmp_path / "calls"), **arguments)
        (partial,) = (tmp_path / "cache").glob(".t-*.partial")
        cache = partial.parent / partial.name[1 : -len(".partial")]
        assert str(error.value) == f"feature cache {cache} is in use by process {builder.pid}; wait for it to finish"
    finally:
        builder.kill()
        builder.wait()
    built, _ = features.cached_features(paths, extractor=CountingExtractor(tmp_path / "calls"), **arguments)
    assert built.shape == (3, 64, 101, 1)


# --- feature kinds: one spec gives the cache key, the extractor, the manifest entry and inference ---------

SPECS = [
    features.MelPowerSpec(AUDIO, tuple(RESOLUTIONS)),
    features.MelPowerSpec(
        features.AudioSpec(16000, 8000, fix_length=True),
        (features.MelResolution(400, 400, 160, 40, "reflect", mel_scale="htk", mel_norm="none"),),
    ),
    features.MfccSpec(features.AudioSpec(16000, 8000, resample=True, fix_length=True), 13, 512, 256),
]


@pytest.mark.parametrize("spec", SPECS, ids=["dacon-like", "dcase-like", "mfcc"])
def test_a_spec_round_trips_through_its_manifest_entry_and_infers_the_cached_bits(spec, tmp_path):
    entry = spec.to_manifest()
    assert entry["kind"] == spec.kind and entry["audio"] == dataclasses.asdict(spec.audio)
    assert features.FeatureSpec.from_manifest(files.read_json(files.write_json(tmp_path / "m.json", entry))) == spec
    paths = [write_tone(tmp_path / f"{index}.wav", channels=1 + index % 2) for index in range(3)]
    cached, meta = spec.cached(paths, cache_dir=tmp_path / "cache", name="t", workers=2, progress=False)
    # The key is the engine's one formula over the spec's params and audio rules, and the files.
    assert meta["key"] == files.cache_key({"params": spec.params(), "audio": entry["audio"]}, paths)
    assert meta["params"] == spec.params()
    np.testing.assert_array_equal(spec.compute(paths), cached)  # inference: the same bits, no cache


def test_the_dacon_spec_keeps_the_cache_key_of_the_features_it_replaced(tmp_path):
    """The spec's params are those the DACON module wrote by hand before: caches made then are reused."""
    paths = _tones(tmp_path / "wav", 2)
    spec = features.MelPowerSpec(AUDIO, tuple(RESOLUTIONS))
    by_hand = {"kind": "mel_power", "sample_rate": 16000, "resolutions": [vars(r) for r in RESOLUTIONS]}
    assert spec.params() == by_hand
    _, meta = spec.cached(paths, cache_dir=tmp_path / "cache", name="t", workers=1, progress=False)
    digest = hashlib.sha256(
        json.dumps({"params": by_hand, "audio": dataclasses.asdict(AUDIO)}, sort_keys=True).encode()
    )
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    assert meta["key"] == digest.hexdigest()[:16]


def test_a_saved_transform_comes_from_the_manifest_or_from_the_recipe_a_run_before_the_schema_saved():
    normalization = {"reference": "global", "ref": [1.0], "mean": [-40.0], "std": [10.0], "top_db": 80.0}
    manifest = {
        "schema_version": 1,
        "features": {"log_mel": SPECS[1].to_manifest()},
        "preprocessing": {"normalization": normalization},
    }
    spec, normalizer = features.saved_transform(manifest, "log_mel", None, {})
    assert spec == SPECS[1] and normalizer == features.Normalizer.from_config(normalization)
    before_the_schema = {
        "recipe": {"data": {"sample_rate": 16000}, "features": {"n_fft": 400, "mel_scale": "htk"}, "train": {}},
        "normalization": {**normalization, "mean": [-30.0]},
    }
    # the task's spec of the saved tables, whose keys missing then take what the run computed
    recipe, normalizer = features.saved_transform(
        before_the_schema, "log_mel", lambda tables: tables, {"mel_scale": "slaney", "pad_mode": "constant"}
    )
    assert recipe == {
        "data": {"sample_rate": 16000},
        "features": {"n_fft": 400, "mel_scale": "htk", "pad_mode": "constant"},
    }
    assert normalizer.mean == (-30.0,)


def test_an_unknown_feature_kind_in_a_manifest_is_named():
    with pytest.raises(ValueError, match=r"unknown feature kind 'chroma' in the manifest; known: mel_power, mfcc"):
        features.FeatureSpec.from_manifest({"kind": "chroma", "audio": {"sample_rate": 1}})


def test_the_audio_rules_come_from_the_recipes_data_table():
    data = {"sample_rate": 44100, "clip_samples": 44100, "resample": True, "fix_length": True, "other": 1}
    assert features.AudioSpec.from_recipe(data) == features.AudioSpec(44100, 44100, True, True)
