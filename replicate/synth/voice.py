"""A source-filter voice synthesiser for sustained vowels, healthy or pathological.

A Rosenberg glottal pulse train (the source) goes through a cascade of formant resonators (the vocal tract).
Each glottal cycle gets its own period and amplitude, which is where voice pathology shows up in acoustic
analysis: cycle-to-cycle period variation (jitter), amplitude variation (shimmer), turbulent aspiration noise
(a low harmonics-to-noise ratio), slow modulation (tremor), two alternating oscillation regimes (diplophonia)
and moments without voicing (breaks). The parameters are named and scaled as the clinical measures are
(local jitter and shimmer as fractions, HNR in dB), so a class profile can be read against the usual
thresholds: healthy voices have jitter below 1 %, shimmer below 3.5 % and HNR of 18 dB or more.

    rng = np.random.default_rng(0)
    healthy = voice.speaker("F", age=42, vowel="a", rng=rng)
    rough = dataclasses.replace(healthy, jitter=0.025, shimmer=0.08, hnr_db=9.0)
    samples = voice.synthesize(rough, duration_s=1.0, sample_rate=44_100, rng=rng)   # float32, shape (44100,)

Used by the MAIC 2021 (16 kHz) and AI CUP 2023 (44.1 kHz) synthetic data generators, each with its own
class profiles.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import signal

# Adult male formant frequencies F1-F4 in Hz (Peterson & Barney 1952, rounded).
VOWEL_FORMANTS: dict[str, tuple[float, float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0, 3400.0),
    "e": (530.0, 1840.0, 2480.0, 3500.0),
    "i": (270.0, 2290.0, 3010.0, 3700.0),
    "o": (570.0, 840.0, 2410.0, 3400.0),
    "u": (300.0, 870.0, 2240.0, 3400.0),
}
FORMANT_BANDWIDTHS_HZ = (60.0, 90.0, 120.0, 150.0)
# A female vocal tract is about 15 % shorter, which raises every formant by about as much.
FEMALE_FORMANT_SCALE = 1.17

# Mean speaking F0 by age (Hz): male F0 falls into middle age and rises again in old age; female F0 falls
# after menopause (e.g. Nishio & Niimi 2008). Linear between the points, constant outside.
F0_BY_AGE_HZ = {
    "M": ((20.0, 40.0, 60.0, 80.0), (125.0, 118.0, 120.0, 140.0)),
    "F": ((20.0, 40.0, 60.0, 80.0), (215.0, 205.0, 190.0, 185.0)),
}
SEXES = tuple(F0_BY_AGE_HZ)

RAMP_S = 0.02
PEAK = 0.5


@dataclasses.dataclass(frozen=True)
class Voice:
    """Everything that defines one sustained vowel.

    Args:
        f0_hz: mean fundamental frequency.
        formants_hz: formant frequencies of the vocal tract, F1 first.
        bandwidths_hz: one bandwidth per formant.
        open_quotient: open phase of the Rosenberg pulse as a fraction of the period.
        jitter: local jitter, the expected mean |T_i - T_(i+1)| over the mean period (0.01 = 1 %).
        shimmer: local shimmer, the expected mean |A_i - A_(i+1)| over the mean amplitude.
        hnr_db: harmonics-to-noise ratio of the aspiration noise at the glottal source, in dB.
        tremor_hz: rate of a slow sinusoidal F0 and amplitude modulation (3-8 Hz in pathological tremor).
        tremor_depth: relative depth of that modulation (0.05 = ±5 %).
        diplophonia: relative period and amplitude difference between alternate cycles.
        breaks_per_s: rate of voice breaks (voicing stops, the breath noise goes on), a Poisson process.
        break_s: mean length of a break (exponentially distributed).
    """

    f0_hz: float
    formants_hz: tuple[float, ...]
    bandwidths_hz: tuple[float, ...]
    open_quotient: float = 0.6
    jitter: float = 0.004
    shimmer: float = 0.02
    hnr_db: float = 25.0
    tremor_hz: float = 0.0
    tremor_depth: float = 0.0
    diplophonia: float = 0.0
    breaks_per_s: float = 0.0
    break_s: float = 0.08

    def __post_init__(self):
        if not self.f0_hz > 0:
            raise ValueError(f"f0_hz must be positive, got {self.f0_hz}")
        if len(self.formants_hz) != len(self.bandwidths_hz):
            raise ValueError(
                f"{len(self.formants_hz)} formants but {len(self.bandwidths_hz)} bandwidths: give one bandwidth each"
            )
        if not 0.1 <= self.open_quotient <= 0.95:
            raise ValueError(f"open_quotient must be in [0.1, 0.95], got {self.open_quotient}")
        for name in ("jitter", "shimmer", "tremor_depth", "diplophonia"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")
        for name in ("tremor_hz", "breaks_per_s", "break_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def speaker(sex: str, age: float, vowel: str, rng: np.random.Generator) -> Voice:
    """A healthy voice for a speaker of this sex and age saying this vowel.

    F0 follows the sex and age curve with a per-speaker spread of about 8 %; formants are the vowel's, scaled
    for sex, with a 5 % per-speaker vocal-tract spread; jitter, shimmer and HNR are drawn from healthy ranges.
    """
    if sex not in F0_BY_AGE_HZ:
        raise ValueError(f"sex must be one of {SEXES}, got {sex!r}")
    if vowel not in VOWEL_FORMANTS:
        raise ValueError(f"vowel must be one of {sorted(VOWEL_FORMANTS)}, got {vowel!r}")
    if not 0 < age < 130:
        raise ValueError(f"age must be in (0, 130) years, got {age}")
    ages, f0s = F0_BY_AGE_HZ[sex]
    f0 = float(np.interp(age, ages, f0s)) * math.exp(rng.normal(0.0, 0.08))
    tract = (FEMALE_FORMANT_SCALE if sex == "F" else 1.0) * math.exp(rng.normal(0.0, 0.05))
    return Voice(
        f0_hz=f0,
        formants_hz=tuple(tract * formant for formant in VOWEL_FORMANTS[vowel]),
        bandwidths_hz=FORMANT_BANDWIDTHS_HZ,
        open_quotient=float(rng.uniform(0.5, 0.7)),
        jitter=float(rng.uniform(0.002, 0.006)),
        shimmer=float(rng.uniform(0.01, 0.03)),
        hnr_db=float(rng.uniform(20.0, 30.0)),
    )


def glottal_cycles(voice: Voice, duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Start time, period and amplitude of every glottal cycle in ``duration_s`` seconds.

    Returns:
        ``(cycle_starts_s, periods_s, amplitudes)``, three float64 arrays of one length; cycles inside a voice
        break have amplitude 0.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    # For i.i.d. Gaussian perturbations e, E|e_i - e_(i+1)| = sigma * 2 / sqrt(pi): scale so that the
    # requested local jitter and shimmer are what a clinician's measure would find on average.
    jitter_sigma = voice.jitter * math.sqrt(math.pi) / 2
    shimmer_sigma = voice.shimmer * math.sqrt(math.pi) / 2
    tremor_phase = rng.uniform(0.0, 2 * math.pi)
    max_cycles = int(duration_s * voice.f0_hz * 2) + 16
    period_noise = rng.normal(0.0, jitter_sigma, max_cycles)
    amplitude_noise = rng.normal(0.0, shimmer_sigma, max_cycles)

    starts, periods, amplitudes = [], [], []
    time = 0.0
    for cycle in range(max_cycles):
        if time >= duration_s:
            break
        tremor = 1.0 + voice.tremor_depth * math.sin(2 * math.pi * voice.tremor_hz * time + tremor_phase)
        alternate = 1.0 if cycle % 2 == 0 else -1.0
        period = (1.0 + period_noise[cycle]) * (1.0 + alternate * voice.diplophonia / 2) / (voice.f0_hz * tremor)
        amplitude = tremor * (1.0 + amplitude_noise[cycle]) * (1.0 + alternate * voice.diplophonia)
        starts.append(time)
        periods.append(max(period, 0.25 / voice.f0_hz))
        amplitudes.append(max(amplitude, 0.0))
        time += periods[-1]
    starts, periods, amplitudes = np.array(starts), np.array(periods), np.array(amplitudes)

    if voice.breaks_per_s > 0:
        n_breaks = rng.poisson(voice.breaks_per_s * duration_s)
        for break_start, break_length in zip(
            rng.uniform(0.0, duration_s, n_breaks), rng.exponential(voice.break_s, n_breaks), strict=True
        ):
            amplitudes[(starts >= break_start) & (starts < break_start + break_length)] = 0.0
    return starts, periods, amplitudes


def rosenberg_pulse(phase: np.ndarray, open_quotient: float) -> np.ndarray:
    """Glottal flow over one cycle (phase in [0, 1)): a raised-cosine opening over two thirds of the open
    phase, a quarter-cosine closing over the last third, closed for the rest (Rosenberg 1971, type C)."""
    opening = open_quotient * 2 / 3
    closing = open_quotient / 3
    return np.where(
        phase < opening,
        0.5 * (1 - np.cos(np.pi * phase / opening)),
        np.where(phase < opening + closing, np.cos(np.pi * (phase - opening) / (2 * closing)), 0.0),
    )


def formant_filter(excitation: np.ndarray, voice: Voice, sample_rate: int) -> np.ndarray:
    """Cascade of two-pole resonators with unity gain at 0 Hz (Klatt 1980); formants within 5 % of the
    Nyquist frequency or above it are left out."""
    output = excitation
    for frequency, bandwidth in zip(voice.formants_hz, voice.bandwidths_hz, strict=True):
        if frequency >= 0.95 * sample_rate / 2:
            continue
        radius = math.exp(-math.pi * bandwidth / sample_rate)
        denominator = [1.0, -2 * radius * math.cos(2 * math.pi * frequency / sample_rate), radius**2]
        output = signal.lfilter([sum(denominator)], denominator, output)
    return output


def synthesize(voice: Voice, duration_s: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``duration_s`` seconds of the sustained vowel.

    Returns:
        float32 mono samples, shape ``(round(duration_s * sample_rate),)``, peak ``PEAK`` (0.5), with 20 ms
        onset and offset ramps. The same voice and rng state give the same samples.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    starts, periods, amplitudes = glottal_cycles(voice, duration_s, rng)
    num_samples = round(duration_s * sample_rate)
    time = np.arange(num_samples) / sample_rate
    cycle = np.searchsorted(starts, time, side="right") - 1
    phase = (time - starts[cycle]) / periods[cycle]
    flow = amplitudes[cycle] * rosenberg_pulse(phase, voice.open_quotient)

    # The flow derivative excites the tract (lip radiation folded in); aspiration noise is turbulence that
    # grows with the flow, and a floor of it goes on through breaks (breath).
    voiced = np.diff(flow, prepend=0.0) * sample_rate / voice.f0_hz
    noise = rng.standard_normal(num_samples) * (0.5 + flow / max(float(flow.max()), 1e-12))
    voiced_power = float(np.mean(voiced**2))
    if voiced_power > 0:
        noise *= math.sqrt(voiced_power / float(np.mean(noise**2)) / 10 ** (voice.hnr_db / 10))
    else:
        noise *= 10 ** (-voice.hnr_db / 20)
    samples = formant_filter(voiced + noise, voice, sample_rate)

    ramp = min(round(RAMP_S * sample_rate), num_samples // 2)
    if ramp > 0:
        envelope = 0.5 * (1 - np.cos(np.linspace(0.0, np.pi, ramp)))
        samples[:ramp] *= envelope
        samples[num_samples - ramp :] *= envelope[::-1]
    peak = float(np.max(np.abs(samples)))
    if peak > 0:
        samples *= PEAK / peak
    return samples.astype(np.float32)
