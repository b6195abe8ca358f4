"""Synthetic data in the exact layout of the DACON overlapping-speech competition.

Each clip is 1 s of 16 kHz mono audio in which 1..``max_words`` spoken words from a 30-word vocabulary
("zero" .. "twenty-nine") overlap; the target is each word's share of the mixture's energy. Words are real
speech synthesised by espeak-ng with varied voices, pitches and speaking rates. Layout written::

    out_dir/train/<id>.wav        16-bit PCM, exactly one second, ids 0..n_train-1
    out_dir/test/<id>.wav         ids 0..n_test-1
    out_dir/train_answer.csv      id + 30 word columns, rows sum to 1
    out_dir/submission.csv        same columns, test ids, all 0: the template to fill in
    out_dir/test_answer.csv       answers for the test clips

``test_answer.csv`` exists only because the data are synthetic, so held-out clips can be scored; the real
competition data has no such file. Train and test use disjoint voice settings for every word, so test
scores measure generalisation to unheard speakers.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from replicate import files
from replicate.synth.speech import ENGLISH_VOICES, PITCHES, RATES_WPM, VOICE_VARIANTS, synthesize

_UNITS = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
WORDS: tuple[str, ...] = _UNITS + ("twenty",) + tuple(f"twenty-{unit}" for unit in _UNITS[1:10])

VARIANTS_PER_WORD = 6  # utterances per word and split
UTTERANCE_RMS = 0.1  # every utterance is levelled to this before its random gain
GAIN_RANGE_DB = 12.0  # gains are uniform in +-GAIN_RANGE_DB/2
MIN_INSIDE_FRACTION = 0.6  # at least this much of each word lies inside the clip
NOISE_DB = -50.0  # white background noise relative to the word mixture's RMS
PEAK = 0.9


def mix_clip(
    utterances: Sequence[np.ndarray],
    gains_db: Sequence[float],
    offsets: Sequence[int],
    length: int,
    *,
    noise: np.ndarray | None = None,
    noise_db: float = NOISE_DB,
    peak: float | None = PEAK,
) -> tuple[np.ndarray, np.ndarray]:
    """Place words in a clip and measure each one's share of the word energy.

    Args:
        utterances: One waveform per word.
        gains_db: Gain applied to each word.
        offsets: Start sample of each word in the clip; negative or late starts cut the word at the edges.
        length: Clip length in samples.
        noise: Optional unit-variance noise of ``length`` samples, added at ``noise_db`` below the word mix.
        noise_db: Noise level relative to the RMS of the summed words.
        peak: Scale the finished clip to this peak amplitude; None leaves the level alone.

    Returns:
        The clip (float32, ``length`` samples) and each word's share of the in-clip word energy (sums to 1).
    """
    if not len(utterances) == len(gains_db) == len(offsets):
        raise ValueError("utterances, gains_db and offsets must have the same length")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    mix = np.zeros(length, dtype=np.float64)
    energies = np.zeros(len(utterances), dtype=np.float64)
    for index, (utterance, gain_db, offset) in enumerate(zip(utterances, gains_db, offsets, strict=True)):
        offset = int(offset)
        start, stop = max(offset, 0), min(offset + len(utterance), length)
        if stop <= start:
            continue
        part = np.asarray(utterance, dtype=np.float64)[start - offset : stop - offset]
        part = part * 10.0 ** (gain_db / 20.0)
        mix[start:stop] += part
        energies[index] = np.sum(part**2)
    total = energies.sum()
    if total <= 0:
        raise ValueError("no word has any energy inside the clip")
    if noise is not None:
        if noise.shape != (length,):
            raise ValueError(f"noise must have shape ({length},), got {noise.shape}")
        mix += noise * np.sqrt(np.mean(mix**2)) * 10.0 ** (noise_db / 20.0)
    if peak is not None:
        mix *= peak / max(np.max(np.abs(mix)), 1e-12)  # one scale for all words keeps the shares unchanged
    return mix.astype(np.float32), energies / total


def _render_banks(
    rng: np.random.Generator, sample_rate: int, voices_per_word: int, unseen_test_voices: bool
) -> tuple[list[list[np.ndarray]], ...]:
    """Render `voices_per_word` utterances per word for train and for test: with `unseen_test_voices`,
    the test utterances use other voice settings than the training ones, else the same utterances."""
    settings = list(itertools.product(ENGLISH_VOICES, VOICE_VARIANTS, PITCHES, RATES_WPM))
    train_bank, test_bank = [], []
    for word in WORDS:
        chosen = rng.choice(len(settings), size=2 * voices_per_word, replace=False)
        utterances = []
        for setting_index in chosen:
            voice, variant, pitch, rate = settings[setting_index]
            audio = synthesize(word, voice=voice + variant, rate_wpm=rate, pitch=pitch, sample_rate=sample_rate)
            utterances.append(audio * (UTTERANCE_RMS / np.sqrt(np.mean(audio.astype(np.float64) ** 2))))
        train_bank.append(utterances[:voices_per_word])
        test_bank.append(utterances[voices_per_word:] if unseen_test_voices else utterances[:voices_per_word])
    return train_bank, test_bank


def _word_count_probabilities(max_words: int) -> np.ndarray:
    # Overlap is the point of the task, so single words are half as likely as each larger count.
    weights = np.array([1.0] + [2.0] * (max_words - 1))
    return weights / weights.sum()


def _draw_clip(
    rng: np.random.Generator, bank: list[list[np.ndarray]], max_words: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random clip; returns the audio and its 30-value label row."""
    count = 1 + rng.choice(max_words, p=_word_count_probabilities(max_words))
    words = rng.choice(len(WORDS), size=count, replace=False)
    utterances = [bank[word][rng.integers(len(bank[word]))] for word in words]
    gains_db = rng.uniform(-GAIN_RANGE_DB / 2, GAIN_RANGE_DB / 2, size=count)
    offsets = []
    for utterance in utterances:
        earliest = -int(np.floor((1 - MIN_INSIDE_FRACTION) * len(utterance)))
        latest = max(length - int(np.ceil(MIN_INSIDE_FRACTION * len(utterance))), earliest)
        offsets.append(int(rng.integers(earliest, latest + 1)))
    noise = rng.standard_normal(length)
    audio, shares = mix_clip(utterances, gains_db, offsets, length, noise=noise)
    row = np.zeros(len(WORDS))
    row[words] = shares
    return audio, row


def _round_row(row: np.ndarray, decimals: int = 6) -> np.ndarray:
    """Round to ``decimals`` and push the rounding error into the largest entry, so the row sums to 1."""
    rounded = np.round(row, decimals)
    largest = int(np.argmax(rounded))
    rounded[largest] = np.round(rounded[largest] + 1.0 - rounded.sum(), decimals)
    return rounded


def _write_csv(path: Path, rows: np.ndarray, *, integer_values: bool = False) -> None:
    lines = [",".join(("id",) + WORDS)]
    for index, row in enumerate(rows):
        values = ("0" for _ in row) if integer_values else (f"{value:.6f}" for value in row)
        lines.append(f"{index}," + ",".join(values))
    files.write_text(path, "\n".join(lines) + "\n")


def _write_split(
    folder: Path,
    count: int,
    rng: np.random.Generator,
    bank: list[list[np.ndarray]],
    *,
    max_words: int,
    sample_rate: int,
    progress: bool,
) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.wav"):  # clips left over from an earlier, larger run
        if stale.stem.isdigit() and int(stale.stem) >= count:
            stale.unlink()
    rows = np.zeros((count, len(WORDS)))
    for index in tqdm(range(count), desc=f"{folder.name} clips", disable=not progress):
        audio, row = _draw_clip(rng, bank, max_words, sample_rate)
        rows[index] = _round_row(row)
        with files.atomic_path(folder / f"{index}.wav", suffix=".wav") as temporary:
            sf.write(temporary, audio, sample_rate, subtype="PCM_16", format="WAV")
    return rows


def generate(
    out_dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    max_words: int = 3,
    voices_per_word: int = VARIANTS_PER_WORD,
    unseen_test_voices: bool = True,
    sample_rate: int = 16000,
    progress: bool = True,
) -> dict:
    """Write a synthetic dataset in the DACON overlapping-speech layout; the same seed gives identical bytes.

    Args:
        out_dir: Folder to write into (created if missing; earlier files are overwritten).
        n_train: Number of training clips.
        n_test: Number of test clips.
        seed: Seed of every random choice.
        max_words: Most words overlapping in one clip (1..30).
        voices_per_word: Voice settings (voice, timbre, pitch, rate) per word and split.
        unseen_test_voices: Test clips use other voice settings than training clips (unseen speakers);
            if False, the same utterances (an easier, within-speaker test).
        sample_rate: Sample rate in Hz; every clip is one second long.
        progress: Show a progress bar over clips.

    Returns:
        Summary with the counts, the seed and the paths written.
    """
    _check_arguments(n_train, n_test, max_words, voices_per_word, sample_rate)
    out_dir = Path(out_dir)
    streams = np.random.SeedSequence(seed).spawn(3)
    bank_rng, train_rng, test_rng = (np.random.default_rng(stream) for stream in streams)
    train_bank, test_bank = _render_banks(bank_rng, sample_rate, voices_per_word, unseen_test_voices)
    clip_settings = {"max_words": max_words, "sample_rate": sample_rate, "progress": progress}
    train_rows = _write_split(out_dir / "train", n_train, train_rng, train_bank, **clip_settings)
    test_rows = _write_split(out_dir / "test", n_test, test_rng, test_bank, **clip_settings)
    _write_csv(out_dir / "train_answer.csv", train_rows)
    _write_csv(out_dir / "test_answer.csv", test_rows)
    _write_csv(out_dir / "submission.csv", np.zeros_like(test_rows), integer_values=True)
    return {
        "out_dir": str(out_dir),
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "max_words": max_words,
        "sample_rate": sample_rate,
        "voices_per_word": voices_per_word,
        "unseen_test_voices": unseen_test_voices,
        "train_answer": str(out_dir / "train_answer.csv"),
        "test_answer": str(out_dir / "test_answer.csv"),
        "submission": str(out_dir / "submission.csv"),
    }


def _check_arguments(n_train: int, n_test: int, max_words: int, voices_per_word: int, sample_rate: int) -> None:
    """Raise `ValueError` naming the first of `generate`'s arguments that is out of its range."""
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    if n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")
    if not 1 <= max_words <= len(WORDS):
        raise ValueError(f"max_words must be between 1 and {len(WORDS)}, got {max_words}")
    if not 1 <= voices_per_word <= 100:
        raise ValueError(f"voices_per_word must be between 1 and 100, got {voices_per_word}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz, got {sample_rate}")
