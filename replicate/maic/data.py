"""MAIC's data layout: per person a mel CSV and the JSON file(s) that describe it (metadata and the token
annotation, in one file or several), in train/ and test/, and test_answer.csv where the data are
synthetic. Every problem is a `DataError` naming the file (and the field or token)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from replicate.task import DataError, listing, read_csv, read_json, repeated_rows

DIAGNOSES: tuple[str, ...] = (
    "Normal",
    "Cancer",
    "Cyst_and_Polyp",
    "Nodules",
    "Functional_dysphonia",
    "Paralysis",
)
SEXES: tuple[str, ...] = ("M", "F")
TOKEN_FIELDS = ("token_no", "token_skip", "token_pronounce", "startFrame", "endFrame")
TOKEN_LIST_KEYS = ("tokens", "annotation", "annotations")


@dataclass
class Token:
    """One annotated token, its frames as the annotation gives them (`tokens.token_store` reads `end` as
    inclusive or exclusive, `data.end_frame_inclusive`)."""

    token_no: int
    start: int  # startFrame: the first CSV column
    end: int  # endFrame
    skip: bool
    abnormal_pronounce: bool


@dataclass
class Person:
    """One person: the CSV, the JSON file(s) it was described by (the one with the tokens: `annotation`),
    metadata and tokens."""

    person_id: str
    csv_path: Path
    json_paths: list[Path]
    sex: str
    age: float
    diagnosis: str | None
    tokens: list[Token] = field(default_factory=list)
    annotation: Path | None = None


@dataclass
class MaicData:
    root: Path
    train: list[Person]
    test: list[Person]
    test_answers: dict[str, str] | None  # person id → diagnosis, only in synthetic data


def read_person(csv_path: Path, json_paths: Sequence[Path], *, labelled: bool) -> Person:
    """Merge a person's JSON file(s) and check every field the recipe uses.

    Args:
        csv_path: the person's mel CSV (only named here; it is parsed with the token frames, `token_store`).
        json_paths: one JSON with metadata and annotation, or several that share them out.
        labelled: the diagnosis is required (training data).
    """
    person_id = csv_path.stem
    if not json_paths:
        raise DataError(f"{csv_path}: no JSON for this person (expected {person_id}.json and/or {person_id}_*.json)")
    merged, source_of, tokens_raw, tokens_path = _merged_json(json_paths)
    names = ", ".join(path.name for path in json_paths)
    required = ("sex", "age", "diagnosis") if labelled else ("sex", "age")
    missing = [key for key in required if key not in merged]
    if missing:
        raise DataError(f"{csv_path.parent / names}: missing field(s) {', '.join(missing)} for person {person_id}")
    if tokens_raw is None:
        raise DataError(f"{csv_path.parent / names}: no token annotation ('tokens': [...]) for person {person_id}")
    sex = merged["sex"]
    if sex not in SEXES:
        raise DataError(f"{source_of['sex']}: sex must be 'M' or 'F', got {sex!r}")
    age = merged["age"]
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not np.isfinite(age) or not 0 < age < 130:
        raise DataError(f"{source_of['age']}: age must be a number in (0, 130), got {age!r}")
    diagnosis = merged.get("diagnosis") if labelled or "diagnosis" in merged else None
    if diagnosis is not None and diagnosis not in DIAGNOSES:
        raise DataError(f"{source_of['diagnosis']}: diagnosis {diagnosis!r} is not one of {', '.join(DIAGNOSES)}")
    tokens = parse_tokens(tokens_raw, tokens_path)
    return Person(person_id, csv_path, list(json_paths), sex, float(age), diagnosis, tokens, tokens_path)


def _merged_json(json_paths: Sequence[Path]) -> tuple[dict, dict[str, Path], list | None, Path | None]:
    """The fields of a person's JSON files merged (a field given twice must agree), the file each came from,
    and the token list with its file (given once)."""
    merged: dict = {}
    source_of: dict[str, Path] = {}
    tokens_raw, tokens_path = None, None
    for path in json_paths:
        content = read_json(path)
        if isinstance(content, list):  # an annotation file that is just the token list
            content = {"tokens": content}
        if not isinstance(content, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(content).__name__}")
        found = [key for key in TOKEN_LIST_KEYS if key in content]
        if len(found) > 1:
            raise DataError(f"{path}: more than one token list ({', '.join(found)}); keep one")
        if found:
            if tokens_raw is not None:
                raise DataError(f"{path}: tokens are given again (already in {tokens_path})")
            tokens_raw, tokens_path = content[found[0]], path
        for key, value in content.items():
            if key in TOKEN_LIST_KEYS:
                continue
            if key in merged and merged[key] != value:
                raise DataError(f"{path}: {key!r} is {value!r} here but {merged[key]!r} in {source_of[key]}")
            merged[key] = value
            source_of.setdefault(key, path)
    return merged, source_of, tokens_raw, tokens_path


def parse_tokens(tokens_raw, path: Path) -> list[Token]:
    """The annotation's token list, each field checked; `path` is the file it came from."""
    if not isinstance(tokens_raw, list) or not tokens_raw:
        raise DataError(f"{path}: the token list must be a non-empty list")
    tokens = []
    for position, raw in enumerate(tokens_raw):
        where = f"{path}: token {position + 1}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with {', '.join(TOKEN_FIELDS)}")
        absent = [key for key in TOKEN_FIELDS if key not in raw]
        if absent:
            raise DataError(f"{where}: missing field(s) {', '.join(absent)}")
        for key in ("token_no", "startFrame", "endFrame"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                raise DataError(f"{where}: {key} must be an integer, got {raw[key]!r}")
        for key, values in (("token_skip", ("normal", "skip")), ("token_pronounce", ("normal", "abnormal"))):
            if raw[key] not in values:
                raise DataError(f"{where}: {key} must be {values[0]!r} or {values[1]!r}, got {raw[key]!r}")
        if raw["startFrame"] < 0 or raw["endFrame"] < raw["startFrame"]:
            raise DataError(f"{where}: frames {raw['startFrame']}..{raw['endFrame']} are negative or reversed")
        skip, abnormal = raw["token_skip"] == "skip", raw["token_pronounce"] == "abnormal"
        tokens.append(Token(raw["token_no"], raw["startFrame"], raw["endFrame"], skip, abnormal))
    return tokens


def load_split(folder: Path, *, labelled: bool) -> list[Person]:
    """Every person of a folder: one `<id>.csv` each, with its `<id>.json` / `<id>_*.json` files."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected a folder of <id>.csv + <id>.json per person)")
    csvs = sorted(folder.glob("*.csv"))
    if not csvs:
        raise DataError(f"{folder}: no <id>.csv files")
    ids = {path.stem for path in csvs}
    jsons = sorted(folder.glob("*.json"))
    not_files = [path.name for path in csvs + jsons if not path.is_file()]
    if not_files:
        raise DataError(f"{folder}: {listing(not_files)} not a readable file (a folder, a broken link or a link loop)")
    by_person: dict[str, list[Path]] = {identifier: [] for identifier in ids}
    orphans = []
    for path in jsons:
        owner = path.stem if path.stem in ids else None
        if owner is None:  # <id>_annotation.json and the like: the longest id that prefixes the name
            candidates = [identifier for identifier in ids if path.stem.startswith(identifier + "_")]
            owner = max(candidates, key=len) if candidates else None
        if owner is None:
            orphans.append(path.name)
        else:
            by_person[owner].append(path)
    if orphans:
        raise DataError(f"{folder}: {len(orphans)} JSON files belong to no <id>.csv: {listing(orphans)}")
    return [read_person(path, by_person[path.stem], labelled=labelled) for path in csvs]


def read_answers(path: Path, persons: Sequence[Person]) -> dict[str, str]:
    """test_answer.csv (wav_code, diagnosis) for exactly the test persons."""
    table = read_csv(path, dtype=str)
    if list(table.columns) != ["wav_code", "diagnosis"]:
        raise DataError(f"{path}: columns must be wav_code, diagnosis; found {', '.join(table.columns)}")
    bad = table["wav_code"][~table["diagnosis"].isin(DIAGNOSES)].tolist()
    if bad:
        raise DataError(f"{path}: unknown diagnosis for {listing(bad)}; allowed: {', '.join(DIAGNOSES)}")
    repeated = repeated_rows(table, ["wav_code"], "diagnosis")
    if repeated:
        raise DataError(f"{path}: more than one answer for {listing(repeated)}; one row per person")
    answers = dict(zip(table["wav_code"], table["diagnosis"], strict=True))
    missing = [person.person_id for person in persons if person.person_id not in answers]
    if missing:
        raise DataError(f"{path}: no answer for the test persons {listing(missing)}")
    return answers


def load_data(root: str | os.PathLike) -> MaicData:
    """Read and check a MAIC data folder (train/, optional test/ and test_answer.csv)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    train = load_split(root / "train", labelled=True)
    test = load_split(root / "test", labelled=False) if (root / "test").is_dir() else []
    answers = read_answers(root / "test_answer.csv", test) if test and (root / "test_answer.csv").is_file() else None
    return MaicData(root, train, test, answers)
