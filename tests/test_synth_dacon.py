"""Synthetic DACON overlapping-speech data: layout, labels, determinism, mixing arithmetic and speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from replicate.synth import dacon  # noqa: E402
from replicate.synth.__main__ import main  # noqa: E402
from replicate.synth.speech import synthesize  # noqa: E402

N_TRAIN, N_TEST, MAX_WORDS = 12, 4, 3
FILES = ("train_answer.csv", "test_answer.csv", "submission.csv")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("dacon")
    summary = dacon.generate(out_dir, N_TRAIN, N_TEST, seed=3, max_words=MAX_WORDS, progress=False)
    return out_dir, summary


def _all_bytes(out_dir: Path) -> dict[str, bytes]:
    files = sorted(path for path in out_dir.rglob("*") if path.is_file())
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in files}


def test_layout_and_wav_format(dataset):
    out_dir, summary = dataset
    assert summary["n_train"] == N_TRAIN and summary["n_test"] == N_TEST
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(("test", "train") + FILES)
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        expected = sorted(f"{index}.wav" for index in range(count))
        assert sorted(path.name for path in (out_dir / split).iterdir()) == expected
        for path in (out_dir / split).iterdir():
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
            audio, _ = sf.read(path)
            assert np.sqrt(np.mean(audio**2)) > 0.01


def test_answers_and_submission(dataset):
    out_dir, _ = dataset
    for name, count in (("train_answer.csv", N_TRAIN), ("test_answer.csv", N_TEST)):
        table = pd.read_csv(out_dir / name)
        assert list(table.columns) == ["id", *dacon.WORDS]
        assert table["id"].tolist() == list(range(count))
        labels = table[list(dacon.WORDS)].to_numpy()
        assert np.all(labels >= 0)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
        assert np.all(((labels > 0).sum(axis=1) >= 1) & ((labels > 0).sum(axis=1) <= MAX_WORDS))
    submission = pd.read_csv(out_dir / "submission.csv")
    assert list(submission.columns) == ["id", *dacon.WORDS]
    assert submission["id"].tolist() == list(range(N_TEST))
    assert not submission[list(dacon.WORDS)].to_numpy().any()
    assert dacon.WORDS[:3] == ("zero", "one", "two") and dacon.WORDS[-1] == "twenty-nine"
    assert len(set(dacon.WORDS)) == 30


def test_same_seed_same_bytes_and_other_seed_differs(dataset, tmp_path):
    out_dir, _ = dataset
    dacon.generate(tmp_path / "again", N_TRAIN, N_TEST, seed=3, max_words=MAX_WORDS, progress=False)
    assert _all_bytes(tmp_path / "again") == _all_bytes(out_dir)
    command = ["dacon", "--out", str(tmp_path / "other"), "--n-train", "12", "--n-test", "4", "--seed", "4"]
    assert main(command) == 0
    original, other = _all_bytes(out_dir), _all_bytes(tmp_path / "other")
    assert other.keys() == original.keys()
    assert other["train/0.wav"] != original["train/0.wav"]
    assert other["train_answer.csv"] != original["train_answer.csv"]


@pytest.mark.parametrize(
    ("arguments", "name"),
    [((0, 4, 3), "n_train"), ((4, 0, 3), "n_test"), ((4, 4, 0), "max_words"), ((4, 4, 31), "max_words")],
)
def test_argument_validation(tmp_path, arguments, name):
    n_train, n_test, max_words = arguments
    with pytest.raises(ValueError, match=name):
        dacon.generate(tmp_path, n_train, n_test, max_words=max_words, progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_rejects_bad_counts(tmp_path):
    with pytest.raises(SystemExit):
        main(["dacon", "--out", str(tmp_path), "--n-train", "0", "--n-test", "1"])


def _tone(amplitude: float, length: int, period: int = 10) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * np.arange(length) / period)  # energy = amplitude**2 * length / 2


def test_mix_clip_shares_of_two_tones():
    # A: 100 samples at amplitude 0.5, fully inside; B: 200 samples at amplitude 1 from sample 50, so its
    # last 50 samples fall beyond the 200-sample clip.
    quiet, loud = _tone(0.5, 100), _tone(1.0, 200)
    audio, shares = dacon.mix_clip([quiet, loud], [0.0, 0.0], [0, 50], 200, peak=None)
    energies = np.array([0.25 * 100 / 2, 1.0 * 150 / 2])
    np.testing.assert_allclose(shares, energies / energies.sum())
    np.testing.assert_allclose(audio[:50], quiet[:50], atol=1e-6)
    np.testing.assert_allclose(audio[100:], loud[50:150], atol=1e-6)


def test_mix_clip_gain_and_cut_at_the_start():
    # +20 dB multiplies energy by 100; a start at -40 leaves 60 of 100 samples inside.
    first, second = _tone(1.0, 100), _tone(1.0, 100)
    _, shares = dacon.mix_clip([first, second], [20.0, 0.0], [-40, 100], 200, peak=None)
    energies = np.array([100 * 60 / 2, 100 / 2])
    np.testing.assert_allclose(shares, energies / energies.sum())


def test_mix_clip_noise_and_peak_leave_shares_alone():
    tones = [_tone(1.0, 100), _tone(0.3, 80)]
    _, clean = dacon.mix_clip(tones, [0.0, 3.0], [10, 60], 160, peak=None)
    noise = np.random.default_rng(0).standard_normal(160)
    audio, noisy = dacon.mix_clip(tones, [0.0, 3.0], [10, 60], 160, noise=noise, peak=0.9)
    np.testing.assert_allclose(noisy, clean)
    assert audio.dtype == np.float32 and audio.shape == (160,)
    assert np.max(np.abs(audio)) == pytest.approx(0.9, rel=1e-6)


def test_mix_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        dacon.mix_clip([_tone(1.0, 10)], [0.0, 1.0], [0], 20)
    with pytest.raises(ValueError, match="energy"):
        dacon.mix_clip([_tone(1.0, 10)], [0.0], [30], 20)


def test_synthesize_speaks_a_word():
    audio = synthesize("seven")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.2 <= len(audio) / 16000 <= 1.5
    assert np.sqrt(np.mean(audio**2)) > 0.02 and np.max(np.abs(audio)) <= 1.0
    np.testing.assert_array_equal(audio, synthesize("seven"))
    assert not np.array_equal(audio, synthesize("seven", voice="en-us+f2"))
    with pytest.raises(RuntimeError, match="no voice"):
        synthesize("seven", voice="no-such-voice")


def test_voice_settings_per_word_and_seen_or_unseen_test_voices():
    rng = np.random.default_rng(0)
    train_bank, test_bank = dacon._render_banks(rng, 16000, voices_per_word=1, unseen_test_voices=False)
    assert len(train_bank) == 30 and all(len(utterances) == 1 for utterances in train_bank)
    assert all(test[0] is train[0] for train, test in zip(train_bank, test_bank, strict=True))
    train_bank, test_bank = dacon._render_banks(
        np.random.default_rng(0), 16000, voices_per_word=2, unseen_test_voices=True
    )
    assert all(len(utterances) == 2 for utterances in test_bank)
    assert not any(
        np.array_equal(a, b) for train, test in zip(train_bank, test_bank, strict=True) for a in train for b in test
    )
    with pytest.raises(ValueError, match="voices_per_word"):
        dacon.generate("unused", 1, 1, voices_per_word=0, progress=False)
