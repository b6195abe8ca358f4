"""DCASE 2020 Task 2's data layout: dev_data/<type>/{train,test}/ and eval_data/<type>/{train,test}/, machine
type from the folder, machine ID and label from the file name alone (`eval_ground_truth.csv`, which only
synthetic data have, labels the evaluation test clips); every problem is a `DataError` naming the file."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from replicate.task import DataError, listing, read_csv, repeated_rows

# File names of the official layout, matched on the file name only (a directory may look like an ID).
LABELLED_NAME = re.compile(r"^(normal|anomaly)_id_(\d+)_(\d+)\.wav$")
EVAL_TEST_NAME = re.compile(r"^id_(\d+)_(\d+)\.wav$")


@dataclass(frozen=True)
class Clip:
    """One wav file: where it is and what its name says."""

    path: Path
    machine_type: str
    machine_id: str  # "00" … "07", as in the file name
    label: int | None  # 0 normal, 1 anomaly, None unknown (evaluation test files)
    dataset: str  # "dev" or "eval"
    split: str  # "train" or "test"

    @property
    def class_name(self) -> str:
        """Its machine ID's class, e.g. "fan/id_00": what the models classify."""
        return f"{self.machine_type}/id_{self.machine_id}"


@dataclass
class DcaseData:
    """A data folder: training clips of every ID, labelled dev test clips, evaluation test clips (labelled
    only by `eval_ground_truth.csv`)."""

    root: Path
    machine_types: list[str]
    train: list[Clip]
    dev_test: list[Clip]
    eval_test: list[Clip]
    eval_labels: np.ndarray | None = None  # from eval_ground_truth.csv, in eval_test's order
    ignored: list[str] = field(default_factory=list)  # files that are not .wav (listed in the report)

    @property
    def class_names(self) -> list[str]:
        return sorted({clip.class_name for clip in self.train})

    def class_names_of(self, machine_types: Sequence[str]) -> list[str]:
        """The classes (machine IDs) of these machine types."""
        return [name for name in self.class_names if name.split("/")[0] in machine_types]


EXPECTED_NAMES = {
    True: "normal_id_<ID>_<index>.wav or anomaly_id_…",
    False: "id_<ID>_<index>.wav (evaluation test files)",
    None: "normal_id_<ID>_<index>.wav, anomaly_id_… or id_<ID>_<index>.wav",
}


def parse_name(path: Path, *, labelled: bool | None) -> tuple[int | None, str]:
    """(label, machine ID) from a file name alone: `normal_id_00_00000012.wav` → (0, "00").

    Args:
        path: the file; only its name is parsed (directories such as `id_03/` are ignored).
        labelled: the name must carry `normal_`/`anomaly_` (train and dev test); False: `id_XX_n.wav` (eval
            test); None: either (a clip given for scoring).

    Raises:
        DataError: the name does not have the official form (a two-digit ID among them).
    """
    name = Path(path).name
    match = LABELLED_NAME.match(name) if labelled is not False else None
    if match:
        label, machine_id = (1 if match.group(1) == "anomaly" else 0), match.group(2)
    elif labelled is not True and (match := EVAL_TEST_NAME.match(name)):
        label, machine_id = None, match.group(1)
    else:
        raise DataError(f"{path}: file name does not parse; expected {EXPECTED_NAMES[labelled]}")
    if len(machine_id) != 2:  # "id_0" beside "id_00" would be two IDs of one machine
        raise DataError(f"{path}: machine ID {machine_id!r} must have two digits, as in the official layout (id_00)")
    return label, machine_id


def clip_to_score(path: Path, machine_types: Sequence[str]) -> Clip:
    """A clip given for scoring: its machine ID from its file name, its machine type from the nearest of the
    two folders above it that names one of `machine_types` (`<type>/test/<file>` in the official layout, or
    `<type>/<file>`)."""
    path = Path(path)
    label, machine_id = parse_name(path, labelled=None)
    machine_type = next((folder.name for folder in path.parents[:2] if folder.name in machine_types), None)
    if machine_type is None:
        raise DataError(
            f"{path}: no machine type in its folders; expected <type>/test/{path.name} or <type>/{path.name} "
            f"with a type of the run ({listing(machine_types)})"
        )
    return Clip(path, machine_type, machine_id, label, dataset="", split="test")


def _clips_in(folder: Path, machine_type: str, dataset: str, split: str, ignored: list[str]) -> list[Clip]:
    clips = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() != ".wav":
            ignored.append(str(path))
            continue
        labelled = not (dataset == "eval" and split == "test")
        label, machine_id = parse_name(path, labelled=labelled)
        if split == "train" and label == 1:
            raise DataError(f"{path}: an anomalous clip in a training folder (training data are normal only)")
        clips.append(Clip(path, machine_type, machine_id, label, dataset, split))
    return clips


def _check_test_ids(dev_root: Path, machine_type: str, train: list[Clip], tests: list[Clip]) -> None:
    """Every test clip's ID has training clips, and every dev test ID has both labels (for its AUC)."""
    trained_ids = {clip.machine_id for clip in train}
    for clip in tests:
        if clip.machine_id not in trained_ids:
            raise DataError(
                f"{clip.path}: machine ID {clip.machine_id} of {machine_type} has no training files "
                f"(training IDs: {listing(sorted(trained_ids))})"
            )
    dev_test = [clip for clip in tests if clip.dataset == "dev"]
    for machine_id in sorted({clip.machine_id for clip in dev_test}):
        if {clip.label for clip in dev_test if clip.machine_id == machine_id} != {0, 1}:
            raise DataError(
                f"{dev_root / machine_type / 'test'}: ID {machine_id} needs normal_ and anomaly_ test files for AUC"
            )


def load_data(root: str | os.PathLike) -> DcaseData:
    """Read and check a DCASE 2020 Task 2 folder: dev_data/<type>/{train,test}/ and, if present,
    eval_data/<type>/{train,test}/ and `eval_ground_truth.csv` (which only synthetic data have)."""
    root = Path(root)
    dev_root, eval_root = root / "dev_data", root / "eval_data"
    if not dev_root.is_dir():
        raise DataError(f"{dev_root}: folder not found (expected dev_data/<machine_type>/train and test)")
    machine_types = sorted(path.name for path in dev_root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not machine_types:
        raise DataError(f"{dev_root}: no machine-type folders")
    data = DcaseData(root, machine_types, [], [], [])
    for machine_type in machine_types:
        train = _clips_in(dev_root / machine_type / "train", machine_type, "dev", "train", data.ignored)
        train += _clips_in(eval_root / machine_type / "train", machine_type, "eval", "train", data.ignored)
        if not train:
            raise DataError(f"{dev_root / machine_type / 'train'}: machine type {machine_type!r} has no training files")
        dev_test = _clips_in(dev_root / machine_type / "test", machine_type, "dev", "test", data.ignored)
        eval_test = _clips_in(eval_root / machine_type / "test", machine_type, "eval", "test", data.ignored)
        _check_test_ids(dev_root, machine_type, train, dev_test + eval_test)
        data.train += train
        data.dev_test += dev_test
        data.eval_test += eval_test
    eval_types = {path.name for path in eval_root.iterdir()} if eval_root.is_dir() else set()
    unknown = sorted(name for name in eval_types - set(machine_types) if not name.startswith("."))
    if unknown:
        raise DataError(f"{eval_root}: machine types {listing(unknown)} are not in dev_data")
    data.eval_labels = read_ground_truth(root, data.eval_test)
    return data


def read_ground_truth(root: Path, eval_test: Sequence[Clip]) -> np.ndarray | None:
    """Labels of the evaluation test clips from `eval_ground_truth.csv` (machine_type,file,label), or None."""
    path = root / "eval_ground_truth.csv"
    if not path.is_file() or not eval_test:
        return None
    table = read_csv(path, dtype={"machine_type": str, "file": str})
    if list(table.columns) != ["machine_type", "file", "label"]:
        raise DataError(f"{path}: columns must be machine_type,file,label; found {list(table.columns)}")
    bad = table.index[~table["label"].isin([0, 1])].tolist()
    if bad:
        raise DataError(f"{path}: labels must be 0 or 1 (rows {listing([row + 2 for row in bad])})")
    repeated = repeated_rows(table, ["machine_type", "file"], "label", "labels ")
    if repeated:
        raise DataError(f"{path}: more than one row for {listing(repeated)}; one label per file")
    labels = {(row.machine_type, row.file): int(row.label) for row in table.itertuples()}
    keys = [(clip.machine_type, clip.path.name) for clip in eval_test]
    missing = ["/".join(key) for key in keys if key not in labels]
    if missing:
        raise DataError(f"{path}: no row for {len(missing)} evaluation test files: {listing(missing)}")
    return np.array([labels[key] for key in keys])
