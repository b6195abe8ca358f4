"""Synthetic data in the exact layout of the AI CUP 2023 multimodal pathological-voice competition.

Each person has one sustained /a/ (44.1 kHz, 16-bit PCM, 0.7-1.6 s; about 3 % are shorter than the 1 s
the recipe uses, so padding is exercised) from the shared source-filter voice synthesiser
(`replicate.synth.voice`), and the 26 clinical fields of the competition's CSV. Both depend on the disease
category, and neither alone decides it:

- Voice: each class has a perturbation profile (below), applied to a healthy voice of the person's sex
  and age with a per-person severity in [0.25, 1], so mild cases sound nearly healthy.
- Clinical fields: class-conditional distributions chosen to be plausible — neoplasm older, mostly men
  and more often (heavier) smokers and drinkers, with head-and-neck cancer history; phonotrauma younger,
  mostly women, high occupational vocal demand and noise at work; vocal palsy sudden onset, choking,
  decreased volume, stroke or surgery history; incomplete glottic closure older, fatigue and weak voice;
  normal low VHI-10 and few symptoms. Codes of ordered fields (vocal demand, noise) are drawn so that a
  larger code means more (an assumption: the competition's code book is not in the spec).

Class proportions are the competition's (536 / 220 / 168 / 44 / 32 per 1,000). Layout written::

    out_dir/Training_Dataset/training_datalist.csv        ID, 26 clinical columns, Disease category
    out_dir/Training_Dataset/training_voice_data/<ID>.wav
    out_dir/Public_Testing_Dataset/test_datalist_public.csv     (no Disease category)
    out_dir/Public_Testing_Dataset/test_data_public/<ID>.wav
    out_dir/Public_Testing_Dataset/test_answer_public.csv       ID, Disease category (synthetic data only)
    out_dir/Private_Testing_Dataset/...                         the same with "private"

The header spells "Onset of dysphonia " with a trailing space, as the real one does; PPD and VHI-10 have
empty cells. The answer files exist only because the data are synthetic, so held-out persons can be scored.
"""

from __future__ import annotations

import dataclasses
import os
import string
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from replicate import files
from replicate.synth import voice

SAMPLE_RATE = 44_100
CLASS_COUNTS_PER_1000 = (536, 220, 168, 44, 32)  # spec, "The task": 1 Phonotrauma ... 5 Normal
SHORT_FRACTION = 0.03  # recordings shorter than 1 s
REAL_HEADER_SPELLING = {"Onset of dysphonia": "Onset of dysphonia "}


@dataclasses.dataclass(frozen=True)
class Profile:
    """How a class changes a healthy voice at full severity (severity 0 leaves it healthy).

    Ranges are (low, high) of a uniform draw per person; multiplicative ones scale the healthy value.
    """

    jitter: tuple[float, float]
    shimmer: tuple[float, float]
    hnr_db: tuple[float, float]
    open_quotient: tuple[float, float] = (0.5, 0.7)
    f0_scale: tuple[float, float] = (1.0, 1.0)
    tremor_depth: tuple[float, float] = (0.0, 0.0)
    diplophonia: tuple[float, float] = (0.0, 0.0)
    breaks_per_s: tuple[float, float] = (0.0, 0.0)


# 1 Phonotrauma (nodules, polyps): rough and somewhat breathy. 2 Incomplete glottic closure: breathy, a
# long open phase, weak. 3 Vocal palsy: diplophonia and voice breaks. 4 Neoplasm: very rough, hoarse, a
# lower and irregular F0. 5 Normal: the healthy voice (healthy jitter < 1 %, shimmer < 3.5 %, HNR ≥ 18 dB).
PROFILES: dict[int, Profile] = {
    1: Profile(jitter=(0.008, 0.02), shimmer=(0.04, 0.09), hnr_db=(11.0, 17.0), open_quotient=(0.6, 0.75)),
    2: Profile(jitter=(0.005, 0.012), shimmer=(0.03, 0.07), hnr_db=(5.0, 11.0), open_quotient=(0.8, 0.92)),
    3: Profile(
        jitter=(0.01, 0.03),
        shimmer=(0.05, 0.1),
        hnr_db=(9.0, 15.0),
        diplophonia=(0.06, 0.16),
        breaks_per_s=(1.0, 3.0),
        f0_scale=(1.0, 1.15),
    ),
    4: Profile(
        jitter=(0.025, 0.06),
        shimmer=(0.09, 0.16),
        hnr_db=(3.0, 9.0),
        f0_scale=(0.8, 0.92),
        tremor_depth=(0.02, 0.06),
    ),
}


@dataclasses.dataclass(frozen=True)
class Clinical:
    """Class-conditional distributions of the clinical fields."""

    female: float  # P(Sex = 2)
    age: tuple[float, float]  # normal mean, sd
    symptoms: tuple[float, ...]  # P(flag) for the 9 symptom columns, in the table's order
    smoking: tuple[float, float, float, float]  # P(never, past, active, e-cigarette)
    drinking: tuple[float, float, float]
    onset: tuple[float, ...]  # P(code 1..5); 1 sudden, 2 gradual, 3 on and off, 4 since childhood, 5 other
    diurnal: tuple[float, ...]  # P(code 1..4)
    noise: tuple[float, float, float]  # P(code 1..3), more noise with a larger code
    demand: tuple[float, float, float, float]  # P(code 1..4), more demand with a larger code
    comorbidities: tuple[float, ...]  # P(flag) for Diabetes, Hypertension, CAD, Head and Neck Cancer, Head injury, CVA
    vhi: tuple[float, float]  # normal mean, sd of VHI-10 (0..40)


#                                  pitch  volume fatigue dry  lump  heartb choke  eyes  PND
CLINICAL: dict[int, Clinical] = {
    1: Clinical(
        0.75,
        (38, 11),
        (0.45, 0.30, 0.55, 0.45, 0.30, 0.25, 0.10, 0.10, 0.30),
        (0.75, 0.12, 0.11, 0.02),
        (0.55, 0.35, 0.10),
        (0.15, 0.35, 0.40, 0.05, 0.05),
        (0.30, 0.25, 0.25, 0.20),
        (0.25, 0.40, 0.35),
        (0.05, 0.15, 0.35, 0.45),
        (0.03, 0.08, 0.02, 0.01, 0.02, 0.01),
        (18, 8),
    ),
    2: Clinical(
        0.50,
        (57, 14),
        (0.30, 0.55, 0.60, 0.35, 0.20, 0.25, 0.15, 0.20, 0.25),
        (0.65, 0.20, 0.13, 0.02),
        (0.55, 0.35, 0.10),
        (0.10, 0.60, 0.20, 0.05, 0.05),
        (0.25, 0.25, 0.30, 0.20),
        (0.45, 0.35, 0.20),
        (0.20, 0.35, 0.30, 0.15),
        (0.12, 0.30, 0.08, 0.03, 0.02, 0.03),
        (17, 8),
    ),
    3: Clinical(
        0.55,
        (55, 14),
        (0.30, 0.60, 0.45, 0.30, 0.20, 0.20, 0.50, 0.10, 0.20),
        (0.65, 0.20, 0.13, 0.02),
        (0.55, 0.35, 0.10),
        (0.60, 0.20, 0.10, 0.02, 0.08),
        (0.25, 0.25, 0.25, 0.25),
        (0.45, 0.35, 0.20),
        (0.25, 0.35, 0.25, 0.15),
        (0.12, 0.30, 0.10, 0.15, 0.06, 0.12),
        (25, 8),
    ),
    4: Clinical(
        0.15,
        (63, 10),
        (0.40, 0.40, 0.35, 0.35, 0.45, 0.20, 0.25, 0.10, 0.20),
        (0.25, 0.35, 0.38, 0.02),
        (0.30, 0.40, 0.30),
        (0.10, 0.65, 0.15, 0.02, 0.08),
        (0.25, 0.25, 0.25, 0.25),
        (0.35, 0.35, 0.30),
        (0.25, 0.35, 0.25, 0.15),
        (0.15, 0.35, 0.12, 0.30, 0.02, 0.04),
        (21, 9),
    ),
    5: Clinical(
        0.60,
        (37, 12),
        (0.08, 0.08, 0.12, 0.15, 0.08, 0.20, 0.05, 0.10, 0.20),
        (0.80, 0.10, 0.08, 0.02),
        (0.60, 0.32, 0.08),
        (0.20, 0.20, 0.20, 0.10, 0.30),
        (0.25, 0.25, 0.25, 0.25),
        (0.45, 0.35, 0.20),
        (0.25, 0.30, 0.25, 0.20),
        (0.03, 0.08, 0.02, 0.00, 0.01, 0.00),
        (4, 4),
    ),
}
EMPTY_VHI = 0.04  # share of empty VHI-10 cells
EMPTY_PPD_NON_SMOKER = 0.5  # never-smokers often leave PPD empty; smokers sometimes do
EMPTY_PPD_SMOKER = 0.08


def class_counts(n: int) -> list[int]:
    """Persons per class for `n` persons in the competition's proportions (largest remainders; every class
    has at least one person when n >= 5)."""
    if n < 1:
        raise ValueError(f"need at least one person, got {n}")
    shares = np.array(CLASS_COUNTS_PER_1000, dtype=np.float64) / sum(CLASS_COUNTS_PER_1000) * n
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts))[: n - counts.sum()]:
        counts[index] += 1
    if n >= len(counts):
        for index in np.flatnonzero(counts == 0):  # take one from the largest class
            counts[index] += 1
            counts[counts.argmax()] -= 1
    return counts.tolist()


def person_voice(category: int, sex: str, age: float, rng: np.random.Generator) -> voice.Voice:
    """A healthy voice of this sex and age, perturbed by the class's profile at a random severity."""
    healthy = voice.speaker(sex, age, "a", rng)
    if category not in PROFILES:
        return healthy
    profile = PROFILES[category]
    severity = float(rng.uniform(0.25, 1.0))

    def towards(value: float, bounds: tuple[float, float]) -> float:
        return value + severity * (float(rng.uniform(*bounds)) - value)

    return dataclasses.replace(
        healthy,
        f0_hz=healthy.f0_hz * towards(1.0, profile.f0_scale),
        jitter=towards(healthy.jitter, profile.jitter),
        shimmer=towards(healthy.shimmer, profile.shimmer),
        hnr_db=towards(healthy.hnr_db, profile.hnr_db),
        open_quotient=towards(healthy.open_quotient, profile.open_quotient),
        tremor_hz=float(rng.uniform(4.0, 7.0)),
        tremor_depth=towards(0.0, profile.tremor_depth),
        diplophonia=towards(0.0, profile.diplophonia),
        breaks_per_s=towards(0.0, profile.breaks_per_s),
    )


def clinical_row(category: int, rng: np.random.Generator) -> dict:
    """The 26 clinical fields of one person of this class (PPD / VHI-10 may be None: an empty cell)."""
    from replicate.aicup.data import COMORBIDITIES, SYMPTOMS

    spec = CLINICAL[category]
    row: dict = {"Sex": 2 if rng.random() < spec.female else 1}
    row["Age"] = int(np.clip(round(rng.normal(*spec.age)), 18, 95))
    for name, probability in zip(SYMPTOMS, spec.symptoms, strict=True):
        row[name] = int(rng.random() < probability)
    smoking = int(rng.choice(4, p=spec.smoking))
    row["Smoking"] = smoking
    heavy = 1.6 if category == 4 else 1.0
    if smoking in (1, 2):
        ppd = round(float(np.clip(rng.gamma(2.0, 0.35 * heavy), 0.1, 4.0)) * 2) / 2 or 0.5
        row["PPD"] = None if rng.random() < EMPTY_PPD_SMOKER else ppd
    else:
        row["PPD"] = None if rng.random() < EMPTY_PPD_NON_SMOKER else 0
    drinking = int(rng.choice(3, p=spec.drinking))
    row["Drinking"] = drinking
    row["frequency"] = (
        0 if drinking == 0 else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2] if category != 4 else [0.3, 0.35, 0.35]))
    )
    row["Diurnal pattern"] = int(rng.choice(4, p=spec.diurnal)) + 1
    row["Onset of dysphonia"] = int(rng.choice(5, p=spec.onset)) + 1
    row["Noise at work"] = int(rng.choice(3, p=spec.noise)) + 1
    row["Occupational vocal demand"] = int(rng.choice(4, p=spec.demand)) + 1
    age_factor = 1.0 + max(0.0, row["Age"] - 50) / 30  # diabetes, hypertension, CAD grow with age
    for index, (name, probability) in enumerate(zip(COMORBIDITIES, spec.comorbidities, strict=True)):
        row[name] = int(rng.random() < min(0.9, probability * (age_factor if index < 3 else 1.0)))
    vhi = int(np.clip(round(rng.normal(*spec.vhi)), 0, 40))
    row["Voice handicap index - 10"] = None if rng.random() < EMPTY_VHI else vhi
    return row


def _ids(count: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """Short random IDs like the competition's ("0U02g8u"), unique over the whole data set."""
    alphabet = np.array(list(string.digits + string.ascii_letters))
    ids = []
    while len(ids) < count:
        identifier = "".join(rng.choice(alphabet, 7))
        if identifier not in taken:
            taken.add(identifier)
            ids.append(identifier)
    return ids


def _write_split(
    table: Path, folder: Path, n: int, rng: np.random.Generator, taken: set[str], *, labelled: bool, progress: bool
) -> list[tuple[str, int]]:
    from replicate.aicup.data import FIELD_NAMES, ID_COLUMN, LABEL_COLUMN

    categories = np.repeat(np.arange(1, 6), class_counts(n))
    rng.shuffle(categories)
    ids = _ids(n, rng, taken)
    folder.mkdir(parents=True, exist_ok=True)
    header = [ID_COLUMN, *(REAL_HEADER_SPELLING.get(name, name) for name in FIELD_NAMES)]
    header += [LABEL_COLUMN] if labelled else []
    lines = [",".join(header)]
    for identifier, category in tqdm(
        list(zip(ids, categories.tolist(), strict=True)), desc=f"synth {folder.name}", disable=not progress
    ):
        row = clinical_row(category, rng)
        person = person_voice(category, "F" if row["Sex"] == 2 else "M", row["Age"], rng)
        short = rng.random() < SHORT_FRACTION
        duration = float(rng.uniform(0.7, 0.95) if short else rng.uniform(1.05, 1.6))
        samples = voice.synthesize(person, duration, SAMPLE_RATE, rng)
        with files.atomic_path(folder / f"{identifier}.wav", suffix=".wav") as temporary:
            sf.write(temporary, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        cells = [identifier] + ["" if row[name] is None else f"{row[name]:g}" for name in FIELD_NAMES]
        lines.append(",".join(cells + ([str(category)] if labelled else [])))
    files.write_text(table, "\n".join(lines) + "\n")
    return list(zip(ids, categories.tolist(), strict=True))


def generate(
    out_dir: str | os.PathLike,
    n_train: int,
    n_public: int,
    n_private: int,
    seed: int = 0,
    *,
    progress: bool = True,
) -> dict:
    """Write a synthetic data set in the AI CUP 2023 layout; the same seed gives identical files.

    Args:
        out_dir: folder to write into (created if missing; earlier files are overwritten).
        n_train: persons of the training list.
        n_public, n_private: persons of the public and private test lists (0: no such list).
        seed: seed of every random choice.
        progress: show progress bars.

    Returns:
        Summary with the counts per class, the seed and the folders written.
    """
    if n_train < 20:
        raise ValueError(f"n_train must be at least 20 (every class in every fold of 4), got {n_train}")
    if n_public < 0 or n_private < 0:
        raise ValueError(f"test list sizes must not be negative, got {n_public} and {n_private}")
    out_dir = Path(out_dir)
    streams = [np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(3)]
    taken: set[str] = set()
    summary = {"out_dir": str(out_dir), "seed": seed, "n_train": n_train, "n_test": n_public + n_private}
    training = out_dir / "Training_Dataset"
    rows = _write_split(
        training / "training_datalist.csv",
        training / "training_voice_data",
        n_train,
        streams[0],
        taken,
        labelled=True,
        progress=progress,
    )
    summary["train_classes"] = np.bincount([c for _, c in rows], minlength=6)[1:].tolist()
    for name, n, rng in (("public", n_public, streams[1]), ("private", n_private, streams[2])):
        if n == 0:
            continue
        folder = out_dir / f"{name.capitalize()}_Testing_Dataset"
        rows = _write_split(
            folder / f"test_datalist_{name}.csv",
            folder / f"test_data_{name}",
            n,
            rng,
            taken,
            labelled=False,
            progress=progress,
        )
        answers = ["ID,Disease category"] + [f"{identifier},{category}" for identifier, category in rows]
        files.write_text(folder / f"test_answer_{name}.csv", "\n".join(answers) + "\n")
        summary[f"{name}_classes"] = np.bincount([c for _, c in rows], minlength=6)[1:].tolist()
    return summary
