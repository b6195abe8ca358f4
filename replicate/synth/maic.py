"""Synthetic data in the layout of the MAIC 2021 Voice AI Challenge (per-person mel CSV + JSON).

Every person reads 17 tokens: 14 syllable groups of a read passage (2-5 voiced syllables of varying vowels,
separated by short unvoiced gaps) and 3 sustained vowels (/a/, /i/, /u/). Each token is rendered at 16 kHz
with the source-filter voice synthesiser (`replicate.synth.voice`: Rosenberg pulses through formant
resonators, F0 by sex and age), the person's recording is the tokens with pauses between them over a faint
noise floor, and the CSV is that recording's 128-band mel spectrogram. Layout written::

    out_dir/train/<id>.csv               128 rows (mel bands, lowest first) x frames, no header, dB, 2 decimals
    out_dir/train/<id>.json              metadata: wav_code, source_type, diagnosis, age, sex
    out_dir/train/<id>_annotation.json   {"wav_code", "tokens": [{token_no, token_skip, token_pronounce,
                                          startFrame, endFrame}, ...]}  (frames: CSV columns, end exclusive)
    out_dir/test/...                     the same, without "diagnosis" in the metadata
    out_dir/test_answer.csv              wav_code, diagnosis: answers for the test persons (synthetic only)

With ``single_json=True`` the metadata and the annotation share one ``<id>.json`` (the real data's layout
is not known; the loader accepts both).

Mel parameters (our choice; the competition does not publish its own): ``librosa.feature.melspectrogram``
with n_fft 1024, hop 256 (62.5 frames/s, so 64 frames = 1.02 s), 128 Slaney mel bands up to 8 kHz, power 2,
then ``power_to_db(ref=max of the recording, top_db=80)``: values in [-80, 0] dB.

The six diagnoses are perturbation profiles of the voice (local jitter, shimmer, HNR, tremor at 3-8 Hz,
diplophonia, voice breaks, open quotient). Normal voices stay inside the clinical norms (jitter < 1 %,
shimmer < 3.5 %, HNR >= 18 dB); every pathological person has a severity in [0, 1] that moves its profile
from a mild end, which overlaps the normal range and the other classes, to a severe end. Class
proportions follow the source's training set (Normal 47.1 %, Cancer 4.2 %, ...); sex and age depend on the
diagnosis, with no female Cancer and no male Nodules aged 55 or over, so 21 of the 24
(diagnosis, sex, age band) combinations can occur, as in the source.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from replicate import files
from replicate.synth import voice as voice_lib

DIAGNOSES: tuple[str, ...] = (
    "Normal",
    "Cancer",
    "Cyst_and_Polyp",
    "Nodules",
    "Functional_dysphonia",
    "Paralysis",
)
# The source's training-set counts (639 persons), which set the class proportions.
SOURCE_COUNTS: dict[str, int] = {
    "Normal": 301,
    "Cancer": 27,
    "Cyst_and_Polyp": 110,
    "Nodules": 49,
    "Functional_dysphonia": 50,
    "Paralysis": 102,
}
SAMPLE_RATE = 16000
N_FFT = 1024
HOP_LENGTH = 256
N_MELS = 128
TOP_DB = 80.0
TOKENS = 17
PASSAGE_TOKENS = 14  # tokens 1-14: syllable groups of the read passage; 15-17: sustained vowels
SUSTAINED_VOWELS = ("a", "i", "u")
NOISE_FLOOR_DB = -55.0  # background noise relative to the recording's peak
SKIP_PROBABILITY = 0.03  # a token marked token_skip = "skip"
ABNORMAL_PRONOUNCE_PROBABILITY = 0.05


@dataclasses.dataclass(frozen=True)
class Demographics:
    """Sex and age of one diagnosis: P(male), and a normal age distribution per sex clipped to a range."""

    male_share: float
    age_mean: float
    age_std: float
    age_range: tuple[float, float] = (18.0, 85.0)
    male_age_range: tuple[float, float] | None = None  # where men's ages differ (e.g. no old men)


DEMOGRAPHICS: dict[str, Demographics] = {
    "Normal": Demographics(0.45, 48.0, 16.0),
    "Cancer": Demographics(1.0, 64.0, 9.0, (38.0, 85.0)),  # no women: an empty (Cancer, F, *) pair
    "Cyst_and_Polyp": Demographics(0.55, 49.0, 12.0),
    "Nodules": Demographics(0.2, 40.0, 11.0, (18.0, 75.0), male_age_range=(18.0, 54.9)),  # no (M, >= 55)
    "Functional_dysphonia": Demographics(0.35, 46.0, 14.0),
    "Paralysis": Demographics(0.5, 58.0, 13.0),
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """A diagnosis as ranges of voice perturbations, from the mildest to the most severe person.

    Each tuple is (mild, severe); a person with severity s gets mild + s * (severe - mild). Tremor and
    diplophonia occur only in a share of the persons (`*_share`).
    """

    jitter: tuple[float, float]
    shimmer: tuple[float, float]
    hnr_db: tuple[float, float]
    open_quotient: tuple[float, float] = (0.6, 0.6)
    breaks_per_s: tuple[float, float] = (0.0, 0.0)
    tremor_share: float = 0.0
    tremor_depth: tuple[float, float] = (0.0, 0.0)
    diplophonia_share: float = 0.0
    diplophonia: tuple[float, float] = (0.0, 0.0)


PROFILES: dict[str, Profile] = {
    # Healthy: inside jitter < 1 %, shimmer < 3.5 %, HNR >= 18 dB (the severity spreads them over that range).
    "Normal": Profile(jitter=(0.002, 0.008), shimmer=(0.010, 0.032), hnr_db=(28.0, 19.0), open_quotient=(0.55, 0.65)),
    # Glottic cancer: a stiff, irregular fold: the roughest voices, low HNR, breaks.
    "Cancer": Profile(
        jitter=(0.009, 0.040),
        shimmer=(0.035, 0.120),
        hnr_db=(16.0, 4.0),
        open_quotient=(0.55, 0.45),
        breaks_per_s=(0.2, 1.5),
        diplophonia_share=0.3,
        diplophonia=(0.02, 0.10),
    ),
    # A mass on one fold: two oscillation regimes (diplophonia) in many, moderate roughness.
    "Cyst_and_Polyp": Profile(
        jitter=(0.006, 0.020),
        shimmer=(0.030, 0.070),
        hnr_db=(19.0, 11.0),
        diplophonia_share=0.6,
        diplophonia=(0.02, 0.15),
    ),
    # Bilateral nodules: incomplete closure, a breathy voice (high open quotient, aspiration noise).
    "Nodules": Profile(
        jitter=(0.005, 0.015),
        shimmer=(0.030, 0.060),
        hnr_db=(18.0, 9.0),
        open_quotient=(0.68, 0.85),
    ),
    # Functional (muscle-tension) dysphonia: pressed or unsteady, with breaks and tremor in many.
    "Functional_dysphonia": Profile(
        jitter=(0.006, 0.015),
        shimmer=(0.025, 0.060),
        hnr_db=(20.0, 12.0),
        open_quotient=(0.50, 0.40),
        breaks_per_s=(0.3, 2.0),
        tremor_share=0.5,
        tremor_depth=(0.01, 0.06),
    ),
    # Unilateral paralysis: breathy and rough, diplophonic in half of the persons.
    "Paralysis": Profile(
        jitter=(0.008, 0.030),
        shimmer=(0.040, 0.100),
        hnr_db=(15.0, 5.0),
        open_quotient=(0.70, 0.90),
        tremor_share=0.2,
        tremor_depth=(0.005, 0.03),
        diplophonia_share=0.5,
        diplophonia=(0.03, 0.20),
    ),
}


def class_counts(n: int, proportions: dict[str, int] = SOURCE_COUNTS) -> dict[str, int]:
    """`n` persons divided in the source's proportions (largest remainders), every class at least once."""
    if n < len(proportions):
        raise ValueError(f"need at least {len(proportions)} persons (one per diagnosis), got {n}")
    total = sum(proportions.values())
    exact = {name: n * count / total for name, count in proportions.items()}
    counts = {name: max(1, math.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - math.floor(exact[name]), reverse=True)
    index = 0
    while sum(counts.values()) < n:
        counts[by_remainder[index % len(by_remainder)]] += 1
        index += 1
    while sum(counts.values()) > n:  # only when the minimum of one pushed the sum over
        largest = max(counts, key=counts.get)
        counts[largest] -= 1
    return counts


def draw_person(diagnosis: str, rng: np.random.Generator) -> tuple[str, float]:
    """Sex ("M"/"F") and age (one decimal) of a person with this diagnosis."""
    demographics = DEMOGRAPHICS[diagnosis]
    sex = "M" if rng.random() < demographics.male_share else "F"
    low, high = demographics.male_age_range if sex == "M" and demographics.male_age_range else demographics.age_range
    age = float(np.clip(rng.normal(demographics.age_mean, demographics.age_std), low, high))
    return sex, round(age, 1)


def person_voice(diagnosis: str, sex: str, age: float, rng: np.random.Generator) -> tuple[voice_lib.Voice, float]:
    """The person's voice on /a/ (pathology applied) and its severity (0 for Normal persons too: their
    spread is drawn the same way)."""
    healthy = voice_lib.speaker(sex, age, "a", rng)
    profile = PROFILES[diagnosis]
    severity = float(rng.beta(2.0, 2.0))

    def between(bounds: tuple[float, float]) -> float:
        return bounds[0] + severity * (bounds[1] - bounds[0])

    tremor = rng.random() < profile.tremor_share
    diplophonic = rng.random() < profile.diplophonia_share
    pathological = dataclasses.replace(
        healthy,
        jitter=between(profile.jitter),
        shimmer=between(profile.shimmer),
        hnr_db=between(profile.hnr_db),
        open_quotient=float(np.clip(between(profile.open_quotient) + rng.normal(0, 0.03), 0.3, 0.92)),
        breaks_per_s=between(profile.breaks_per_s),
        tremor_hz=float(rng.uniform(3.0, 8.0)) if tremor else 0.0,
        tremor_depth=between(profile.tremor_depth) if tremor else 0.0,
        diplophonia=between(profile.diplophonia) if diplophonic else 0.0,
    )
    return pathological, severity


def _with_vowel(person: voice_lib.Voice, vowel: str, rng: np.random.Generator, token_spread: float) -> voice_lib.Voice:
    """The person's voice on another vowel (same vocal-tract scale), with a little token-to-token variation
    of pitch (intonation) and of the perturbations."""
    scale = person.formants_hz[0] / voice_lib.VOWEL_FORMANTS["a"][0]

    def vary(value: float, limit: float) -> float:
        return float(min(value * math.exp(rng.normal(0.0, token_spread)), limit))

    return dataclasses.replace(
        person,
        f0_hz=person.f0_hz * math.exp(rng.normal(0.0, 0.06)),
        formants_hz=tuple(scale * formant for formant in voice_lib.VOWEL_FORMANTS[vowel]),
        jitter=vary(person.jitter, 0.45),
        shimmer=vary(person.shimmer, 0.45),
        hnr_db=person.hnr_db + float(rng.normal(0.0, 1.5)),
    )


def render_token(person: voice_lib.Voice, token_no: int, rng: np.random.Generator) -> np.ndarray:
    """One token's audio at 16 kHz: a syllable group (tokens 1-14) or a sustained vowel (15-17)."""
    vowels = tuple(voice_lib.VOWEL_FORMANTS)
    if token_no > PASSAGE_TOKENS:
        vowel = SUSTAINED_VOWELS[(token_no - PASSAGE_TOKENS - 1) % len(SUSTAINED_VOWELS)]
        return voice_lib.synthesize(
            _with_vowel(person, vowel, rng, 0.1), float(rng.uniform(1.0, 2.2)), SAMPLE_RATE, rng
        )
    pieces = []
    for syllable in range(int(rng.integers(2, 6))):
        if syllable:  # an unvoiced consonant between syllables: faint noise
            gap = rng.standard_normal(int(rng.uniform(0.03, 0.07) * SAMPLE_RATE)) * 0.01
            pieces.append(gap.astype(np.float32))
        vowel = vowels[int(rng.integers(len(vowels)))]
        duration = float(rng.uniform(0.12, 0.28))
        level = float(10 ** (rng.normal(0.0, 2.0) / 20))
        pieces.append(level * voice_lib.synthesize(_with_vowel(person, vowel, rng, 0.1), duration, SAMPLE_RATE, rng))
    return np.concatenate(pieces)


def mel_db(audio: np.ndarray) -> np.ndarray:
    """The recording's 128-band mel spectrogram in dB re its maximum, (128, frames) float32."""
    import librosa

    power = librosa.feature.melspectrogram(
        y=audio, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS, power=2.0
    )
    return librosa.power_to_db(power, ref=np.max, top_db=TOP_DB).astype(np.float32)


def render_person(diagnosis: str, sex: str, age: float, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One person's recording as a mel spectrogram and the annotation of its 17 tokens.

    Returns:
        (mel dB array (128, frames), token annotations with exact CSV-column start/end frames, end exclusive).
    """
    person, _ = person_voice(diagnosis, sex, age, rng)
    pieces = [np.zeros(int(rng.uniform(0.15, 0.35) * SAMPLE_RATE), dtype=np.float32)]
    spans = []
    position = len(pieces[0])
    for token_no in range(1, TOKENS + 1):
        audio = render_token(person, token_no, rng)
        spans.append((position, position + len(audio)))
        pause = np.zeros(int(rng.uniform(0.12, 0.3) * SAMPLE_RATE), dtype=np.float32)
        pieces += [audio, pause]
        position += len(audio) + len(pause)
    recording = np.concatenate(pieces).astype(np.float64)
    recording += rng.standard_normal(len(recording)) * np.max(np.abs(recording)) * 10 ** (NOISE_FLOOR_DB / 20)
    mel = mel_db(recording.astype(np.float32))
    frames = mel.shape[1]
    tokens = []
    for token_no, (start, stop) in enumerate(spans, start=1):
        start_frame = start // HOP_LENGTH
        end_frame = min(-(-stop // HOP_LENGTH), frames)
        tokens.append(
            {
                "token_no": token_no,
                "token_skip": "skip" if rng.random() < SKIP_PROBABILITY else "normal",
                "token_pronounce": "abnormal" if rng.random() < ABNORMAL_PRONOUNCE_PROBABILITY else "normal",
                "startFrame": int(start_frame),
                "endFrame": int(end_frame),
            }
        )
    return mel, tokens


def write_person(
    folder: Path, person_id: str, mel: np.ndarray, metadata: dict, tokens: list[dict], *, single_json: bool
) -> None:
    """Write one person's CSV and JSON(s) atomically."""
    with files.atomic_path(folder / f"{person_id}.csv", suffix=".csv") as temporary:
        np.savetxt(temporary, mel, fmt="%.2f", delimiter=",")
    annotation = {"wav_code": person_id, "tokens": tokens}
    if single_json:
        files.write_json(folder / f"{person_id}.json", {**metadata, **annotation})
    else:
        files.write_json(folder / f"{person_id}.json", metadata)
        files.write_json(folder / f"{person_id}_annotation.json", annotation)


def _split(
    folder: Path,
    prefix: str,
    count: int,
    rng: np.random.Generator,
    *,
    with_diagnosis: bool,
    single_json: bool,
    progress: bool,
) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("*.csv")) + list(folder.glob("*.json")):  # an earlier, larger data set
        stale.unlink()
    diagnoses = [name for name, n in class_counts(count).items() for _ in range(n)]
    diagnoses = [diagnoses[i] for i in rng.permutation(len(diagnoses))]
    persons = []
    for index, diagnosis in enumerate(tqdm(diagnoses, desc=f"{folder.name} persons", disable=not progress)):
        person_id = f"{prefix}{index:04d}"
        sex, age = draw_person(diagnosis, rng)
        mel, tokens = render_person(diagnosis, sex, age, rng)
        metadata = {"wav_code": person_id, "source_type": "synthetic", "age": age, "sex": sex}
        if with_diagnosis:
            metadata["diagnosis"] = diagnosis
        write_person(folder, person_id, mel, metadata, tokens, single_json=single_json)
        persons.append({"wav_code": person_id, "diagnosis": diagnosis, "sex": sex, "age": age})
    return persons


def generate(
    out_dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    single_json: bool = False,
    progress: bool = True,
) -> dict:
    """Write a synthetic data set in the MAIC voice layout; the same seed gives identical files.

    Args:
        out_dir: folder to write into (train/, test/, test_answer.csv); earlier CSV/JSON files are removed.
        n_train: training persons (with diagnosis), at least 6.
        n_test: test persons (diagnosis only in test_answer.csv), at least 6.
        seed: seed of every random choice.
        single_json: metadata and annotation in one JSON per person instead of two.
        progress: show progress bars over persons.

    Returns:
        Summary with the counts, the seed and the paths written.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < len(DIAGNOSES):
            raise ValueError(f"{name} must be at least {len(DIAGNOSES)} (one person per diagnosis), got {value}")
    out_dir = Path(out_dir)
    train_rng, test_rng = (np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(2))
    options = {"single_json": single_json, "progress": progress}
    train = _split(out_dir / "train", "train_", n_train, train_rng, with_diagnosis=True, **options)
    test = _split(out_dir / "test", "test_", n_test, test_rng, with_diagnosis=False, **options)
    lines = ["wav_code,diagnosis"] + [f"{person['wav_code']},{person['diagnosis']}" for person in test]
    files.write_text(out_dir / "test_answer.csv", "\n".join(lines) + "\n")
    return {
        "out_dir": str(out_dir),
        "unit": "persons",
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "single_json": single_json,
        "train_counts": {name: sum(p["diagnosis"] == name for p in train) for name in DIAGNOSES},
        "test_answer": str(out_dir / "test_answer.csv"),
    }
