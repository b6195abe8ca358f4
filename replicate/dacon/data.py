"""DACON's data layout: train/ and test/ wav files matched by id to train_answer.csv and the template
submission.csv (and test_answer.csv, which only synthetic data have); every problem is a `DataError`
naming the file and the ids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replicate.task import DataError, listing, read_csv

ANSWER_TOLERANCE = 1e-3  # a label row must sum to 1 within this


@dataclass
class DaconData:
    """One data folder: file paths matched to label rows by id."""

    root: Path
    class_names: list[str]
    train_ids: list[str]
    train_paths: list[Path]
    train_targets: np.ndarray
    test_ids: list[str]
    test_paths: list[Path]
    test_targets: np.ndarray | None  # only synthetic data has answers for the test clips
    submission_columns: list[str]


def read_answers(
    path: Path, class_names: Sequence[str] | None = None, check_rows: bool = True, template: str = "submission.csv"
) -> pd.DataFrame:
    """Read an answer or submission CSV (`id` + one column per class) and check it.

    Args:
        path: the CSV.
        class_names: the columns it must have after `id`, in order (None: take them from the file).
        check_rows: check that every row is a distribution (not for the submission template).
        template: the file `class_names` come from, named in the error when the columns differ.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    table = read_csv(path, dtype={"id": str})
    if table.columns[0] != "id":
        raise DataError(f"{path}: the first column must be 'id', found {table.columns[0]!r}")
    columns = list(table.columns[1:])
    if class_names is not None and columns != list(class_names):
        extra = [column for column in columns if column not in class_names]
        missing = [name for name in class_names if name not in columns]
        differences = ([f"extra columns {listing(extra)}"] if extra else []) + (
            [f"missing {listing(missing)}"] if missing else []
        )
        raise DataError(
            f"{path}: the columns after 'id' must be {template}'s {len(class_names)} classes in its order; "
            + ("; ".join(differences) or "the same columns in another order")
        )
    if table.empty:
        raise DataError(f"{path}: no rows (only the header)")
    if len(columns) < 2:
        raise DataError(f"{path}: needs at least two label columns after 'id'")
    duplicated = table["id"][table["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{path}: duplicated ids {listing(duplicated)}")
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    bad = table["id"][values.isna().any(axis=1) | ~np.isfinite(values).all(axis=1)].tolist()
    if bad:
        raise DataError(f"{path}: non-numeric, empty or non-finite values in the rows of ids {listing(bad)}")
    if check_rows:
        negative = table["id"][(values < 0).any(axis=1)].tolist()
        if negative:
            raise DataError(f"{path}: negative shares in the rows of ids {listing(negative)}")
        sums = values.sum(axis=1)
        off = table["id"][(sums - 1).abs() > ANSWER_TOLERANCE].tolist()
        if off:
            raise DataError(f"{path}: rows must sum to 1 (±{ANSWER_TOLERANCE}); they do not for ids {listing(off)}")
    table[columns] = values.astype(np.float32)
    return table


def match_files(folder: Path, ids: Sequence[str], table: Path) -> list[Path]:
    """The wav file of every id, in the table's order; any missing or extra file is an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected one wav file per id of {table.name})")
    on_disk = {path.stem: path for path in folder.glob("*.wav")}
    missing = [identifier for identifier in ids if identifier not in on_disk]
    extra = sorted(set(on_disk) - set(ids))
    problems = []
    if missing:
        problems.append(f"{len(missing)} ids of {table.name} have no {folder.name}/<id>.wav: {listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} wav files in {folder} have no row in {table.name}: {listing(extra)}")
    if problems:
        raise DataError("; ".join(problems))
    return [on_disk[identifier] for identifier in ids]


def load_data(root: str | os.PathLike) -> DaconData:
    """Read and check a DACON data folder: train/, test/, train_answer.csv, submission.csv
    (and test_answer.csv, which only synthetic data has)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    submission = read_answers(root / "submission.csv", check_rows=False)  # the template: ids and class columns
    class_names = list(submission.columns[1:])
    train = read_answers(root / "train_answer.csv", class_names)
    test_targets = None
    if (root / "test_answer.csv").is_file():
        answers = read_answers(root / "test_answer.csv", class_names)
        if answers["id"].tolist() != submission["id"].tolist():
            raise DataError(f"{root / 'test_answer.csv'}: ids differ from submission.csv's (same ids, same order)")
        test_targets = answers[class_names].to_numpy()
    return DaconData(
        root=root,
        class_names=class_names,
        train_ids=train["id"].tolist(),
        train_paths=match_files(root / "train", train["id"].tolist(), root / "train_answer.csv"),
        train_targets=train[class_names].to_numpy(),
        test_ids=submission["id"].tolist(),
        test_paths=match_files(root / "test", submission["id"].tolist(), root / "submission.csv"),
        test_targets=test_targets,
        submission_columns=list(submission.columns),
    )
