"""Reading audio files: validated, mono, at the recipe's sample rate, with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The largest sample magnitude a usable file may have, 4.0 = +12 dBFS. Integer PCM is within [-1, 1) by
# construction; a float file may go a few dB over full scale after resampling (inter-sample peaks, about
# +3 dB at worst) or unlimited mastering, so a strict [-1, 1] would refuse real recordings. A sample ten
# times full scale or more is not audio any more: a corrupt value (a 1e30 makes the power spectrum
# overflow to inf and every statistic NaN) or the wrong scale (int16 values stored as floats).
PEAK_LIMIT = 4.0


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioNotes:
    """What was done to one file to make it usable; summed over a data set and shown in the report."""

    mixed_to_mono: bool = False
    resampled: bool = False
    padded: bool = False
    cropped: bool = False


def read_audio(
    path: str | os.PathLike,
    sample_rate: int,
    *,
    resample: bool = False,
    num_samples: int | None = None,
    fix_length: bool = False,
) -> tuple[np.ndarray, AudioNotes]:
    """Read one file as float32 mono, in [-1, 1] (a float file: within ±`PEAK_LIMIT`).

    Rules: several channels are mixed to mono (their mean) and counted; a different sample rate is an
    error unless `resample` is on (then librosa's default soxr resampler is used); with `num_samples` set,
    a different length is an error unless `fix_length` is on (zero-pad at the end or crop the end, counted).

    Args:
        path: the audio file.
        sample_rate: the rate the recipe expects.
        resample: resample other rates instead of rejecting them.
        num_samples: the length every clip must have, or None for any length.
        fix_length: pad or crop to `num_samples` instead of rejecting other lengths.

    Returns:
        (samples of shape (n,), notes on what was changed).

    Raises:
        AudioError: unreadable or corrupt file, no samples, non-finite samples, a sample beyond ±`PEAK_LIMIT`,
            wrong rate or length.
    """
    samples, file_rate = _read_valid(path)
    mixed = samples.shape[1] > 1
    samples = samples.mean(axis=1) if mixed else samples[:, 0]
    resampled = file_rate != sample_rate
    if resampled:
        if not resample:
            raise AudioError(
                f"{path}: sample rate is {file_rate} Hz, the recipe expects {sample_rate} Hz "
                "(set data.resample=true to resample)"
            )
        import librosa  # imported here: reading needs only soundfile

        samples = librosa.resample(samples, orig_sr=file_rate, target_sr=sample_rate).astype(np.float32)

    padded = cropped = False
    if num_samples is not None and samples.shape[0] != num_samples:
        if not fix_length:
            raise AudioError(
                f"{path}: {samples.shape[0]} samples, the recipe expects exactly {num_samples} "
                "(set data.fix_length=true to zero-pad or crop)"
            )
        padded, cropped = samples.shape[0] < num_samples, samples.shape[0] > num_samples
        samples = np.pad(samples[:num_samples], (0, max(0, num_samples - samples.shape[0])))
    return samples, AudioNotes(mixed, resampled, padded, cropped)


def _read_valid(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The file's float32 samples (samples, channels) and its rate; `AudioError` for an unreadable file, no
    samples, non-finite samples or a sample beyond ±`PEAK_LIMIT`."""
    import soundfile as sf  # imported here: the models and benchmarks run where no audio is read (a GPU box)

    try:
        samples, file_rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise AudioError(f"{path}: cannot read audio ({error})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file has no samples (zero-length audio)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > PEAK_LIMIT:
        raise AudioError(
            f"{path}: a sample of magnitude {peak:.3g} is {20 * np.log10(peak):.0f} dB above full scale; audio "
            f"must lie within [-1, 1] (a float file may go a little over, up to ±{PEAK_LIMIT:g})"
        )
    return samples, file_rate


def wav_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named, a folder standing for its .wav files (sorted by name); `AudioError` naming what is
    not there."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.wav"))
            if not found:
                raise AudioError(f"{item}: no .wav files in the folder")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise AudioError(f"{item}: no such file or folder")
    if not paths:
        raise AudioError("no audio files given")
    return paths
