"""AI CUP 2023's data layout: the training list and the public and private test lists (each a CSV of IDs and
26 clinical columns, and a folder of one wav per ID), found with spaces or underscores in their names; every
cell checked, every problem a `DataError` naming the file, the line, the ID and the column."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from replicate.task import DataError, csv_lines, find_in_layout, header_names, listing, read_csv, wav_files_by_id

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


@dataclass(frozen=True)
class Field:
    """One clinical column: its allowed values and whether an empty cell is allowed (then filled)."""

    name: str
    low: float
    high: float
    integer: bool = True
    empty_allowed: bool = False


# The 26 clinical columns in the competition's order (docs/aicup.md, "Data layout"). Codes are integers in
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


def normalize_column(name: str) -> str:
    """Column names compared case-, space- and dash-insensitively: "Onset of dysphonia " → "onset of dysphonia"."""
    return re.sub(r"[\s_]+", " ", str(name).replace("\ufeff", "")).strip().lower()


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


# (table, audio folder, answers of synthetic data) of each split, as `task.layout_name`s.
LAYOUT = {
    "train": ("training_datalist.csv", "training_voice_data", None),
    "public": ("test_datalist_public.csv", "test_data_public", "test_answer_public.csv"),
    "private": ("test_datalist_private.csv", "test_data_private", "test_answer_private.csv"),
}


def read_table(path: Path, *, labelled: bool) -> tuple[pd.DataFrame, np.ndarray | None, dict[str, int]]:
    """A datalist CSV, every cell checked: (`ID` and the 26 clinical columns under their canonical names,
    labels 1-5 if `labelled` (the training list) else None, the number of empty PPD / VHI-10 cells).

    Raises:
        DataError: unreadable file; missing, unknown or repeated columns (by name); duplicated or empty IDs;
            an empty cell outside PPD / VHI-10, a non-number, a non-integer code or a value out of range,
            naming the line, the ID and the column.
    """
    raw = _read_csv(path)
    expected = [ID_COLUMN, *FIELD_NAMES] + ([LABEL_COLUMN] if labelled else [])
    optional = [] if labelled else [LABEL_COLUMN]  # a test list may carry a label column or not
    table = raw.rename(columns=header_names(path, raw.columns, expected, normalize_column, optional=optional))
    table = table.apply(lambda column: column.str.strip())
    if len(table) == 0:
        raise DataError(f"{path}: no rows")
    ids = table[ID_COLUMN]
    if (ids == "").any():
        raise DataError(f"{path}: empty ID on {csv_lines(table, table.index[ids == ''])}")
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


def _read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text, empty cells as "" (not NaN): each is checked by its column's rule."""
    return read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)


def _check_column(path: Path, table: pd.DataFrame, spec: Field) -> tuple[pd.Series, int]:
    text = table[spec.name]
    empty = text == ""
    if empty.any() and not spec.empty_allowed:
        raise DataError(f"{path}: empty {spec.name!r} on {_where(table, empty)}")
    values = pd.to_numeric(text.where(~empty), errors="coerce")
    bad = values.isna() & ~empty
    if bad.any():
        raise DataError(f"{path}: {spec.name!r} is not a number on {_where(table, bad)}")
    if spec.integer:
        fractional = (values % 1 != 0) & ~empty
        if fractional.any():
            raise DataError(f"{path}: {spec.name!r} must be a whole-number code on {_where(table, fractional)}")
    out = ((values < spec.low) | (values > spec.high)) & ~empty
    if out.any():
        low, high = (int(spec.low), int(spec.high)) if spec.integer else (spec.low, spec.high)
        raise DataError(
            f"{path}: {spec.name!r} must be in {low}..{high}; {_where(table, out)} ({listing(text[out].tolist())})"
        )
    return values.astype(np.float64), int(empty.sum())


def _where(table: pd.DataFrame, mask: pd.Series) -> str:
    return csv_lines(table, table.index[mask], ID_COLUMN)


def load_split(root: Path, name: str, *, required: bool) -> Split | None:
    """Find and read one split's table, audio folder and (synthetic data only) answers."""
    table_name, folder_name, answers_name = LAYOUT[name]
    table = find_in_layout(root, table_name, directory=False)
    if table is None:
        if required:
            raise DataError(f"{root}: no {table_name} (also looked one folder down, spaces or underscores alike)")
        return None
    folder = find_in_layout(root, folder_name, directory=True, near=table.parent)
    if folder is None:
        raise DataError(f"{table}: its audio folder {folder_name}/ is not beside it nor in {root}")
    clinical, labels, empty = read_table(table, labelled=name == "train")
    ids = clinical[ID_COLUMN].tolist()
    paths, extra = wav_files_by_id(folder, ids, table)
    if answers_name is not None:
        answers_path = find_in_layout(root, answers_name, directory=False, near=table.parent)
        if answers_path is not None:
            labels = read_answers(answers_path, ids)
    return Split(name, table, ids, paths, clinical, labels, empty, len(extra))


def read_answers(path: Path, ids: Sequence[str]) -> np.ndarray:
    """Labels of a test list from synthetic data's `ID,Disease category` answers, in the list's order."""
    answers = _read_csv(path)
    if [normalize_column(c) for c in answers.columns] != ["id", "disease category"]:
        raise DataError(f"{path}: columns must be {ID_COLUMN!r}, {LABEL_COLUMN!r}")
    answers.columns = [ID_COLUMN, LABEL_COLUMN]
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
