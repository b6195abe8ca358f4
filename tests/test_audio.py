"""Audio reading: each unusable file is refused with its name and the reason; stated rules are applied."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from replicate.audio import AudioError, read_audio, wav_files
from tests.conftest import write_tone


def test_reads_mono_float32(tmp_path):
    samples, notes = read_audio(write_tone(tmp_path / "a.wav"), 16000, num_samples=16000)
    assert samples.dtype == np.float32 and samples.shape == (16000,)
    assert not any(vars(notes).values())


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio")
    with pytest.raises(AudioError, match=r"corrupt\.wav: cannot read audio"):
        read_audio(path, 16000)


def test_empty_file_and_zero_length_audio(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav"):
        read_audio(tmp_path / "empty.wav", 16000)
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"zero\.wav: the file has no samples"):
        read_audio(tmp_path / "zero.wav", 16000)


def test_non_finite_samples(tmp_path):
    samples = np.zeros(100, dtype=np.float32)
    samples[10] = np.nan
    sf.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: the audio contains NaN"):
        read_audio(tmp_path / "nan.wav", 16000)


def test_wrong_sample_rate_is_refused_unless_resampling(tmp_path):
    path = write_tone(tmp_path / "rate.wav", sample_rate=8000)
    with pytest.raises(AudioError, match=r"rate\.wav: sample rate is 8000 Hz, the recipe expects 16000 Hz"):
        read_audio(path, 16000)
    samples, notes = read_audio(path, 16000, resample=True)
    assert samples.shape == (16000,) and notes.resampled


def test_several_channels_are_mixed_to_mono(tmp_path):
    path = write_tone(tmp_path / "stereo.wav", channels=2, subtype="FLOAT")
    samples, notes = read_audio(path, 16000)
    both, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(samples, both.mean(axis=1), atol=1e-7)
    assert notes.mixed_to_mono


def test_length_rule(tmp_path):
    short = write_tone(tmp_path / "short.wav", seconds=0.5)
    with pytest.raises(AudioError, match=r"short\.wav: 8000 samples, the recipe expects exactly 16000"):
        read_audio(short, 16000, num_samples=16000)
    padded, notes = read_audio(short, 16000, num_samples=16000, fix_length=True)
    assert padded.shape == (16000,) and notes.padded and not padded[8000:].any()
    cropped, notes = read_audio(
        write_tone(tmp_path / "long.wav", seconds=1.5), 16000, num_samples=16000, fix_length=True
    )
    assert cropped.shape == (16000,) and notes.cropped


@pytest.mark.parametrize("value", [1e30, -40.0, np.inf])
def test_a_float_wav_far_outside_full_scale_is_refused(tmp_path, value):
    samples = np.full(1600, 0.1, dtype=np.float32)
    samples[10] = value
    sf.write(tmp_path / "loud.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"loud\.wav: (.*above full scale|.*NaN or infinite)"):
        read_audio(tmp_path / "loud.wav", 16000)


def test_a_float_wav_a_few_db_over_full_scale_is_read(tmp_path):
    # Resampling and mastering leave float files a little over 1.0: that is audio, not an error.
    samples = np.full(1600, 0.1, dtype=np.float32)
    samples[10], samples[20] = 1.4, -2.5
    sf.write(tmp_path / "hot.wav", samples, 16000, subtype="FLOAT")
    read, _ = read_audio(tmp_path / "hot.wav", 16000)
    assert read[10] == np.float32(1.4) and read[20] == np.float32(-2.5)


def test_wav_files_expands_folders_by_name_and_names_what_is_missing(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    for name in ("b.wav", "a.wav", "notes.txt"):
        (folder / name).write_bytes(b"")
    single = tmp_path / "c.wav"
    single.write_bytes(b"")
    assert wav_files([single, folder]) == [single, folder / "a.wav", folder / "b.wav"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AudioError, match=rf"^{empty}: no .wav files in the folder$"):
        wav_files([single, empty])
    with pytest.raises(AudioError, match=rf"^{tmp_path / 'absent.wav'}: no such file or folder$"):
        wav_files([tmp_path / "absent.wav"])
    with pytest.raises(AudioError, match="^no audio files given$"):
        wav_files([])
