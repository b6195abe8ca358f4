"""The source-filter voice synthesiser: its clinical parameters are what the rendered voices measure."""

import dataclasses

import librosa
import numpy as np
import pytest

from replicate.synth import voice


def _male_a(**changes):
    healthy = voice.Voice(f0_hz=120.0, formants_hz=voice.VOWEL_FORMANTS["a"], bandwidths_hz=voice.FORMANT_BANDWIDTHS_HZ)
    return dataclasses.replace(healthy, **changes)


def _local_variation(values):
    return float(np.mean(np.abs(np.diff(values))) / np.mean(values))


@pytest.mark.parametrize("jitter, shimmer", [(0.005, 0.02), (0.03, 0.10)])
def test_cycles_carry_the_requested_jitter_shimmer_and_f0(jitter, shimmer):
    _, periods, amplitudes = voice.glottal_cycles(
        _male_a(jitter=jitter, shimmer=shimmer), 30.0, np.random.default_rng(0)
    )
    assert _local_variation(periods) == pytest.approx(jitter, rel=0.1)
    assert _local_variation(amplitudes) == pytest.approx(shimmer, rel=0.1)
    assert 1 / periods.mean() == pytest.approx(120.0, rel=0.01)


def test_tremor_modulates_f0_at_its_rate():
    starts, periods, _ = voice.glottal_cycles(
        _male_a(jitter=0.0, tremor_hz=5.0, tremor_depth=0.05), 10.0, np.random.default_rng(0)
    )
    f0 = np.interp(np.arange(0, 10, 0.01), starts, 1 / periods)  # F0 contour sampled at 100 Hz
    spectrum = np.abs(np.fft.rfft(f0 - f0.mean()))
    assert np.fft.rfftfreq(f0.size, 0.01)[spectrum.argmax()] == pytest.approx(5.0, abs=0.15)
    assert (f0.max() - f0.min()) / 2 / f0.mean() == pytest.approx(0.05, rel=0.1)


def test_diplophonia_alternates_cycles_and_breaks_silence_some():
    _, periods, amplitudes = voice.glottal_cycles(
        _male_a(jitter=0.0, shimmer=0.0, diplophonia=0.2), 1.0, np.random.default_rng(0)
    )
    assert np.allclose(amplitudes[0::2], 1.2) and np.allclose(amplitudes[1::2], 0.8)
    assert periods[0] / periods[1] == pytest.approx(1.1 / 0.9)
    _, _, amplitudes = voice.glottal_cycles(_male_a(breaks_per_s=2.0, break_s=0.1), 60.0, np.random.default_rng(0))
    assert np.mean(amplitudes == 0) == pytest.approx(0.2, abs=0.07)  # 2 breaks/s x 0.1 s, a little overlap


def test_rendered_vowel_has_its_f0_and_formants():
    samples = voice.synthesize(_male_a(hnr_db=40.0), 1.0, 16_000, np.random.default_rng(0))
    assert samples.dtype == np.float32 and samples.shape == (16_000,)
    assert np.abs(samples).max() == pytest.approx(voice.PEAK)
    f0 = librosa.yin(samples, fmin=60, fmax=400, sr=16_000)
    assert np.median(f0) == pytest.approx(120.0, rel=0.02)
    # Formants from the roots of a linear-prediction fit, as phoneticians measure them.
    roots = np.roots(librosa.lpc(samples.astype(np.float64)[2000:10000], order=10))
    roots = roots[(np.imag(roots) > 0) & (np.abs(roots) > 0.9)]
    estimates = np.sort(np.angle(roots) * 16_000 / (2 * np.pi))
    for formant in voice.VOWEL_FORMANTS["a"][:3]:
        assert np.min(np.abs(estimates - formant)) < 0.08 * formant


def test_more_aspiration_noise_means_a_flatter_spectrum():
    flatness = [
        float(
            librosa.feature.spectral_flatness(
                y=voice.synthesize(_male_a(hnr_db=hnr), 0.5, 16_000, np.random.default_rng(0))
            ).mean()
        )
        for hnr in (30.0, 15.0, 0.0)
    ]
    assert flatness[0] < flatness[1] < flatness[2]


def test_same_rng_same_samples_at_any_rate():
    for sample_rate in (16_000, 44_100):
        first = voice.synthesize(_male_a(), 0.3, sample_rate, np.random.default_rng(7))
        again = voice.synthesize(_male_a(), 0.3, sample_rate, np.random.default_rng(7))
        other = voice.synthesize(_male_a(), 0.3, sample_rate, np.random.default_rng(8))
        assert first.shape == (round(0.3 * sample_rate),)
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)


def test_speaker_follows_sex_and_age_and_rejects_bad_values():
    rng = np.random.default_rng(0)
    male = np.median([voice.speaker("M", 40, "a", rng).f0_hz for _ in range(200)])
    female = np.median([voice.speaker("F", 40, "a", rng).f0_hz for _ in range(200)])
    old_male = np.median([voice.speaker("M", 80, "a", rng).f0_hz for _ in range(200)])
    assert male < old_male < female
    healthy = voice.speaker("F", 30, "i", rng)
    assert healthy.jitter < 0.01 and healthy.shimmer < 0.035 and healthy.hnr_db >= 18
    with pytest.raises(ValueError, match="sex"):
        voice.speaker("X", 40, "a", rng)
    with pytest.raises(ValueError, match="vowel"):
        voice.speaker("M", 40, "y", rng)
    with pytest.raises(ValueError, match="jitter"):
        _male_a(jitter=0.7)
    with pytest.raises(ValueError, match="bandwidth"):
        voice.Voice(f0_hz=100.0, formants_hz=(500.0, 1500.0), bandwidths_hz=(50.0,))
