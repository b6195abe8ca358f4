"""AI CUP 2023 multimodal pathological-voice classification (6th private): data, features, training, report.

    python -m replicate.aicup --data /path/to/aicup2023                       # five n_mfcc variants, multimodal
    python -m replicate.aicup --data ... --set model.clinical=false           # audio only
    python -m replicate.aicup --data ... --set ensemble.seeds=3               # 5 variants × 3 seeds
    python -m replicate.aicup --data data/synth/aicup --profile quick         # the synthetic demo

Stages, each skipping work already done: read and check the layout → MFCCs (cached, one cache per n_mfcc)
→ clinical encoder (fitted on the training rows) → fold-0 splits (one per variant, as the source's five
notebooks drew them; or one shared) → one seed ensemble per n_mfcc variant (resumable) → predictions,
`submission.csv` → UAR, macro F1, per-class recall, confusion matrices → `report.md`.

Run folder (`runs/aicup/<profile>-<hash>/`):

    manifest.json                    the submission ensemble: every (variant, seed) member, the clinical
                                     encoder, feature parameters and class names (what inference needs)
    <modality>/manifest.json         the same for one modality ("multimodal" or "audio_only")
    <modality>/mfcc<k>/              one engine run folder per variant: members/seed-XX.keras, histories, ...
    submission.csv                   `ID,label` without header, labels 1-5 (public then private rows)
    predictions.npz, scores.json, report.md, confusion_*.png, training_curves.png
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import features as feature_lib
from replicate import files, metrics, report
from replicate import recipe as recipe_lib
from replicate.runner import short_commit
from replicate.task import DataError, listing

CLASS_NAMES = ("Phonotrauma", "Incomplete glottic closure", "Vocal palsy", "Neoplasm", "Normal")  # labels 1-5
LABEL_COLUMN = "Disease category"
ID_COLUMN = "ID"
SYMPTOMS = (
    "Narrow pitch range",
    "Decreased volume",
    "Fatigue",
    "Dryness",
    "Lumping",
    "heartburn",
    "Choking",
    "Eye dryness",
    "PND",
)
COMORBIDITIES = ("Diabetes", "Hypertension", "CAD", "Head and Neck Cancer", "Head injury", "CVA")
ONE_HOT = (
    "Smoking",
    "frequency",
    "Onset of dysphonia",
    "Noise at work",
    "Diurnal pattern",
    "Occupational vocal demand",
)


@dataclass(frozen=True)
class Field:
    """One clinical column: its allowed values and whether an empty cell is allowed (then filled)."""

    name: str
    low: float
    high: float
    integer: bool = True
    empty_allowed: bool = False


# The 26 clinical columns in the competition's order (spec, "On-disk format"). Codes are integers in
# [low, high]; Age and PPD are numbers. The real header spells "Onset of dysphonia " with a trailing space:
# names are matched after normalisation (`normalize_column`), and written here without it.
FIELDS: tuple[Field, ...] = (
    Field("Sex", 1, 2),
    Field("Age", 0, 120, integer=False),
    *(Field(name, 0, 1) for name in SYMPTOMS),
    Field("Smoking", 0, 3),
    Field("PPD", 0, 20, integer=False, empty_allowed=True),
    Field("Drinking", 0, 2),
    Field("frequency", 0, 3),
    Field("Diurnal pattern", 1, 4),
    Field("Onset of dysphonia", 1, 5),
    Field("Noise at work", 1, 3),
    Field("Occupational vocal demand", 1, 4),
    *(Field(name, 0, 1) for name in COMORBIDITIES),
    Field("Voice handicap index - 10", 0, 40, empty_allowed=True),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
LABEL_FIELD = Field(LABEL_COLUMN, 1, len(CLASS_NAMES))


def _positive_list(value) -> str | None:
    if not isinstance(value, list) or not value or any(not isinstance(v, int) or v < 2 for v in value):
        return "must be a non-empty list of integers >= 2"
    return None if len(set(value)) == len(value) else "must not repeat a value"


RULES: dict[str, recipe_lib.Rule] = {
    "data.sample_rate": recipe_lib.positive,
    "data.clip_samples": recipe_lib.positive,
    "data.folds": lambda value: None if value >= 2 else "must be >= 2",
    "data.validation_fold": recipe_lib.non_negative,
    "data.split_seed": recipe_lib.non_negative,
    "features.n_mfcc": _positive_list,
    "features.n_fft": recipe_lib.positive,
    "features.hop_length": recipe_lib.positive,
    "model.head_units": recipe_lib.positive,
    "train.epochs": recipe_lib.positive,
    "train.batch_size": recipe_lib.positive,
    "train.learning_rate": recipe_lib.positive,
    "train.weight_decay": recipe_lib.non_negative,
    "train.optimizer": recipe_lib.one_of("SGD", "Adam", "AdamW", "Nadam", "RMSprop"),
    "train.loss": recipe_lib.one_of(
        "DoubleSoftmaxCrossentropy", "CategoricalCrossentropy", "CategoricalFocalCrossentropy"
    ),
    "train.class_weights": recipe_lib.one_of("inverse_count", "none"),
    "ensemble.seeds": recipe_lib.positive,
    "ensemble.first_seed": recipe_lib.non_negative,
    "run.workers": recipe_lib.non_negative,
}


def load_recipe(profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
    """The AI CUP recipe with a profile and overrides, validated."""
    recipe = recipe_lib.load_recipe(path or "aicup", profile, overrides, RULES, task="aicup")
    if recipe["data"]["validation_fold"] >= recipe["data"]["folds"]:
        raise recipe_lib.RecipeError(
            f"data.validation_fold = {recipe['data']['validation_fold']}: must be below data.folds "
            f"({recipe['data']['folds']})"
        )
    return recipe


# --- the competition's layout -------------------------------------------------------------------


def normalize_column(name: str) -> str:
    """Column names compared case-, space- and dash-insensitively: "Onset of dysphonia " → "onset of dysphonia"."""
    return re.sub(r"[\s_]+", " ", str(name).replace("\ufeff", "")).strip().lower()


def normalize_file_name(name: str) -> str:
    """File and folder names with spaces or underscores alike: "Training Dataset" → "training_dataset"."""
    return re.sub(r"[\s_-]+", "_", name.strip()).lower()


@dataclass
class Split:
    """One list of persons (training, public or private test) with their audio files and clinical fields.

    Attributes:
        name: "train", "public" or "private".
        table: the CSV the rows come from.
        ids: person IDs, in the table's order.
        paths: the wav file of every ID.
        clinical: the 26 clinical columns (canonical names), PPD and VHI-10 still empty where they were.
        labels: disease categories 1-5 (training; test lists only where synthetic answers exist), else None.
        empty_cells: column → number of empty cells (PPD, VHI-10), filled with 0 by the encoder.
        extra_wavs: wav files in the audio folder without a row (ignored, counted in the report).
    """

    name: str
    table: Path
    ids: list[str]
    paths: list[Path]
    clinical: pd.DataFrame
    labels: np.ndarray | None
    empty_cells: dict[str, int] = field(default_factory=dict)
    extra_wavs: int = 0


@dataclass
class AicupData:
    root: Path
    train: Split
    tests: list[Split]  # public and/or private, those present


# (table, audio folder, answers of synthetic data) of each split, as normalised names.
LAYOUT = {
    "train": ("training_datalist.csv", "training_voice_data", None),
    "public": ("test_datalist_public.csv", "test_data_public", "test_answer_public.csv"),
    "private": ("test_datalist_private.csv", "test_data_private", "test_answer_private.csv"),
}


def _find(root: Path, normalized: str, *, directory: bool, near: Path | None = None) -> Path | None:
    """The file (or folder) whose normalised name matches: beside `near` if it is there, else the one in `root`
    or one level down. Two candidates in the same search are an error (the loader cannot tell which is the data)."""

    def matches(place: Path) -> list[Path]:
        return [
            candidate
            for candidate in sorted(place.iterdir())
            if normalize_file_name(candidate.name) == normalized
            and (candidate.is_dir() if directory else candidate.is_file())
        ]

    searches = ([[near]] if near is not None else []) + [[root, *sorted(p for p in root.iterdir() if p.is_dir())]]
    for places in searches:
        found = [candidate for place in places for candidate in matches(place)]
        if len(found) > 1:
            raise DataError(
                f"{root}: {normalized} is there {len(found)} times ({listing(map(str, found))}); keep one (or use "
                "a data folder that holds one)"
            )
        if found:
            return found[0]
    return None


def read_table(path: Path, *, labelled: bool) -> tuple[pd.DataFrame, np.ndarray | None, dict[str, int]]:
    """Read a datalist CSV and check every cell.

    Args:
        path: the CSV (`training_datalist.csv` or a test list).
        labelled: the table must have the `Disease category` column (the training list).

    Returns:
        (table with `ID` and the 26 clinical columns under their canonical names, labels 1-5 or None,
        number of empty PPD / VHI-10 cells).

    Raises:
        DataError: unreadable file; missing, unknown or repeated columns (by name); duplicated or empty IDs;
            an empty cell outside PPD / VHI-10, a non-number, a non-integer code or a value out of range,
            naming the line, the ID and the column.
    """
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    expected = [ID_COLUMN, *FIELD_NAMES] + ([LABEL_COLUMN] if labelled else [])
    by_normalized = {normalize_column(name): name for name in expected}
    if not labelled:  # a test list may carry no label column; one that does is not an error
        by_normalized.setdefault(normalize_column(LABEL_COLUMN), LABEL_COLUMN)
    renames, unknown, seen = {}, [], {}
    for column in raw.columns:
        canonical = by_normalized.get(normalize_column(column))
        if canonical is None:
            unknown.append(repr(column))
        elif canonical in seen:
            raise DataError(f"{path}: columns {seen[canonical]!r} and {column!r} are the same column {canonical!r}")
        else:
            seen[canonical] = column
            renames[column] = canonical
    missing = [name for name in expected if name not in seen]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing columns {', '.join(map(repr, missing))}")
        if unknown:
            problems.append(f"unknown columns {', '.join(unknown)}")
        raise DataError(f"{path}: {'; '.join(problems)} (expected the competition's {len(expected)} columns)")
    table = raw.rename(columns=renames)
    table = table.apply(lambda column: column.str.strip())
    if len(table) == 0:
        raise DataError(f"{path}: no rows")

    ids = table[ID_COLUMN]
    if (ids == "").any():
        raise DataError(f"{path}: empty ID on line {_lines(path, table.index[ids == ''])}")
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"{path}: duplicated IDs {listing(duplicated)}")

    clean = pd.DataFrame({ID_COLUMN: ids})
    empty_cells = {}
    for spec in FIELDS + ((LABEL_FIELD,) if labelled else ()):
        values, empty = _check_column(path, table, spec)
        clean[spec.name] = values
        if spec.empty_allowed:
            empty_cells[spec.name] = empty
    labels = clean.pop(LABEL_COLUMN).to_numpy(dtype=np.int64) if labelled else None
    return clean, labels, empty_cells


def _check_column(path: Path, table: pd.DataFrame, spec: Field) -> tuple[pd.Series, int]:
    text = table[spec.name]
    empty = text == ""
    if empty.any() and not spec.empty_allowed:
        raise DataError(f"{path}: empty {spec.name!r} on {_where(path, table, empty)}")
    values = pd.to_numeric(text.where(~empty), errors="coerce")
    bad = values.isna() & ~empty
    if bad.any():
        raise DataError(f"{path}: {spec.name!r} is not a number on {_where(path, table, bad)}")
    if spec.integer:
        fractional = (values % 1 != 0) & ~empty
        if fractional.any():
            raise DataError(f"{path}: {spec.name!r} must be a whole-number code on {_where(path, table, fractional)}")
    out = ((values < spec.low) | (values > spec.high)) & ~empty
    if out.any():
        low, high = (int(spec.low), int(spec.high)) if spec.integer else (spec.low, spec.high)
        raise DataError(
            f"{path}: {spec.name!r} must be in {low}..{high}; {_where(path, table, out)} "
            f"({listing(text[out].tolist())})"
        )
    return values.astype(np.float64), int(empty.sum())


def _lines(path: Path, index) -> str:
    return listing([int(row) + 2 for row in index])  # line 1 is the header


def _where(path: Path, table: pd.DataFrame, mask: pd.Series) -> str:
    rows = table.index[mask]
    return f"line {_lines(path, rows)} (ID {listing(table.loc[rows, ID_COLUMN].tolist())})"


def match_files(folder: Path, ids: Sequence[str], table: Path) -> tuple[list[Path], int]:
    """The wav file of every ID (IDs without one are an error listing them) and the number of extra wavs."""
    on_disk = {path.stem: path for path in folder.iterdir() if path.suffix.lower() == ".wav"}
    missing = [identifier for identifier in ids if identifier not in on_disk]
    if missing:
        raise DataError(f"{len(missing)} IDs of {table} have no {folder}/<ID>.wav: {listing(missing)}")
    return [on_disk[identifier] for identifier in ids], len(set(on_disk) - set(ids))


def load_split(root: Path, name: str, *, required: bool) -> Split | None:
    """Find and read one split's table, audio folder and (synthetic data only) answers."""
    table_name, folder_name, answers_name = LAYOUT[name]
    table = _find(root, table_name, directory=False)
    if table is None:
        if required:
            raise DataError(f"{root}: no {table_name} (also looked one folder down, spaces or underscores alike)")
        return None
    folder = _find(root, folder_name, directory=True, near=table.parent)
    if folder is None:
        raise DataError(f"{table}: its audio folder {folder_name}/ is not beside it nor in {root}")
    clinical, labels, empty = read_table(table, labelled=name == "train")
    ids = clinical[ID_COLUMN].tolist()
    paths, extra = match_files(folder, ids, table)
    if answers_name is not None:
        answers_path = _find(root, answers_name, directory=False, near=table.parent)
        if answers_path is not None:
            labels = read_answers(answers_path, ids)
    return Split(name, table, ids, paths, clinical, labels, empty, extra)


def read_answers(path: Path, ids: Sequence[str]) -> np.ndarray:
    """Labels of a test list from synthetic data's `ID,Disease category` answers, in the list's order."""
    try:
        answers = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    answers.columns = [normalize_column(c) for c in answers.columns]
    if [normalize_column(ID_COLUMN), normalize_column(LABEL_COLUMN)] != list(answers.columns):
        raise DataError(f"{path}: columns must be {ID_COLUMN!r}, {LABEL_COLUMN!r}")
    answers = answers.rename(columns={"id": ID_COLUMN, "disease category": LABEL_COLUMN})
    if sorted(answers[ID_COLUMN]) != sorted(ids):
        raise DataError(f"{path}: IDs differ from those of its test list")
    values, _ = _check_column(path, answers, LABEL_FIELD)
    return values.set_axis(answers[ID_COLUMN]).loc[list(ids)].to_numpy(dtype=np.int64)


def load_data(root: str | os.PathLike) -> AicupData:
    """Read and check an AI CUP 2023 data folder: the training list and voices, and the public and private
    test lists and voices where present (folders with spaces instead of underscores alike)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    train = load_split(root, "train", required=True)
    tests = [split for name in ("public", "private") if (split := load_split(root, name, required=False))]
    return AicupData(root, train, tests)


# --- clinical encoding -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicalEncoder:
    """The spec's 44 clinical inputs: 20 numeric fields, then one-hot codes of 6 categorical fields.

    Numeric fields in the table's order: Sex − 1, Age / 50, the 9 symptom flags, PPD, Drinking, the 6
    comorbidity flags, VHI-10 / 40; empty PPD and VHI-10 cells are 0 (as the organisers' preprocessing
    did). Then one column per code of Smoking (0-3), frequency (0-3), Onset of dysphonia (1-5), Noise at
    work (1-3), Diurnal pattern (1-4) and Occupational vocal demand (1-4), in that order — the order the
    source's `pd.get_dummies` produced. The codes come from the competition's code book, not from the
    data, so every split gets the same 44 columns (`get_dummies` on a test list lacking a code would have
    shifted the columns).

    Attributes:
        numeric: (column, offset, scale) per numeric input: (value − offset) / scale.
        categories: (column, codes) per one-hot field.
        fitted_on: rows and empty-cell counts of the training table it was fitted on.
    """

    numeric: tuple[tuple[str, float, float], ...]
    categories: tuple[tuple[str, tuple[int, ...]], ...]
    fitted_on: dict = field(default_factory=dict, compare=False)

    @classmethod
    def fit(cls, table: pd.DataFrame) -> ClinicalEncoder:
        """The encoder for a checked training table (`read_table`); it records what it was fitted on."""
        missing = [name for name in FIELD_NAMES if name not in table.columns]
        if missing:
            raise ValueError(f"the table lacks clinical columns {missing}")
        scales = {"Sex": (1.0, 1.0), "Age": (0.0, 50.0), "Voice handicap index - 10": (0.0, 40.0)}
        numeric = tuple((name, *scales.get(name, (0.0, 1.0))) for name in FIELD_NAMES if name not in ONE_HOT)
        by_name = {f.name: f for f in FIELDS}
        categories = tuple(
            (name, tuple(range(int(by_name[name].low), int(by_name[name].high) + 1))) for name in ONE_HOT
        )
        fitted_on = {
            "rows": len(table),
            "empty_cells": {n: int(table[n].isna().sum()) for n in ("PPD", "Voice handicap index - 10")},
        }
        return cls(numeric, categories, fitted_on)

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(codes) for _, codes in self.categories)

    @property
    def input_names(self) -> list[str]:
        """A readable name per input column, e.g. "Age / 50", "Smoking = 2"."""
        names = [
            name if (offset, scale) == (0.0, 1.0) else f"({name} - {offset:g}) / {scale:g}"
            for name, offset, scale in self.numeric
        ]
        return names + [f"{name} = {code}" for name, codes in self.categories for code in codes]

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        """(rows, 44) float32 inputs of a checked table (training or test list)."""
        columns = [
            (table[name].fillna(0.0).to_numpy(np.float64) - offset) / scale for name, offset, scale in self.numeric
        ]
        for name, codes in self.categories:
            values = table[name].to_numpy()
            unknown = sorted(set(values.tolist()) - set(codes))
            if unknown:
                raise ValueError(f"{name!r} has codes {unknown} outside the encoder's {list(codes)}")
            columns += [(values == code).astype(np.float64) for code in codes]
        return np.stack(columns, axis=1).astype(np.float32)

    def to_config(self) -> dict:
        return {
            "numeric": [list(entry) for entry in self.numeric],
            "categories": [[name, list(codes)] for name, codes in self.categories],
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> ClinicalEncoder:
        return cls(
            tuple((name, float(offset), float(scale)) for name, offset, scale in config["numeric"]),
            tuple((name, tuple(int(code) for code in codes)) for name, codes in config["categories"]),
            dict(config.get("fitted_on", {})),
        )


# --- features ------------------------------------------------------------------------------------


def audio_spec(data_recipe: Mapping) -> feature_lib.AudioSpec:
    """librosa.load(sr=44100) then the first 44,100 samples: resampled if needed, shorter clips zero-padded
    (counted), longer ones cropped to the first second (counted)."""
    return feature_lib.AudioSpec(
        data_recipe["sample_rate"], data_recipe["clip_samples"], resample=True, fix_length=True
    )


def mfcc_extractor(sample_rate: int, n_mfcc: int, n_fft: int, hop_length: int) -> Callable:
    """A picklable (clips, samples) → (clips, n_mfcc, frames, 1) librosa MFCC extractor."""
    return functools.partial(_mfcc_image, sample_rate=sample_rate, n_mfcc=n_mfcc, n_fft=n_fft, hop_length=hop_length)


def _mfcc_image(audio: np.ndarray, **parameters) -> np.ndarray:
    return feature_lib.mfcc(audio, parameters.pop("sample_rate"), **parameters)[..., np.newaxis]


def mfcc_cached(paths: Sequence[Path], recipe: dict, n_mfcc: int, name: str, progress: bool = True):
    """Cached raw MFCCs (clips, n_mfcc, frames, 1) of `paths` (one cache per n_mfcc) and the cache's metadata."""
    data, features = recipe["data"], recipe["features"]
    params = {
        "kind": "mfcc",
        "sample_rate": data["sample_rate"],
        "n_mfcc": n_mfcc,
        "n_fft": features["n_fft"],
        "hop_length": features["hop_length"],
    }
    return feature_lib.cached_features(
        paths,
        audio=audio_spec(data),
        extractor=mfcc_extractor(data["sample_rate"], n_mfcc, features["n_fft"], features["hop_length"]),
        params=params,
        cache_dir=recipe["run"]["cache_dir"],
        name=f"{name}-mfcc{n_mfcc}",
        workers=recipe["run"]["workers"] or None,
        progress=progress,
    )


def model_inputs(
    paths: Sequence[str | os.PathLike], manifest: Mapping, clinical: pd.DataFrame | None = None
) -> dict[str, np.ndarray]:
    """Inputs of a saved ensemble for new persons: every variant's MFCCs, and the encoded clinical fields.

    Args:
        paths: one wav per person.
        manifest: the run's manifest (feature parameters, clinical encoder).
        clinical: the persons' clinical columns as `read_table` returns them (needed by multimodal members).

    Returns:
        {"mfcc_<k>": (persons, k, 126, 1) for every variant, "clinical": (persons, 44) if given}.
    """
    from models.aicup import mfcc_input_name

    audio = feature_lib.AudioSpec(**manifest["audio"])
    features = manifest["features"]
    inputs = {
        mfcc_input_name(n_mfcc): feature_lib.extract_features(
            paths,
            audio=audio,
            extractor=mfcc_extractor(audio.sample_rate, n_mfcc, features["n_fft"], features["hop_length"]),
        )
        for n_mfcc in features["n_mfcc"]
    }
    if clinical is not None:
        if len(clinical) != len(paths):
            raise ValueError(f"{len(paths)} audio files but {len(clinical)} clinical rows")
        inputs["clinical"] = ClinicalEncoder.from_config(manifest["clinical_encoder"])(clinical)
    elif manifest["clinical"]:
        raise ValueError("this ensemble is multimodal: pass the persons' clinical fields (clinical=read_table(...)[0])")
    return inputs


def inference_features(paths: Sequence[str | os.PathLike], manifest: Mapping) -> dict[str, np.ndarray]:
    """`Ensemble.features`: the MFCC inputs of an audio-only ensemble (multimodal ones need `model_inputs`)."""
    return model_inputs(paths, manifest)


def predict_members(members: Sequence, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """(members, persons, 5) probabilities; each member gets the inputs it names (its variant's MFCCs)."""
    return np.stack(
        [
            member.predict(
                {tensor.name: inputs[tensor.name] for tensor in member.inputs}, batch_size=batch_size, verbose=0
            )
            for member in members
        ]
    )


def vote(member_probabilities: np.ndarray) -> np.ndarray:
    """The source's ensemble: sum the members' probabilities, argmax, labels 1-5."""
    return np.asarray(member_probabilities).sum(axis=0).argmax(axis=1) + 1


# --- training ----------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """1 / count of each class 1..num_classes in `labels` (the source's CrossEntropyLoss weights)."""
    counts = np.bincount(np.asarray(labels) - 1, minlength=num_classes)
    if (counts == 0).any():
        absent = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else str(i + 1) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"the training split has no person of class {', '.join(absent)}: cannot weight it 1/count")
    return 1.0 / counts


def check_training_classes(split: Split, train_rows: np.ndarray, data_recipe: Mapping) -> None:
    """Every class must have training persons: the loss weighs a class by 1 / its count (the source's), and
    a class the model never sees cannot be learned.

    Raises:
        DataError: naming the table, the absent classes and how many persons of each the table has.
    """
    counts = np.bincount(split.labels[train_rows] - 1, minlength=len(CLASS_NAMES))
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        in_table = np.bincount(split.labels - 1, minlength=len(CLASS_NAMES))
        classes = ", ".join(f"{index + 1} {CLASS_NAMES[index]} ({in_table[index]} in the table)" for index in absent)
        raise DataError(
            f"{split.table}: the training persons (all but validation fold {data_recipe['validation_fold']} of "
            f"{data_recipe['folds']}) have no person of class {classes}; every class needs training persons"
        )


def fold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows: fold `fold` of a seeded stratified k-fold split (the source: fold 0 of 4)."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_rows, validation_rows = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return np.sort(train_rows), np.sort(validation_rows)


@dataclass(frozen=True)
class Fold:
    """One variant's split of the training list: its seed, training rows and validation rows."""

    seed: int
    train_rows: np.ndarray
    validation_rows: np.ndarray


def variant_folds(labels: np.ndarray, data_recipe: Mapping, variants: Sequence[int]) -> dict[int, Fold]:
    """Each n_mfcc variant's training and validation rows: fold `data.validation_fold` of a stratified
    `data.folds`-fold split.

    The source trained each variant in its own notebook, and each notebook drew its own
    `StratifiedKFold(n_splits=4, shuffle=True)` split (no random_state) and validated on its fold 0. With
    `data.split_per_variant` (the default) variant k's split is seeded `data.split_seed + k`, so the variants
    see different persons as the source's did, and a variant's split does not depend on which other variants
    are trained; without it every variant gets the one split seeded `data.split_seed` (comparable variants,
    and an ensemble score on the validation fold).
    """
    folds = {}
    for n_mfcc in variants:
        seed = data_recipe["split_seed"] + (n_mfcc if data_recipe["split_per_variant"] else 0)
        folds[n_mfcc] = Fold(seed, *fold_split(labels, data_recipe["folds"], data_recipe["validation_fold"], seed))
    return folds


def split_summary(labels: np.ndarray, data_recipe: Mapping, folds: Mapping[int, Fold]) -> dict:
    """The manifest's record of the splits: how they were drawn, and per variant its seed, persons, class
    counts and class weights (1/count of its training rows)."""
    return {
        "per_variant": data_recipe["split_per_variant"],
        "folds": data_recipe["folds"],
        "validation_fold": data_recipe["validation_fold"],
        "variants": {
            str(n_mfcc): {
                "seed": fold.seed,
                "train_persons": len(fold.train_rows),
                "validation_persons": len(fold.validation_rows),
                "class_counts": {
                    "train": np.bincount(labels[fold.train_rows] - 1, minlength=len(CLASS_NAMES)).tolist(),
                    "validation": np.bincount(labels[fold.validation_rows] - 1, minlength=len(CLASS_NAMES)).tolist(),
                },
                "class_weights": class_weights(labels[fold.train_rows]).tolist(),
            }
            for n_mfcc, fold in folds.items()
        },
    }


def make_dataset(
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    batch_size: int,
    weights: np.ndarray | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    epoch=0,
    drop_remainder: bool = False,
):
    """A tf.data pipeline of ({input: batch}, one-hot labels[, sample weights]) from in-memory arrays.

    The sample weights are the class weights of each row's label; with the loss's
    `reduction="mean_with_sample_weight"` the batch loss is Σ wᵢ·lossᵢ / Σ wᵢ, exactly PyTorch's weighted
    `CrossEntropyLoss`. The source's training loader shuffled and dropped the last incomplete batch; with
    `shuffle` the rows come in epoch `epoch`'s order for `seed` (`pipeline.shuffled`).
    """
    import tensorflow as tf

    from replicate import pipeline

    elements: tuple = ({key: np.asarray(value, dtype=np.float32) for key, value in inputs.items()},)
    if labels is not None:
        elements += (np.eye(len(CLASS_NAMES), dtype=np.float32)[np.asarray(labels) - 1],)
        if weights is not None:
            elements += (np.asarray(weights, dtype=np.float32)[np.asarray(labels) - 1],)
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed: the order of every epoch is drawn from (seed, epoch)")
    tensors = tf.nest.map_structure(tf.constant, elements if len(elements) > 1 else elements[0])
    rows = tf.range(len(next(iter(inputs.values()))), dtype=tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(pipeline.shuffled(rows, seed, epoch) if shuffle else rows)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.map(
        lambda batch_rows: tf.nest.map_structure(lambda tensor: tf.gather(tensor, batch_rows), tensors),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).prefetch(tf.data.AUTOTUNE)


def uar_scorer(inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> Callable:
    """`BestEpoch`'s score: validation UAR (the competition metric) and macro F1 of a model."""

    def score(model) -> dict[str, float]:
        predicted = predict_members([model], inputs)[0].argmax(axis=1) + 1
        return {
            "val_uar": metrics.unweighted_average_recall(labels, predicted),
            "val_macro_f1": metrics.macro_f1(labels, predicted, labels=list(range(1, len(CLASS_NAMES) + 1))),
        }

    return score


MODALITIES = {True: "multimodal", False: "audio_only"}


def build_model(recipe: dict, n_mfcc: int, clinical: bool):
    """The recipe's model for one n_mfcc variant, multimodal or audio only, uncompiled."""
    from models.aicup import build_aicup_model

    return build_aicup_model(n_mfcc=n_mfcc, clinical=clinical, head_units=recipe["model"]["head_units"])


def train_modality(
    recipe: dict,
    run_dir: Path,
    clinical: bool,
    arrays: Mapping[str, np.ndarray],
    labels: np.ndarray,
    folds: Mapping[int, Fold],
    base_manifest: dict,
    *,
    log: Callable[[str], None],
    progress: bool,
    retrain: bool = False,
) -> dict:
    """Train one seed ensemble per n_mfcc variant, on its own fold (`variant_folds`), into
    `<run>/<modality>/mfcc<k>/`; returns the modality's manifest (all variants' members, paths relative to
    `<run>/<modality>/`), also written there. `retrain`: train again the members trained from another set-up
    (`train.train_ensemble`)."""
    import keras

    from models.aicup import mfcc_input_name
    from replicate import train

    modality = MODALITIES[clinical]
    modality_dir = run_dir / modality
    members = []
    environment = None
    for n_mfcc in recipe["features"]["n_mfcc"]:
        train_rows, validation_rows = folds[n_mfcc].train_rows, folds[n_mfcc].validation_rows
        if recipe["train"]["drop_last_batch"] and len(train_rows) < recipe["train"]["batch_size"]:
            raise DataError(
                f"{len(train_rows)} training persons make no full batch of train.batch_size = "
                f"{recipe['train']['batch_size']} (train.drop_last_batch = true drops incomplete batches)"
            )
        inverse_count = recipe["train"]["class_weights"] == "inverse_count"
        weights = class_weights(labels[train_rows]) if inverse_count else np.ones(len(CLASS_NAMES))
        keys = [mfcc_input_name(n_mfcc)] + (["clinical"] if clinical else [])
        train_inputs = {key: arrays[key][train_rows] for key in keys}
        validation_inputs = {key: arrays[key][validation_rows] for key in keys}
        validation_labels = labels[validation_rows]
        score = uar_scorer(validation_inputs, validation_labels)
        log(
            f"{modality}, n_mfcc {n_mfcc}: {len(train_rows)} training, {len(validation_rows)} validation persons "
            f"(split seed {folds[n_mfcc].seed})"
        )
        variant_dir = modality_dir / f"mfcc{n_mfcc}"
        # The recipe as this variant is trained, so that other variants or modalities leave its members be.
        variant_recipe = {
            **recipe,
            "features": {**recipe["features"], "n_mfcc": [n_mfcc]},
            "model": {**recipe["model"], "clinical": clinical},
        }
        variant_manifest = train.train_ensemble(
            variant_recipe,
            recipe_lib.seeds_of(recipe),
            run_dir=variant_dir,
            manifest={
                **base_manifest,
                "clinical": clinical,
                "features": {**base_manifest["features"], "n_mfcc": [n_mfcc]},
            },
            trained_from={
                "inputs": train_inputs,
                "labels": labels[train_rows],
                "class weights": weights,
                "validation inputs": validation_inputs,  # they choose the best epoch
                "validation labels": validation_labels,
            },
            retrain=retrain,
            log=log,
            build_model=lambda seed, n_mfcc=n_mfcc: build_model(recipe, n_mfcc, clinical),
            train_data=lambda seed, epoch, inputs=train_inputs, rows=train_rows, weights=weights: make_dataset(
                inputs,
                labels[rows],
                weights=weights,
                batch_size=recipe["train"]["batch_size"],
                shuffle=True,
                seed=seed,
                epoch=epoch,
                drop_remainder=recipe["train"]["drop_last_batch"],
            ),
            validation_data=make_dataset(validation_inputs, validation_labels, batch_size=256),
            member_callbacks=lambda member_dir, name, score=score: [
                train.BestEpoch(score, monitor="val_uar", mode="max")
            ],
            verbose="auto" if progress else 0,
        )
        environment = variant_manifest["environment"]
        members += [
            {**member, "n_mfcc": n_mfcc, "file": f"mfcc{n_mfcc}/{member['file']}"}
            for member in variant_manifest["members"]
        ]
        keras.backend.clear_session()
    manifest = {
        **base_manifest,
        "clinical": clinical,
        "modality": modality,
        "members": members,
        "environment": environment,
    }
    files.write_json(modality_dir / train.MANIFEST, manifest)
    return manifest


def input_arrays(
    data: AicupData, recipe: dict, progress: bool = True
) -> tuple[dict[str, dict[str, np.ndarray]], ClinicalEncoder, dict[str, dict[str, int]]]:
    """Every list's model inputs, {"mfcc_<k>": each variant's cached MFCCs, "clinical": the encoded fields}
    per list name ("train", "public", "private"); the clinical encoder (fitted on the training list); and
    the audio changes (padded, cropped clips) per list."""
    from models.aicup import mfcc_input_name

    splits = [data.train, *data.tests]
    arrays: dict[str, dict[str, np.ndarray]] = {split.name: {} for split in splits}
    audio_changes: dict[str, dict[str, int]] = {}
    for n_mfcc in recipe["features"]["n_mfcc"]:
        for split in splits:
            values, meta = mfcc_cached(split.paths, recipe, n_mfcc, f"aicup-{split.name}", progress)
            arrays[split.name][mfcc_input_name(n_mfcc)] = np.asarray(values)
            audio_changes[split.name] = meta["notes"]
    encoder = ClinicalEncoder.fit(data.train.clinical)
    for split in splits:
        arrays[split.name]["clinical"] = encoder(split.clinical)
    return arrays, encoder, audio_changes


def run(
    recipe: dict,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the whole recipe on a data folder; returns the run folder (report.md, submission.csv).
    `retrain`: train again the members trained from another set-up (`train.train_ensemble`)."""
    from replicate import runner, train

    data_root = Path(data_root)
    data = load_data(data_root)
    train_rows, validation_rows = fold_split(
        data.train.labels, recipe["data"]["folds"], recipe["data"]["validation_fold"], recipe["data"]["split_seed"]
    )
    check_training_classes(data.train, train_rows, recipe["data"])
    run_dir = runner.open_run_dir(recipe, data_root, run_dir)
    log(f"run folder: {run_dir}")
    log(
        f"data: {len(data.train.ids)} training persons"
        + "".join(f", {len(split.ids)} {split.name} test persons" for split in data.tests)
    )

    started = time.perf_counter()
    arrays, encoder, audio_changes = input_arrays(data, recipe, progress)
    feature_seconds = time.perf_counter() - started
    splits = [data.train, *data.tests]
    folds = variant_folds(data.train.labels, recipe["data"], recipe["features"]["n_mfcc"])
    base_manifest = {
        "task": "aicup",
        "recipe_name": recipe["name"],
        "class_names": list(CLASS_NAMES),
        "labels": list(range(1, len(CLASS_NAMES) + 1)),
        "audio": vars(audio_spec(recipe["data"])),
        "features": {key: recipe["features"][key] for key in ("n_mfcc", "n_fft", "hop_length")},
        "clinical_encoder": encoder.to_config(),
        "data": {
            "root": str(data_root.resolve()),
            "training_list_persons": len(data.train.ids),
            "split": split_summary(data.train.labels, recipe["data"], folds),
            "test_persons": {split.name: len(split.ids) for split in data.tests},
            "audio_changes": audio_changes,
            "empty_cells_filled": {split.name: split.empty_cells for split in splits},
            "extra_wavs": {split.name: split.extra_wavs for split in splits},
        },
        "feature_seconds": round(feature_seconds, 2),
    }

    modalities = [recipe["model"]["clinical"]]
    if recipe["ensemble"]["compare_modalities"]:
        modalities.append(not recipe["model"]["clinical"])
    manifests = {}
    for clinical in modalities:
        manifests[MODALITIES[clinical]] = train_modality(
            recipe,
            run_dir,
            clinical,
            arrays["train"],
            data.train.labels,
            folds,
            base_manifest,
            log=log,
            progress=progress,
            retrain=retrain,
        )
    main_modality = MODALITIES[recipe["model"]["clinical"]]
    main = manifests[main_modality]
    files.write_json(
        run_dir / train.MANIFEST,
        {
            **main,
            "members": [{**m, "file": f"{main_modality}/{m['file']}"} for m in main["members"]],
            "peak_memory_mb": train.peak_memory_mb(),
        },
    )
    evaluate_and_report(run_dir, data, arrays, folds, list(manifests), main_modality, log=log)
    return run_dir


# --- evaluation and report ---------------------------------------------------------------------


def classification_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """UAR, macro F1, per-class recall and the confusion matrix (rows true 1-5, columns predicted 1-5)."""
    from sklearn import metrics as sk_metrics

    classes = list(range(1, len(CLASS_NAMES) + 1))
    return {
        "persons": len(labels),
        "uar": metrics.unweighted_average_recall(labels, predicted),
        "macro_f1": metrics.macro_f1(labels, predicted, labels=classes),
        "recall": sk_metrics.recall_score(labels, predicted, labels=classes, average=None, zero_division=0).tolist(),
        "confusion": sk_metrics.confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def evaluate_and_report(
    run_dir: Path,
    data: AicupData,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    folds: Mapping[int, Fold],
    modalities: Sequence[str],
    main_modality: str,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Predict every split with every member of each modality, write submission.csv (the main modality's
    five-variant vote), score where labels exist, and write report.md.

    Each member is scored on its own variant's validation fold. The ensemble is scored on the validation
    fold only when every variant shares one (`data.split_per_variant = false`): with a split per variant, a
    person validating one variant trained another.

    Raises:
        PredictionError: a member predicts a NaN or infinite probability (before anything is written).
    """
    from replicate.ensemble import Ensemble, check_finite

    # split → (inputs, labels, rows of each variant or None for all rows)
    evaluation = {
        "validation": (arrays["train"], data.train.labels, {k: fold.validation_rows for k, fold in folds.items()})
    }
    for split in data.tests:
        evaluation[split.name] = (arrays[split.name], split.labels, None)

    scores: dict = {"modalities": {}, "main": main_modality}
    saved = {}
    for modality in modalities:
        ensemble = Ensemble.load(run_dir / modality)
        entries = ensemble.manifest["members"]
        variants = sorted({e["n_mfcc"] for e in entries})
        modality_scores = {
            "members": [{"n_mfcc": e["n_mfcc"], "seed": e["seed"], "best_epoch": e.get("best_epoch")} for e in entries],
            "splits": {},
        }
        for split_name, (inputs, labels, rows_of) in evaluation.items():
            persons = len(next(iter(inputs.values())))
            rows = {k: np.arange(persons) if rows_of is None else rows_of[k] for k in variants}
            shared = all(np.array_equal(rows[k], rows[variants[0]]) for k in variants)
            member_rows = [rows[e["n_mfcc"]] for e in entries]
            member_probabilities = [  # (its variant's rows, 5) per member
                predict_members([member], inputs if rows_of is None else {key: v[own] for key, v in inputs.items()})[0]
                for member, own in zip(ensemble.members, member_rows, strict=True)
            ]
            names = [f"{e['seed']} (n_mfcc {e['n_mfcc']})" for e in entries]
            check_finite(member_probabilities, names, f"{run_dir / modality}: the {split_name} persons")
            of_variant = {k: [i for i, e in enumerate(entries) if e["n_mfcc"] == k] for k in variants}
            variant_probabilities = {k: np.stack([member_probabilities[i] for i in of_variant[k]]) for k in variants}
            if shared:
                saved[f"{modality}/{split_name}"] = np.stack(member_probabilities)
            else:  # each variant on its own persons
                saved.update({f"{modality}/{split_name}_mfcc{k}": variant_probabilities[k] for k in variants})
            if labels is None:
                continue
            split_scores = {
                "persons": {str(k): len(rows[k]) for k in variants},
                "member_uar": [
                    metrics.unweighted_average_recall(labels[member_rows[i]], vote(p[None]))
                    for i, p in enumerate(member_probabilities)
                ],
                "variant_uar": {
                    str(k): metrics.unweighted_average_recall(labels[rows[k]], vote(variant_probabilities[k]))
                    for k in variants
                },
            }
            if shared:
                split_scores["ensemble"] = classification_scores(
                    labels[rows[variants[0]]], vote(saved[f"{modality}/{split_name}"])
                )
            modality_scores["splits"][split_name] = split_scores
        scores["modalities"][modality] = modality_scores

    with files.atomic_path(run_dir / "predictions.npz", suffix=".npz") as temporary:
        np.savez(temporary, **{key.replace("/", "__"): value for key, value in saved.items()})
    if data.tests:
        lines = []
        for split in data.tests:
            labels = vote(saved[f"{main_modality}/{split.name}"])
            lines += [f"{identifier},{label}" for identifier, label in zip(split.ids, labels, strict=True)]
        files.write_text(run_dir / "submission.csv", "\n".join(lines) + "\n")
        log(f"submission: {run_dir / 'submission.csv'}")

    majority = np.bincount(data.train.labels).argmax()
    scores["majority_class"] = int(majority)
    # A constant prediction's UAR is 1 / (classes present): the same on every variant's stratified fold.
    scores["majority_uar"] = {}
    for name, (_, labels, rows_of) in evaluation.items():
        if labels is not None:
            held_out = labels if rows_of is None else labels[next(iter(rows_of.values()))]
            scores["majority_uar"][name] = metrics.unweighted_average_recall(held_out, np.full(len(held_out), majority))
    scores["headline"] = headline(scores, recipe_lib.load_recipe(run_dir / "recipe.toml")["source"])
    files.write_json(run_dir / "scores.json", scores)
    write_report(run_dir, scores)
    log(f"report: {run_dir / 'report.md'}")
    return scores


def headline(scores: dict, source: dict) -> str:
    """The run's result in a phrase (the command line's last line): the submission ensemble's UAR on the first
    scored split of public, private, validation, beside the source's number on that split."""
    modality = scores["main"]
    splits = scores["modalities"][modality]["splits"]
    split = next((name for name in ("public", "private", "validation") if name in splits), None)
    if split is None:
        return "not scored"
    members = scores["modalities"][modality]["members"]
    variants = len({member["n_mfcc"] for member in members})
    text = (
        f"{split} UAR {splits[split]['ensemble']['uar']:.4f} ({MODALITY_WHAT[modality]}, {variants} variant(s) × "
        f"{len(members) // max(1, variants)} seed(s)"
    )
    reported = next((entry for entry in source["reported"] if split in entry["split"]), None)
    if reported is None:
        return text + ")"
    return text + f"; source: {reported['what']} {reported['uar']:.4f} on the real data, {reported['split']})"


SPLIT_WHAT = {
    "validation": "validation fold (held-out training persons)",
    "validation_per_variant": "each variant's own validation fold (held-out training persons)",
    "public": "public test list (synthetic answers)",
    "private": "private test list (synthetic answers)",
}
MODALITY_WHAT = {"multimodal": "MFCC + clinical", "audio_only": "MFCC only"}


def results_table(run_dir: str | os.PathLike) -> str:
    """The README's results table: the source's reported numbers beside ours, each labelled."""
    run_dir = Path(run_dir)
    scores = files.read_json(run_dir / "scores.json")
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    rows = [
        (f"source: {entry['what']}", f"real AI CUP 2023 data, {entry['split']}", f"{entry['uar']:.4f}", "")
        for entry in recipe["source"]["reported"]
    ]
    for modality, modality_scores in scores["modalities"].items():
        variants = sorted({m["n_mfcc"] for m in modality_scores["members"]})
        seeds = len(modality_scores["members"]) // max(1, len(variants))
        for split, split_scores in modality_scores["splits"].items():
            first = str(variants[0])
            # no ensemble score: validation folds that differ between the variants
            what = SPLIT_WHAT[split if "ensemble" in split_scores else "validation_per_variant"]
            where = f"our synthetic data, {what}, {split_scores['persons'][first]} persons"
            rows.append(
                (
                    f"ours: {MODALITY_WHAT[modality]}, n_mfcc {first} alone",
                    where,
                    f"{split_scores['variant_uar'][first]:.4f}",
                    "",
                )
            )
            if "ensemble" in split_scores:  # not on validation folds that differ between the variants
                rows.append(
                    (
                        f"ours: {MODALITY_WHAT[modality]}, {len(variants)} variants × {seeds} seed(s)",
                        where,
                        f"{split_scores['ensemble']['uar']:.4f}",
                        f"{split_scores['ensemble']['macro_f1']:.4f}",
                    )
                )
    chance = sorted({round(value, 4) for value in scores["majority_uar"].values()})
    rows.append(
        (
            "ours: always the majority class",
            "our synthetic data, every split above",
            ", ".join(f"{value:.4f}" for value in chance),
            "",
        )
    )
    environment = manifest["environment"]
    split = manifest["data"]["split"]
    training_persons = sorted({variant["train_persons"] for variant in split["variants"].values()})
    caption = (
        f"UAR (the competition metric: mean per-class recall; chance 0.2) and macro F1. Ours: profile "
        f"`{recipe['run']['profile']}`, {recipe['train']['epochs']} epochs per member, the epoch with the best "
        f"validation-fold UAR kept (so validation-fold scores are optimistic, as the source's 0.7305 is; the test "
        f"lists are unseen persons), {' or '.join(map(str, training_persons))} training persons, "
        f"{_split_line(split)}; {environment['machine']}, {environment['date'][:10]}, "
        f"commit {short_commit(environment['git'])}."
    )
    return report.markdown_table(("model", "data", "UAR", "macro F1"), rows) + "\n\n" + caption + "\n"


def _split_line(split: Mapping) -> str:
    """How the manifest's splits were drawn, in words."""
    seeds = ", ".join(f"{k}: {variant['seed']}" for k, variant in split["variants"].items())
    how = f"fold {split['validation_fold']} of a stratified {split['folds']}-fold split"
    if split["per_variant"]:
        return f"{how} per variant, as the source's notebooks drew them (seeds by n_mfcc {seeds})"
    return f"{how} shared by every variant (seed {next(iter(split['variants'].values()))['seed']})"


def write_report(run_dir: Path, scores: dict) -> Path:
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    lines = [
        f"# AI CUP 2023 pathological voice — run `{run_dir.name}`",
        "",
        f"Recipe `{recipe['name']}`, profile `{recipe['run']['profile']}`; data `{manifest['data']['root']}`. "
        f"The submission ensemble is the `{scores['main']}` one. The source's numbers are on the real competition "
        "data; ours on the data named in each row. UAR: unweighted average recall (mean of the five per-class "
        "recalls), chance 0.2.",
        "",
        "## Results",
        "",
        results_table(run_dir),
    ]
    if len(scores["modalities"]) > 1:
        lines += ["### Audio only vs multimodal", ""]
        splits = [
            name
            for name, split_scores in next(iter(scores["modalities"].values()))["splits"].items()
            if "ensemble" in split_scores
        ]
        lines.append(
            report.markdown_table(
                ("ensemble",) + tuple(f"UAR {s}" for s in splits) + tuple(f"macro F1 {s}" for s in splits),
                [
                    (
                        MODALITY_WHAT[m],
                        *(v["splits"][s]["ensemble"]["uar"] for s in splits),
                        *(v["splits"][s]["ensemble"]["macro_f1"] for s in splits),
                    )
                    for m, v in scores["modalities"].items()
                ],
            )
        )
        lines.append("")
    for modality, modality_scores in scores["modalities"].items():
        lines += [f"## {MODALITY_WHAT[modality]} (`{modality}`)", ""]
        for split, split_scores in modality_scores["splits"].items():
            variant_line = (
                "UAR of each variant's seed ensemble: "
                + ", ".join(f"n_mfcc {k}: {v:.4f}" for k, v in split_scores["variant_uar"].items())
                + f"; single members: {report.mean_std(split_scores['member_uar'])} (mean ± std)."
            )
            if "ensemble" not in split_scores:
                lines += [
                    f"### {SPLIT_WHAT['validation_per_variant']}",
                    "",
                    "No ensemble score: each variant was validated on its own fold, as in the source, so a person "
                    "held out by one variant trained another (`data.split_per_variant = false` shares one split).",
                    "",
                    variant_line,
                    "",
                ]
                continue
            ensemble = split_scores["ensemble"]
            plot = f"confusion_{modality}_{split}.png"
            report.plot_confusion_matrix(
                np.array(ensemble["confusion"]),
                [f"{i + 1} {name}" for i, name in enumerate(CLASS_NAMES)],
                run_dir / plot,
                title=f"{MODALITY_WHAT[modality]}, {split}",
            )
            lines += [
                f"### {SPLIT_WHAT[split]}: UAR {ensemble['uar']:.4f}, macro F1 {ensemble['macro_f1']:.4f}",
                "",
                report.markdown_table(
                    ("class", "recall", "persons"),
                    [
                        (f"{i + 1} {name}", ensemble["recall"][i], int(np.sum(ensemble["confusion"][i])))
                        for i, name in enumerate(CLASS_NAMES)
                    ],
                ),
                "",
                variant_line,
                "",
                f"![confusion matrix]({plot})",
                "",
            ]
    main_manifest = files.read_json(run_dir / scores["main"] / "manifest.json")
    histories = {
        f"n_mfcc {m['n_mfcc']}, seed {m['seed']}": report.read_history(
            run_dir / scores["main"] / m["file"].replace(".keras", ".history.csv")
        )
        for m in main_manifest["members"]
    }
    report.plot_training_curves(histories, run_dir / "training_curves.png")
    data = manifest["data"]
    lines += [
        "## Members",
        "",
        report.markdown_table(
            ("modality", "n_mfcc", "seed", "best epoch", "best validation UAR", "epochs", "train s"),
            [
                (
                    m,
                    e["n_mfcc"],
                    e["seed"],
                    e.get("best_epoch", "?"),
                    e.get("best", {}).get("val_uar", float("nan")),
                    e["epochs"],
                    f"{e['train_seconds']:.0f}",
                )
                for m in scores["modalities"]
                for e in files.read_json(run_dir / m / "manifest.json")["members"]
            ],
        ),
        "",
        f"![training curves](training_curves.png) (the `{scores['main']}` members)",
        "",
        "## Data and features",
        "",
        f"- Persons: {data['training_list_persons']} in the training list, split into training and validation "
        f"persons by {_split_line(data['split'])}; test lists: {data['test_persons'] or 'none'}.",
        "",
        report.markdown_table(
            ("n_mfcc", "split seed", "training", "validation", "class counts 1-5 (training; validation)", "weights"),
            [
                (
                    k,
                    variant["seed"],
                    variant["train_persons"],
                    variant["validation_persons"],
                    f"{variant['class_counts']['train']}; {variant['class_counts']['validation']}",
                    np.round(variant["class_weights"], 5).tolist(),
                )
                for k, variant in data["split"]["variants"].items()
            ],
        ),
        "",
        f"- MFCC: {manifest['audio']['sample_rate']} Hz, first {manifest['audio']['num_samples']} samples, n_fft "
        f"{manifest['features']['n_fft']}, hop {manifest['features']['hop_length']}, "
        f"n_mfcc {manifest['features']['n_mfcc']}; "
        "standardised per frame over the coefficients (the model's first layer).",
        f"- Audio changed to be usable (padded: shorter than 1 s, zero-padded; cropped: longer, first second kept): "
        f"{report.audio_changes(data['audio_changes'])}.",
        f"- Empty clinical cells filled with 0: {_empty_cells_line(data['empty_cells_filled'])}. Wav files without a "
        f"row (ignored): {_counts_line(data['extra_wavs'])}.",
        f"- Clinical encoder: {ClinicalEncoder.from_config(manifest['clinical_encoder']).width} inputs, fitted on "
        f"{manifest['clinical_encoder']['fitted_on']['rows']} training rows (saved in manifest.json).",
        f"- Feature extraction (or cache read): {manifest['feature_seconds']} s. Peak resident memory: "
        f"{report.memory_line(manifest.get('peak_memory_mb'))}.",
        f"- Environment: {report.environment_line(manifest['environment'])}.",
        "",
    ]
    return files.write_text(run_dir / "report.md", "\n".join(lines))


def _empty_cells_line(empty: Mapping[str, Mapping[str, int]]) -> str:
    parts = [
        f"{split}: " + ", ".join(f"{n} {column}" for column, n in cells.items())
        for split, cells in empty.items()
        if any(cells.values())
    ]
    return "; ".join(parts) or "none"


def _counts_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in counts.items() if n) or "none"


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from replicate import runner

    return runner.command_line(
        argv,
        prog="python -m replicate.aicup",
        description="AI CUP 2023 pathological voice, 6th private: MFCC CNN + clinical MLP, five-variant ensemble.",
        data_help="Training_Dataset/training_datalist.csv + training_voice_data/, and the public/private "
        "test lists and folders (spaces instead of underscores also work)",
        load_recipe=load_recipe,
        run=run,
    )


if __name__ == "__main__":
    sys.exit(main())
