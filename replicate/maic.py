"""MAIC 2021 Voice AI Challenge (1st place): per-person mel CSVs → tokens → sub-classes → mini-ResNet →
label-masked token votes per person.

    python -m replicate.maic --data /path/to/maic                      # the source recipe
    python -m replicate.maic --data data/synth/maic --profile quick    # the synthetic demo
    python -m replicate.maic --data ... --set split.by=person --seeds 15

Stages, each skipping work already done: read and check the layout (JSON) → parse every CSV into its
tokens (cached) → sub-class table → split → seed ensemble (resumable, best epoch by validation macro F1)
→ person-level predictions with label masking and voting → `submission.csv` → scores → `report.md`.

Data layout (`--data DIR`)::

    DIR/train/<id>.csv      128 rows (mel bands) × frames, numbers only (no header)
    DIR/train/<id>.json     metadata (sex, age, diagnosis, ...) and/or the annotation ("tokens": [...]);
    DIR/train/<id>_*.json   e.g. <id>_annotation.json: the fields missing from <id>.json
    DIR/test/...            the same, without diagnosis (optional: no test → no submission)
    DIR/test_answer.csv     wav_code, diagnosis (only synthetic data has it; the test persons are then scored)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from replicate import files, metrics, report, runner, task
from replicate import recipe as recipe_lib
from replicate.task import DataError

DIAGNOSES: tuple[str, ...] = (
    "Normal",
    "Cancer",
    "Cyst_and_Polyp",
    "Nodules",
    "Functional_dysphonia",
    "Paralysis",
)
SEXES: tuple[str, ...] = ("M", "F")
BANDS: tuple[str, ...] = ("55+", "<55")  # the source's L1-L6 are the men aged 55 or over: that group first
TOKEN_FIELDS = ("token_no", "token_skip", "token_pronounce", "startFrame", "endFrame")
TOKEN_LIST_KEYS = ("tokens", "annotation", "annotations")
CACHE_VERSION = 1

RULES: dict[str, recipe_lib.Rule] = {
    "data.mel_bins": recipe_lib.positive,
    "features.frames": recipe_lib.positive,
    "features.normalization": recipe_lib.one_of("zscore", "none"),
    "features.age_scale": recipe_lib.positive,
    "labels.age_threshold": recipe_lib.positive,
    "model.resized_mel_bins": recipe_lib.positive,
    "model.stem_filters": recipe_lib.positive,
    "model.stage_filters": recipe_lib.positive,
    "model.blocks_per_stage": recipe_lib.positive,
    "model.stage_strides": recipe_lib.positive,
    "model.dropout": recipe_lib.fraction,
    "model.dense_units": recipe_lib.positive,
    "train.epochs": recipe_lib.positive,
    "train.batch_size": recipe_lib.positive,
    "train.learning_rate": recipe_lib.positive,
    "train.optimizer": recipe_lib.one_of("Adam", "AdamW", "Nadam", "SGD", "RMSprop"),
    "train.loss": recipe_lib.one_of("CategoricalFocalCrossentropy", "CategoricalCrossentropy"),
    "train.lr_factor": recipe_lib.fraction,
    "train.lr_patience": recipe_lib.positive,
    "train.lr_monitor": recipe_lib.one_of("val_loss", "val_macro_f1"),
    "train.early_stopping_patience": recipe_lib.non_negative,
    "train.monitor": recipe_lib.one_of("val_macro_f1", "val_diagnosis_f1"),
    "split.by": recipe_lib.one_of("token", "person"),
    "split.validation_fraction": recipe_lib.fraction,
    "inference.batch_size": recipe_lib.positive,
    "inference.tokens_per_person": recipe_lib.non_negative,
    "inference.crop_seed": recipe_lib.non_negative,
    "inference.tie_rule": recipe_lib.one_of("probability", "first"),
    "ensemble.seeds": recipe_lib.positive,
    "ensemble.first_seed": recipe_lib.non_negative,
}


def load_recipe(profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
    """The MAIC recipe with a profile and overrides, validated."""
    recipe = recipe_lib.load_recipe(path or "maic", profile, overrides, RULES, task="maic")
    model = recipe["model"]
    if len(model["stage_filters"]) != len(model["stage_strides"]):
        raise recipe_lib.RecipeError(
            f"model.stage_filters {model['stage_filters']} and model.stage_strides {model['stage_strides']} "
            "need one value per stage"
        )
    if len(model["dense_units"]) != 2:
        raise recipe_lib.RecipeError(f"model.dense_units must have two values, got {model['dense_units']}")
    return recipe


# --- the competition's layout -------------------------------------------------------------------


@dataclass
class Token:
    token_no: int
    start: int  # first CSV column
    stop: int  # one past the last CSV column
    skip: bool
    abnormal_pronounce: bool


@dataclass
class Person:
    """One person: the CSV, the JSON file(s) it was described by, metadata and tokens."""

    person_id: str
    csv_path: Path
    json_paths: list[Path]
    sex: str
    age: float
    diagnosis: str | None
    tokens: list[Token] = field(default_factory=list)


@dataclass
class MaicData:
    root: Path
    train: list[Person]
    test: list[Person]
    test_answers: dict[str, str] | None  # person id → diagnosis, only in synthetic data


def _token_list(content: dict, path: Path) -> list | None:
    found = [key for key in TOKEN_LIST_KEYS if key in content]
    if len(found) > 1:
        raise DataError(f"{path}: more than one token list ({', '.join(found)}); keep one")
    return content[found[0]] if found else None


def read_person(csv_path: Path, json_paths: Sequence[Path], *, labelled: bool, end_inclusive: bool = False) -> Person:
    """Merge a person's JSON file(s) and check every field the recipe uses.

    Args:
        csv_path: the person's mel CSV (only named here; it is parsed later, with the token frames).
        json_paths: one JSON with metadata and annotation, or several that share them out.
        labelled: the diagnosis is required (training data).
        end_inclusive: endFrame is the last column (True) or one past it (False).
    """
    person_id = csv_path.stem
    if not json_paths:
        raise DataError(f"{csv_path}: no JSON for this person (expected {person_id}.json and/or {person_id}_*.json)")
    merged: dict = {}
    source_of: dict[str, Path] = {}
    tokens_raw, tokens_path = None, None
    for path in json_paths:
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        except OSError as error:
            raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
        if isinstance(content, list):  # an annotation file that is just the token list
            content = {"tokens": content}
        if not isinstance(content, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(content).__name__}")
        token_list = _token_list(content, path)
        if token_list is not None:
            if tokens_raw is not None:
                raise DataError(f"{path}: tokens are given again (already in {tokens_path})")
            tokens_raw, tokens_path = token_list, path
        for key, value in content.items():
            if key in TOKEN_LIST_KEYS:
                continue
            if key in merged and merged[key] != value:
                raise DataError(f"{path}: {key!r} is {value!r} here but {merged[key]!r} in {source_of[key]}")
            merged[key] = value
            source_of.setdefault(key, path)
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
    if not isinstance(tokens_raw, list) or not tokens_raw:
        raise DataError(f"{tokens_path}: the token list must be a non-empty list")
    tokens = []
    for position, raw in enumerate(tokens_raw):
        where = f"{tokens_path}: token {position + 1}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with {', '.join(TOKEN_FIELDS)}")
        absent = [key for key in TOKEN_FIELDS if key not in raw]
        if absent:
            raise DataError(f"{where}: missing field(s) {', '.join(absent)}")
        for key in ("token_no", "startFrame", "endFrame"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                raise DataError(f"{where}: {key} must be an integer, got {raw[key]!r}")
        if raw["token_skip"] not in ("normal", "skip"):
            raise DataError(f"{where}: token_skip must be 'normal' or 'skip', got {raw['token_skip']!r}")
        if raw["token_pronounce"] not in ("normal", "abnormal"):
            raise DataError(f"{where}: token_pronounce must be 'normal' or 'abnormal', got {raw['token_pronounce']!r}")
        start, stop = raw["startFrame"], raw["endFrame"] + (1 if end_inclusive else 0)
        if start < 0 or stop <= start:
            raise DataError(f"{where}: frames {raw['startFrame']}..{raw['endFrame']} are empty or negative")
        tokens.append(
            Token(raw["token_no"], start, stop, raw["token_skip"] == "skip", raw["token_pronounce"] == "abnormal")
        )
    return Person(person_id, csv_path, list(json_paths), sex, float(age), diagnosis, tokens)


def load_split(folder: Path, *, labelled: bool, end_inclusive: bool = False) -> list[Person]:
    """Every person of a folder: one `<id>.csv` each, with its `<id>.json` / `<id>_*.json` files."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected <id>.csv + <id>.json per person)")
    csvs = sorted(folder.glob("*.csv"))
    if not csvs:
        raise DataError(f"{folder}: no <id>.csv files")
    ids = {path.stem for path in csvs}
    jsons = sorted(folder.glob("*.json"))
    not_files = [path.name for path in csvs + jsons if not path.is_file()]
    if not_files:
        raise DataError(
            f"{folder}: {task.listing(not_files)} not a readable file (a folder, a broken link or a link loop)"
        )
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
        raise DataError(f"{folder}: {len(orphans)} JSON files belong to no <id>.csv: {task.listing(orphans)}")
    return [read_person(path, by_person[path.stem], labelled=labelled, end_inclusive=end_inclusive) for path in csvs]


def read_answers(path: Path, persons: Sequence[Person]) -> dict[str, str]:
    """test_answer.csv (wav_code, diagnosis) for exactly the test persons."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    if list(table.columns) != ["wav_code", "diagnosis"]:
        raise DataError(f"{path}: columns must be wav_code, diagnosis; found {', '.join(table.columns)}")
    bad = table["wav_code"][~table["diagnosis"].isin(DIAGNOSES)].tolist()
    if bad:
        raise DataError(f"{path}: unknown diagnosis for {task.listing(bad)}; allowed: {', '.join(DIAGNOSES)}")
    repeated = table[table["wav_code"].duplicated(keep=False)]
    if len(repeated):
        rows = [
            f"{code} on lines {', '.join(str(line + 2) for line in group.index)} ({', '.join(group['diagnosis'])})"
            for code, group in repeated.groupby("wav_code", sort=False)
        ]
        raise DataError(f"{path}: more than one answer for {task.listing(rows)}; one row per person")
    answers = dict(zip(table["wav_code"], table["diagnosis"], strict=True))
    missing = [person.person_id for person in persons if person.person_id not in answers]
    if missing:
        raise DataError(f"{path}: no answer for the test persons {task.listing(missing)}")
    return answers


def load_data(root: str | os.PathLike, end_inclusive: bool = False) -> MaicData:
    """Read and check a MAIC data folder (train/, optional test/ and test_answer.csv)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    train = load_split(root / "train", labelled=True, end_inclusive=end_inclusive)
    test = load_split(root / "test", labelled=False, end_inclusive=end_inclusive) if (root / "test").is_dir() else []
    answers = read_answers(root / "test_answer.csv", test) if test and (root / "test_answer.csv").is_file() else None
    return MaicData(root, train, test, answers)


# --- tokens: CSVs parsed once and cached ---------------------------------------------------------


@dataclass
class TokenStore:
    """Every kept token of a split: the frames of all tokens end to end, and an index into them.

    Attributes:
        frames: (total frames, mel bins) float32, a read-only memmap; token i is
            frames[offsets[i] : offsets[i] + lengths[i]].
        offsets, lengths: per token.
        person: per token, the index of its person in the split's list.
        token_no: per token, its number in the annotation.
        counts: what was dropped or flagged (skipped tokens, abnormal pronunciation, persons without tokens).
        checksums: the cache files' block checksums (`files.checksums`), which name the store's content.
    """

    frames: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    person: np.ndarray
    token_no: np.ndarray
    counts: dict
    checksums: dict

    def __len__(self) -> int:
        return len(self.lengths)


def read_mel_csv(path: Path, mel_bins: int = 128) -> np.ndarray:
    """A person's mel CSV as (mel bins, frames) float32; wrong row count, non-numeric, empty or non-finite
    cells are errors naming the file (and the first bad cell)."""
    try:
        table = pd.read_csv(path, header=None, dtype=np.float32)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
    except ValueError as error:  # a cell that is not a number: find it for the message
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
        bad = np.argwhere(raw.apply(pd.to_numeric, errors="coerce").isna().to_numpy())
        if not len(bad):
            raise DataError(f"{path}: not a table of numbers ({error})") from error
        row, column = bad[0]
        raise DataError(
            f"{path}: non-numeric cell {raw.iat[row, column]!r} at row {row + 1}, column {column + 1}"
        ) from error
    values = table.to_numpy()
    if values.shape[0] != mel_bins:
        raise DataError(f"{path}: {values.shape[0]} rows, expected {mel_bins} (one per mel band)")
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, column = bad[0]
        raise DataError(
            f"{path}: {len(bad)} empty or non-finite cells, the first at row {row + 1}, column {column + 1}"
        )
    return values


def token_store(
    persons: Sequence[Person],
    *,
    mel_bins: int,
    drop_skipped: bool,
    cache_dir: str | os.PathLike,
    name: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TokenStore:
    """The tokens of `persons`, parsed from their CSVs once and memory-mapped from the cache afterwards.

    The cache is the engine's (`files.cached_folder`: `<cache_dir>/<name>-<key>/`, the key hashing the
    parameters and every CSV/JSON file's path, size and modification time; built under a lock in a partial
    folder and renamed into place; checked against its checksums when opened, and parsed again, said on
    `log`, when damaged), so a second run reads no CSV.

    Raises:
        DataError: a CSV with the wrong shape or bad cells, or a token whose frames fall outside its CSV.
        files.LockedError: another process is building the same cache.
    """
    params = {"kind": "maic-tokens", "version": CACHE_VERSION, "mel_bins": mel_bins, "drop_skipped": drop_skipped}
    try:
        key = files.cache_key(params, [path for person in persons for path in (person.csv_path, *person.json_paths)])
    except OSError as error:
        raise DataError(f"{error.filename}: cannot read the file ({error.strerror})") from error
    final_dir = Path(cache_dir) / f"{name}-{key}"
    meta = files.cached_folder(
        final_dir,
        lambda partial: _build_token_cache(
            persons, partial, mel_bins=mel_bins, drop_skipped=drop_skipped, name=name, progress=progress
        ),
        what="token cache",
        log=log,
    )
    index = np.load(final_dir / "index.npz")
    return TokenStore(
        frames=np.load(final_dir / "frames.npy", mmap_mode="r"),
        offsets=index["offsets"],
        lengths=index["lengths"],
        person=index["person"],
        token_no=index["token_no"],
        counts=meta["counts"],
        checksums=meta["checksums"],
    )


def _build_token_cache(
    persons: Sequence[Person], partial_dir: Path, *, mel_bins: int, drop_skipped: bool, name: str, progress: bool
) -> dict:
    """Parse every person's CSV into `partial_dir` (`files.cached_folder`'s): frames.npy, index.npz."""
    kept = [[token for token in person.tokens if not (drop_skipped and token.skip)] for person in persons]
    total = sum(token.stop - token.start for tokens in kept for token in tokens)
    frames = np.lib.format.open_memmap(
        partial_dir / "frames.npy", mode="w+", dtype=np.float32, shape=(max(total, 1), mel_bins)
    )
    offsets, lengths, person_index, token_no = [], [], [], []
    position = 0
    for index, (person, tokens) in enumerate(
        tqdm(list(zip(persons, kept, strict=True)), desc=f"tokens {name}", unit="person", disable=not progress)
    ):
        mel = read_mel_csv(person.csv_path, mel_bins)
        width = mel.shape[1]
        outside = [token for token in person.tokens if token.stop > width]
        if outside:
            token = outside[0]
            raise DataError(
                f"{person.csv_path}: token {token.token_no} spans frames {token.start}..{token.stop - 1} but the CSV "
                f"has {width} columns ({len(outside)} token(s) outside; annotation {person.json_paths[-1].name})"
            )
        for token in tokens:
            length = token.stop - token.start
            frames[position : position + length] = mel[:, token.start : token.stop].T
            offsets.append(position)
            lengths.append(length)
            person_index.append(index)
            token_no.append(token.token_no)
            position += length
    frames.flush()
    del frames
    np.savez(
        partial_dir / "index.npz",
        offsets=np.array(offsets, dtype=np.int64),
        lengths=np.array(lengths, dtype=np.int64),
        person=np.array(person_index, dtype=np.int64),
        token_no=np.array(token_no, dtype=np.int64),
    )
    counts = {
        "persons": len(persons),
        "tokens_annotated": sum(len(person.tokens) for person in persons),
        "tokens_kept": len(lengths),
        "tokens_skipped": sum(token.skip for person in persons for token in person.tokens) if drop_skipped else 0,
        "tokens_abnormal_pronounce": sum(token.abnormal_pronounce for tokens in kept for token in tokens),
        "persons_without_tokens": [
            person.person_id for person, tokens in zip(persons, kept, strict=True) if not tokens
        ],
    }
    return {"name": name, "counts": counts}


# --- sub-classes and label masking ---------------------------------------------------------------


def age_band(age: float, threshold: float = 55.0) -> str:
    """ "55+" for `threshold` years or more, else "<55" (the source's two bands)."""
    return BANDS[0] if age >= threshold else BANDS[1]


@dataclass(frozen=True)
class SubclassTable:
    """The (diagnosis, sex, age band) combinations found in the training data, one sub-class each.

    Ordered by group (men 55+, men <55, women 55+, women <55) and within a group by the diagnosis order,
    so a group's sub-classes are consecutive (the source's L1-L6 are the men aged 55 or over).

    Attributes:
        entries: (diagnosis, sex, band) per sub-class.
        age_threshold: the age that separates the bands.
    """

    entries: tuple[tuple[str, str, str], ...]
    age_threshold: float = 55.0

    @classmethod
    def from_persons(cls, persons: Sequence[Person], age_threshold: float = 55.0, subdivide: bool = True):
        """Derive the table from labelled persons; `subdivide=False` gives one class per diagnosis."""
        if not subdivide:
            found = {person.diagnosis for person in persons}
            return cls(tuple((d, "*", "*") for d in DIAGNOSES if d in found), age_threshold)
        found = {(person.diagnosis, person.sex, age_band(person.age, age_threshold)) for person in persons}
        order = [(d, s, b) for s in SEXES for b in BANDS for d in DIAGNOSES]
        return cls(tuple(entry for entry in order if entry in found), age_threshold)

    @property
    def labels(self) -> list[str]:
        return [f"L{i}" for i in range(1, len(self.entries) + 1)]

    @property
    def diagnosis_index(self) -> np.ndarray:
        """Per sub-class, the index of its diagnosis in DIAGNOSES."""
        return np.array([DIAGNOSES.index(diagnosis) for diagnosis, _, _ in self.entries])

    def subclass_of(self, person: Person) -> int:
        """The person's sub-class; a combination the table lacks is an error."""
        wanted = (person.diagnosis, person.sex, age_band(person.age, self.age_threshold))
        for index, (diagnosis, sex, band) in enumerate(self.entries):
            if diagnosis == wanted[0] and sex in (wanted[1], "*") and band in (wanted[2], "*"):
                return index
        raise ValueError(f"person {person.person_id}: {wanted} is not a sub-class of the training data")

    def mask(self, sex: str, age: float) -> np.ndarray:
        """Which sub-classes a person of this sex and age can belong to; all of them if the training data
        have no sub-class of the person's group (then nothing is masked)."""
        band = age_band(age, self.age_threshold)
        allowed = np.array([s in (sex, "*") and b in (band, "*") for _, s, b in self.entries])
        return allowed if allowed.any() else np.ones(len(self.entries), dtype=bool)

    def to_config(self) -> dict:
        return {"entries": [list(entry) for entry in self.entries], "age_threshold": self.age_threshold}

    @classmethod
    def from_config(cls, config: dict) -> SubclassTable:
        return cls(tuple(tuple(entry) for entry in config["entries"]), float(config["age_threshold"]))


def diagnosis_probabilities(probabilities: np.ndarray, table: SubclassTable, masks: np.ndarray | None) -> np.ndarray:
    """Sub-class probabilities (tokens, sub-classes) → diagnosis probabilities (tokens, 6), after zeroing
    the masked sub-classes (`masks`: (tokens, sub-classes) booleans, or None) and renormalising — the same
    as a softmax over logits with the masked ones set to −∞."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if masks is not None:
        probabilities = np.where(masks, probabilities, 0.0)
        totals = probabilities.sum(axis=1, keepdims=True)
        probabilities = probabilities / np.where(totals > 0, totals, 1.0)
    out = np.zeros((len(probabilities), len(DIAGNOSES)))
    np.add.at(out.T, table.diagnosis_index, probabilities.T)
    return out


def vote(token_diagnosis_probabilities: np.ndarray, tie_rule: str = "probability") -> tuple[int, np.ndarray]:
    """A person's diagnosis from its tokens: each token votes for its most probable diagnosis (the
    diagnosis of its argmax sub-class after masking); the most votes win.

    Tie rule "probability": among the tied diagnoses, the one with the highest probability summed over the
    person's tokens (then the first in DIAGNOSES order); "first": the first tied one in DIAGNOSES order.

    Returns:
        (diagnosis index, votes per diagnosis).
    """
    if tie_rule not in ("probability", "first"):
        raise ValueError(f"tie_rule must be 'probability' or 'first', got {tie_rule!r}")
    probabilities = np.asarray(token_diagnosis_probabilities)
    votes = np.bincount(probabilities.argmax(axis=1), minlength=len(DIAGNOSES))
    tied = np.flatnonzero(votes == votes.max())
    if len(tied) == 1 or tie_rule == "first":
        return int(tied[0]), votes
    summed = probabilities[:, tied].sum(axis=0)
    return int(tied[np.argmax(summed)]), votes


def person_predictions(
    token_probabilities: np.ndarray,
    token_person: np.ndarray,
    persons: Sequence[Person],
    table: SubclassTable,
    *,
    masking: bool = True,
    tie_rule: str = "probability",
) -> tuple[np.ndarray, np.ndarray]:
    """Per person: the voted diagnosis index and the mean diagnosis probabilities of its tokens.

    Args:
        token_probabilities: (tokens, sub-classes) model outputs.
        token_person: (tokens,) index of each token's person in `persons`.
        persons: the persons (for sex and age).
        table: the sub-class table.
        masking: mask the sub-classes outside each person's sex/age group (the source's label masking).
        tie_rule: see `vote`.

    Returns:
        (persons,) diagnosis indices (−1 for a person without tokens) and (persons, 6) probabilities.
    """
    masks = None
    if masking:
        group_masks = np.stack([table.mask(person.sex, person.age) for person in persons])
        masks = group_masks[token_person]
    diagnosis = diagnosis_probabilities(token_probabilities, table, masks)
    predicted = np.full(len(persons), -1)
    probabilities = np.zeros((len(persons), len(DIAGNOSES)))
    for index in range(len(persons)):
        rows = np.flatnonzero(token_person == index)
        if len(rows):
            predicted[index], _ = vote(diagnosis[rows], tie_rule)
            probabilities[index] = diagnosis[rows].mean(axis=0)
    return predicted, probabilities


# --- inputs: crops, auxiliary input, tf.data -----------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """How tokens become model inputs: crop width, normalisation and the auxiliary input's scale."""

    frames: int
    mean: float
    std: float
    age_scale: float

    def aux(self, persons: Sequence[Person]) -> np.ndarray:
        """[sex (M = 1, F = 0), age / age_scale] per person, float32 (persons, 2)."""
        return np.array([[person.sex == "M", person.age / self.age_scale] for person in persons], dtype=np.float32)

    def to_config(self) -> dict:
        return {"frames": self.frames, "mean": self.mean, "std": self.std, "age_scale": self.age_scale}


def fit_normalization(store: TokenStore, rows: np.ndarray, kind: str) -> tuple[float, float]:
    """One mean and standard deviation over every cell of the given tokens ("zscore"), or (0, 1) ("none")."""
    if kind == "none":
        return 0.0, 1.0
    total, squares, count = 0.0, 0.0, 0
    for row in rows:
        values = np.asarray(store.frames[store.offsets[row] : store.offsets[row] + store.lengths[row]], np.float64)
        total += values.sum()
        squares += np.square(values).sum()
        count += values.size
    if count == 0:
        raise DataError("no training tokens to fit the normalisation statistics on (all skipped or held out)")
    mean = total / count
    std = float(np.sqrt(max(squares / count - mean**2, 0.0)))
    if not np.isfinite([mean, std]).all():
        raise DataError(f"the training tokens' normalisation statistics are not finite (mean {mean}, std {std})")
    if std == 0:
        raise DataError("every mel value of the training tokens is the same: nothing to learn from")
    return float(mean), std


def crop_offsets(lengths: np.ndarray, frames: int, seed: int) -> np.ndarray:
    """Seeded start frames for inference: token i of a store gets the same start for the same seed, whatever
    the batching (a uniform start in [0, length − frames] for longer tokens, 0 for the others)."""
    room = np.maximum(np.asarray(lengths) - frames, 0) + 1
    uniform = np.random.default_rng(seed).random(len(room))
    return np.minimum((uniform * room).astype(np.int64), room - 1)


def gather_tokens(store: TokenStore, rows: np.ndarray, starts: np.ndarray, inputs: Inputs) -> np.ndarray:
    """(batch, mel bins, frames, 1) float32: each token's `frames` columns from its start, normalised,
    zero-padded at the end when shorter."""
    mel_bins = store.frames.shape[1]
    batch = np.zeros((len(rows), mel_bins, inputs.frames, 1), dtype=np.float32)
    for position, (row, start) in enumerate(zip(rows, starts, strict=True)):
        length = min(int(store.lengths[row]) - int(start), inputs.frames)
        first = store.offsets[row] + start
        values = np.asarray(store.frames[first : first + length], dtype=np.float32).T
        batch[position, :, :length, 0] = (values - inputs.mean) / inputs.std
    return batch


def token_dataset(
    store: TokenStore,
    rows: np.ndarray,
    aux: np.ndarray,
    inputs: Inputs,
    *,
    batch_size: int,
    labels: np.ndarray | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch=0,
    starts: np.ndarray | None = None,
):
    """Batches of ({"mel", "aux"}[, one-hot labels]) for the given token rows of a store.

    Args:
        store: the split's tokens.
        rows: which tokens, in order.
        aux: (tokens of the store, 2) auxiliary input per token.
        inputs: crop width and normalisation.
        batch_size: tokens per batch.
        labels: (tokens of the store, classes) one-hot targets, or None for prediction.
        shuffle: put the rows in the epoch's order for `seed` (`pipeline.shuffled`).
        seed: seeds the shuffle and the random crops.
        epoch: which epoch's order and crops (int or scalar tensor).
        starts: fixed start frames per store token (inference, `crop_offsets`); None: a random start in
            [0, length − frames] for every token longer than `frames`, drawn inside the pipeline by
            stateless random ops keyed by (seed, epoch, batch) (`pipeline.random_key`), so they change
            every epoch and a seed reproduces them.
    """
    import tensorflow as tf

    from replicate import pipeline

    rows = tf.constant(np.asarray(rows, dtype=np.int64))
    lengths = tf.constant(store.lengths, dtype=tf.int64)
    mel_shape = (None, store.frames.shape[1], inputs.frames, 1)

    def gather(indices, first_frames):
        return gather_tokens(store, indices, first_frames, inputs)

    def load(batch_index, indices):
        if starts is None:
            room = tf.maximum(tf.gather(lengths, indices) - inputs.frames, 0) + 1
            uniform = tf.random.stateless_uniform(
                tf.shape(indices), seed=pipeline.random_key(seed, epoch, "crop", batch_index)
            )
            first_frames = tf.minimum(tf.cast(uniform * tf.cast(room, tf.float32), tf.int64), room - 1)
        else:
            first_frames = tf.gather(tf.constant(starts, dtype=tf.int64), indices)
        mel = tf.numpy_function(gather, [indices, first_frames], tf.float32, stateful=False)
        mel.set_shape(mel_shape)
        features = {"mel": mel, "aux": tf.gather(tf.constant(aux), indices)}
        if labels is None:
            return features
        return features, tf.gather(tf.constant(labels, dtype=tf.float32), indices)

    dataset = tf.data.Dataset.from_tensor_slices(pipeline.shuffled(rows, seed, epoch) if shuffle else rows)
    dataset = dataset.batch(batch_size).enumerate()
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


# --- the run -------------------------------------------------------------------------------------


def split_rows(store: TokenStore, persons: Sequence[Person], recipe: dict) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of the training store: a seeded random share of the tokens
    (split.by = "token", the source's) or of the persons, stratified by diagnosis ("person")."""
    fraction = recipe["split"]["validation_fraction"]
    seed = recipe["ensemble"]["first_seed"]
    rows = np.arange(len(store))
    if fraction == 0:
        return rows, np.array([], dtype=np.int64)
    if recipe["split"]["by"] == "token":
        shuffled = np.random.default_rng(seed).permutation(rows)
        cut = max(1, round(fraction * len(rows)))
        return np.sort(shuffled[cut:]), np.sort(shuffled[:cut])
    validation_persons = person_split(persons, fraction, seed)
    is_validation = np.isin(store.person, validation_persons)
    return rows[~is_validation], rows[is_validation]


def person_split(persons: Sequence[Person], fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation persons: about `fraction` of every diagnosis (at least one person of
    each diagnosis that has two or more), seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for diagnosis in DIAGNOSES:
        members = np.flatnonzero([person.diagnosis == diagnosis for person in persons])
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return np.sort(np.array(chosen, dtype=np.int64))


def build_model(recipe: dict, num_classes: int):
    """The recipe's mini-ResNet for `num_classes` sub-classes (21 on the real data), uncompiled."""
    from models.maic import build_maic_model

    model = recipe["model"]
    return build_maic_model(
        mel_bins=recipe["data"]["mel_bins"],
        frames=recipe["features"]["frames"],
        num_classes=num_classes,
        resized_mel_bins=model["resized_mel_bins"],
        stem_filters=model["stem_filters"],
        stage_filters=tuple(model["stage_filters"]),
        blocks_per_stage=model["blocks_per_stage"],
        stage_strides=tuple(model["stage_strides"]),
        batch_norm=model["batch_norm"],
        dropout=model["dropout"],
        dense_units=tuple(model["dense_units"]),
    )


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
    import keras

    from replicate import train

    data_root = Path(data_root)
    data = load_data(data_root, recipe["data"]["end_frame_inclusive"])
    run_dir = runner.open_run_dir(recipe, data_root, run_dir)
    log(f"run folder: {run_dir}")
    log(f"data: {len(data.train)} training persons, {len(data.test)} test persons")

    started = time.perf_counter()
    store_options = {
        "mel_bins": recipe["data"]["mel_bins"],
        "drop_skipped": recipe["data"]["drop_skipped"],
        "cache_dir": recipe["run"]["cache_dir"],
        "progress": progress,
    }
    train_store = token_store(data.train, name="maic-train", **store_options)
    test_store = token_store(data.test, name="maic-test", **store_options) if data.test else None
    parse_seconds = time.perf_counter() - started

    table = SubclassTable.from_persons(data.train, recipe["labels"]["age_threshold"], recipe["labels"]["subdivide"])
    person_subclass = np.array([table.subclass_of(person) for person in data.train])
    labels = np.eye(len(table.entries), dtype=np.float32)[person_subclass[train_store.person]]
    train_rows, validation_rows = split_rows(train_store, data.train, recipe)
    mean, std = fit_normalization(train_store, train_rows, recipe["features"]["normalization"])
    inputs = Inputs(recipe["features"]["frames"], mean, std, recipe["features"]["age_scale"])
    train_aux = inputs.aux(data.train)[train_store.person]
    validation_starts = crop_offsets(train_store.lengths, inputs.frames, recipe["inference"]["crop_seed"])
    log(
        f"tokens: {len(train_rows)} training, {len(validation_rows)} validation ({recipe['split']['by']} split), "
        f"{len(test_store) if test_store else 0} test; {len(table.entries)} sub-classes"
    )

    manifest = {
        "task": "maic",
        "recipe_name": recipe["name"],
        "class_names": table.labels,
        "diagnoses": list(DIAGNOSES),
        "subclasses": table.to_config(),
        "inputs": inputs.to_config(),
        "input_shapes": {"mel": [recipe["data"]["mel_bins"], inputs.frames, 1], "aux": [2]},
        "recipe": {key: recipe[key] for key in ("data", "features", "labels", "inference")},
        "data": {
            "root": str(data_root.resolve()),
            "train_tokens": len(train_rows),
            "validation_tokens": len(validation_rows),
            "validation_persons": sorted({data.train[p].person_id for p in train_store.person[validation_rows]}),
            "counts": {"train": train_store.counts, "test": test_store.counts if test_store else None},
        },
        "parse_seconds": round(parse_seconds, 2),
    }
    batch_size = recipe["train"]["batch_size"]
    validation = None
    if len(validation_rows):
        validation = token_dataset(
            train_store, validation_rows, train_aux, inputs, batch_size=256, labels=labels, starts=validation_starts
        )
    validation_inputs = validation.map(lambda features, _: features) if validation is not None else None
    validation_targets = person_subclass[train_store.person[validation_rows]]
    validation_diagnoses = table.diagnosis_index[validation_targets]
    validation_masks = np.stack([table.mask(p.sex, p.age) for p in data.train])[train_store.person[validation_rows]]

    def score(model) -> dict:
        probabilities = model.predict(validation_inputs, verbose=0)
        diagnosis = diagnosis_probabilities(probabilities, table, validation_masks).argmax(axis=1)
        return {
            "val_macro_f1": metrics.macro_f1(validation_targets, probabilities.argmax(axis=1)),
            "val_diagnosis_f1": metrics.macro_f1(validation_diagnoses, diagnosis),
        }

    train_recipe = recipe["train"]

    def member_callbacks(member_run_dir: Path, name: str) -> list:
        if validation is None:
            return []
        callbacks = [
            train.BestEpoch(score, monitor=train_recipe["monitor"]),
            keras.callbacks.ReduceLROnPlateau(
                monitor=train_recipe["lr_monitor"],
                mode="min" if train_recipe["lr_monitor"] == "val_loss" else "max",
                factor=train_recipe["lr_factor"],
                patience=train_recipe["lr_patience"],
            ),
        ]
        if train_recipe["early_stopping_patience"]:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=train_recipe["monitor"], mode="max", patience=train_recipe["early_stopping_patience"]
                )
            )
        return callbacks

    train.train_ensemble(
        recipe,
        recipe_lib.seeds_of(recipe),
        run_dir=run_dir,
        manifest=manifest,
        trained_from={
            "tokens": train_store.checksums,
            "labels": labels,
            "aux": train_aux,
            "rows": train_rows,
            "validation rows": validation_rows,  # they choose the best epoch
            "inputs": inputs.to_config(),
            "subclasses": table.to_config(),
        },
        retrain=retrain,
        log=log,
        build_model=lambda seed: build_model(recipe, len(table.entries)),
        train_data=lambda seed, epoch: token_dataset(
            train_store,
            train_rows,
            train_aux,
            inputs,
            batch_size=batch_size,
            labels=labels,
            shuffle=True,
            seed=seed,
            epoch=epoch,
        ),
        validation_data=validation,
        member_callbacks=member_callbacks,
        verbose="auto" if progress else 0,
    )
    evaluate_and_report(run_dir, data, train_store, test_store, validation_rows, recipe, log=log)
    return run_dir


def person_rows(store: TokenStore, tokens_per_person: int) -> np.ndarray:
    """The token rows used to predict persons: each person's first `tokens_per_person` kept tokens (0: all)."""
    if tokens_per_person == 0:
        return np.arange(len(store))
    keep = np.zeros(len(store), dtype=bool)
    for person in np.unique(store.person):
        keep[np.flatnonzero(store.person == person)[:tokens_per_person]] = True
    return np.flatnonzero(keep)


def predict_tokens(
    members, store: TokenStore, persons: Sequence[Person], rows: np.ndarray, manifest: dict
) -> np.ndarray:
    """Every member's sub-class probabilities for the given tokens: (members, rows, sub-classes).

    Raises:
        PredictionError: a member predicts a NaN or infinite value (its seed is named).
    """
    from replicate.ensemble import check_finite

    config = manifest["inputs"]
    inputs = Inputs(config["frames"], config["mean"], config["std"], config["age_scale"])
    inference = manifest["recipe"]["inference"]
    starts = crop_offsets(store.lengths, inputs.frames, inference["crop_seed"])
    dataset = token_dataset(
        store, rows, inputs.aux(persons)[store.person], inputs, batch_size=inference["batch_size"], starts=starts
    )
    outputs = np.stack([member.predict(dataset, verbose=0) for member in members])
    seeds = [entry["seed"] for entry in manifest["members"][: len(members)]]
    check_finite(outputs, seeds, f"{len(np.unique(store.person[rows]))} persons' tokens")
    return outputs


def _evaluate_persons(
    member_probabilities: np.ndarray,
    token_person: np.ndarray,
    persons: Sequence[Person],
    targets: np.ndarray,
    table: SubclassTable,
    inference: dict,
    majority: int,
) -> dict:
    """Person-level scores (the competition's macro F1) of each member and the first-k ensembles, with and
    without label masking, plus per-class F1, the confusion matrix and token-level numbers."""
    from sklearn import metrics as sk_metrics

    from replicate.ensemble import score_members

    labels = list(range(len(DIAGNOSES)))

    def person_f1(masking: bool):
        def metric(_, probabilities):
            predicted, _ = person_predictions(
                probabilities, token_person, persons, table, masking=masking, tie_rule=inference["tie_rule"]
            )
            return metrics.macro_f1(targets, predicted, labels=labels)

        return metric

    masked = score_members(member_probabilities, targets, person_f1(True))
    unmasked = score_members(member_probabilities, targets, person_f1(False))
    chosen = masked if inference["label_masking"] else unmasked
    ensemble = member_probabilities.mean(axis=0)
    predicted, _ = person_predictions(
        ensemble, token_person, persons, table, masking=inference["label_masking"], tie_rule=inference["tie_rule"]
    )
    token_targets = targets[token_person]
    group_masks = np.stack([table.mask(p.sex, p.age) for p in persons])[token_person]
    token_scores = {}
    for name, masks in (("masked", group_masks), ("unmasked", None)):
        token_predicted = diagnosis_probabilities(ensemble, table, masks).argmax(axis=1)
        token_scores[name] = {
            "accuracy": float(np.mean(token_predicted == token_targets)),
            "macro_f1": metrics.macro_f1(token_targets, token_predicted, labels=labels),
        }
    return {
        "persons": len(persons),
        "tokens": len(token_person),
        "label_masking": inference["label_masking"],
        "member_macro_f1": chosen["member"],
        "ensemble_macro_f1_by_size": chosen["ensemble_by_size"],
        "member_macro_f1_masked": masked["member"],
        "ensemble_macro_f1_by_size_masked": masked["ensemble_by_size"],
        "member_macro_f1_unmasked": unmasked["member"],
        "ensemble_macro_f1_by_size_unmasked": unmasked["ensemble_by_size"],
        "majority_macro_f1": metrics.macro_f1(targets, np.full(len(targets), majority), labels=labels),
        "majority_class": DIAGNOSES[majority],
        "per_class_f1": dict(
            zip(
                DIAGNOSES,
                sk_metrics.f1_score(targets, predicted, labels=labels, average=None, zero_division=0).tolist(),
                strict=True,
            )
        ),
        "accuracy": float(np.mean(predicted == targets)),
        "confusion_matrix": sk_metrics.confusion_matrix(targets, predicted, labels=labels).tolist(),
        "token": token_scores,
    }


def evaluate_and_report(
    run_dir: Path,
    data: MaicData,
    train_store: TokenStore,
    test_store: TokenStore | None,
    validation_rows: np.ndarray,
    recipe: dict,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Predict with every saved member, write submission.csv (test persons), score, write report.md."""
    from replicate.ensemble import Ensemble

    ensemble = Ensemble.load(run_dir)
    manifest = ensemble.manifest
    table = SubclassTable.from_config(manifest["subclasses"])
    inference = manifest["recipe"]["inference"]
    train_diagnoses = np.array([DIAGNOSES.index(p.diagnosis) for p in data.train])
    majority = int(np.bincount(train_diagnoses, minlength=len(DIAGNOSES)).argmax())
    evaluations = {}

    if test_store is not None:
        rows = person_rows(test_store, inference["tokens_per_person"])
        members = predict_tokens(ensemble.members, test_store, data.test, rows, manifest)
        token_person = test_store.person[rows]
        with files.atomic_path(run_dir / "test_predictions.npz", suffix=".npz") as temporary:
            np.savez(temporary, seeds=np.array(ensemble.seeds), probabilities=members, rows=rows, person=token_person)
        predicted, probabilities = person_predictions(
            members.mean(axis=0),
            token_person,
            data.test,
            table,
            masking=inference["label_masking"],
            tie_rule=inference["tie_rule"],
        )
        write_submission(run_dir / "submission.csv", data.test, predicted, probabilities)
        log(f"submission: {run_dir / 'submission.csv'}")
        if data.test_answers is not None:
            targets = np.array([DIAGNOSES.index(data.test_answers[p.person_id]) for p in data.test])
            evaluations["test (synthetic answers)"] = _evaluate_persons(
                members, token_person, data.test, targets, table, inference, majority
            )

    validation = None
    if len(validation_rows):
        members = predict_tokens(ensemble.members, train_store, data.train, validation_rows, manifest)
        subclass = np.array([table.subclass_of(p) for p in data.train])[train_store.person[validation_rows]]
        masks = np.stack([table.mask(p.sex, p.age) for p in data.train])[train_store.person[validation_rows]]
        validation = {
            "tokens": len(validation_rows),
            "split": recipe["split"]["by"],
            # As during training (BestEpoch): sklearn's macro F1 over the classes present on either side.
            "member_token_macro_f1": [metrics.macro_f1(subclass, member.argmax(axis=1)) for member in members],
            "member_token_diagnosis_macro_f1": [
                metrics.macro_f1(
                    table.diagnosis_index[subclass],
                    diagnosis_probabilities(member, table, masks if inference["label_masking"] else None).argmax(1),
                )
                for member in members
            ],
        }
        if recipe["split"]["by"] == "person":
            validation_persons = np.unique(train_store.person[validation_rows])
            remap = {person: index for index, person in enumerate(validation_persons)}
            token_person = np.array([remap[p] for p in train_store.person[validation_rows]])
            evaluations["validation persons"] = _evaluate_persons(
                members,
                token_person,
                [data.train[p] for p in validation_persons],
                train_diagnoses[validation_persons],
                table,
                inference,
                majority,
            )
    scores = {"seeds": ensemble.seeds, "evaluations": evaluations, "validation": validation}
    scores["headline"] = headline(scores, recipe["source"])
    files.write_json(run_dir / "scores.json", scores)
    write_report(run_dir, scores, data, train_store)
    log(f"report: {run_dir / 'report.md'}")
    return scores


def headline(scores: dict, source: dict) -> str:
    """The run's result in a phrase (the command line's last line), beside the source's number."""
    for split, evaluation in scores["evaluations"].items():  # the test persons first, where they have answers
        size = len(evaluation["member_macro_f1"])
        return (
            f"{split.split()[0]} persons macro F1 {evaluation['ensemble_macro_f1_by_size'][str(size)]:.4f} "
            f"({size}-member ensemble; source: single model {source['test_macro_f1']:.4f} on the real hidden "
            "test set)"
        )
    validation = scores["validation"]
    if validation:
        return (
            f"validation tokens macro F1 {np.mean(validation['member_token_macro_f1']):.4f} (member mean; source: "
            f"single model {source['validation_f1']:.4f} on the real data's 5 % token split)"
        )
    return "not scored (the test persons have no answers and there is no validation split)"


def predict_persons(
    run_dir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    size: int | None = None,
    cache_dir: str = ".cache/features",
) -> pd.DataFrame:
    """Diagnose the persons of a folder (`<id>.csv` + JSON per person, diagnosis not needed) with a trained
    run, exactly as its test persons were: the run's normalisation, seeded crops, masking, votes, tie rule.

    Args:
        run_dir: a finished run folder.
        folder: the persons' folder.
        size: use the first `size` members (default all).
        cache_dir: where the parsed tokens are cached.

    Returns:
        One row per person: wav_code, diagnosis, p_<diagnosis> (the submission's columns).

    Example:
        >>> predict_persons("runs/maic/quick-1a2b3c4d5e6f", "data/synth/maic/test").head(2)   # 2 rows × 8 columns
    """
    from replicate.ensemble import Ensemble

    ensemble = Ensemble.load(run_dir, size)
    manifest = ensemble.manifest
    settings = manifest["recipe"]
    persons = load_split(Path(folder), labelled=False, end_inclusive=settings["data"]["end_frame_inclusive"])
    store = token_store(
        persons,
        mel_bins=settings["data"]["mel_bins"],
        drop_skipped=settings["data"]["drop_skipped"],
        cache_dir=cache_dir,
        name="maic-predict",
        progress=False,
    )
    rows = person_rows(store, settings["inference"]["tokens_per_person"])
    members = predict_tokens(ensemble.members, store, persons, rows, manifest)
    predicted, probabilities = person_predictions(
        members.mean(axis=0),
        store.person[rows],
        persons,
        SubclassTable.from_config(manifest["subclasses"]),
        masking=settings["inference"]["label_masking"],
        tie_rule=settings["inference"]["tie_rule"],
    )
    return submission_table(persons, predicted, probabilities)


def inference_features(paths: Sequence[str | os.PathLike], manifest: dict) -> np.ndarray:
    """`Ensemble.features` hook: MAIC predicts persons (tokens, masking, votes), not single files."""
    raise NotImplementedError(
        "a MAIC ensemble diagnoses persons: use replicate.maic.predict_persons(run_dir, folder) for a folder of "
        "<id>.csv + JSON files"
    )


def submission_table(persons: Sequence[Person], predicted: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """wav_code, predicted diagnosis ("" for a person without tokens), p_<diagnosis> per person."""
    table = pd.DataFrame(probabilities, columns=[f"p_{name}" for name in DIAGNOSES])
    table.insert(0, "diagnosis", [DIAGNOSES[i] if i >= 0 else "" for i in predicted])
    table.insert(0, "wav_code", [person.person_id for person in persons])
    return table


def write_submission(path: Path, persons: Sequence[Person], predicted: np.ndarray, probabilities: np.ndarray) -> Path:
    """One row per test person: wav_code, the predicted diagnosis, and the mean (masked) probability of
    each diagnosis over the person's tokens. (The competition's own format is not published.)"""
    table = submission_table(persons, predicted, probabilities)
    with files.atomic_path(path, suffix=".csv") as temporary:
        table.to_csv(temporary, index=False, float_format="%.6f")
    return path


# --- report --------------------------------------------------------------------------------------


def results_table(run_dir: str | os.PathLike) -> str:
    """The README's results table: the source's reported numbers beside ours, each labelled."""
    run_dir = Path(run_dir)
    scores = files.read_json(run_dir / "scores.json")
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    source = recipe["source"]
    rows = [
        (
            f"source: single model, epoch {source['best_epoch']}",
            "real MAIC data, 5 % token validation split (528 tokens), token-level F1",
            f"{source['validation_f1']:.4f}",
        ),
        (
            "source: single model",
            "real MAIC data, hidden test set (164 persons), person-level macro F1",
            f"{source['test_macro_f1']:.4f}",
        ),
    ]
    validation = scores.get("validation")
    if validation:
        rows.append(
            (
                "ours: single member, mean ± std (best epoch)",
                f"our synthetic data, {validation['split']} validation split ({validation['tokens']} tokens), "
                "token-level macro F1 over sub-classes",
                report.mean_std(validation["member_token_macro_f1"]),
            )
        )
        rows.append(
            (
                "ours: single member, mean ± std (best epoch)",
                f"our synthetic data, {validation['split']} validation split ({validation['tokens']} tokens), "
                "token-level macro F1 over diagnoses",
                report.mean_std(validation["member_token_diagnosis_macro_f1"]),
            )
        )
    for split, evaluation in scores["evaluations"].items():
        where = f"our synthetic data, {split} ({evaluation['persons']} persons), person-level macro F1"
        rows.append(
            (f"ours: majority class ({evaluation['majority_class']})", where, f"{evaluation['majority_macro_f1']:.4f}")
        )
        rows.append(("ours: single member, mean ± std", where, report.mean_std(evaluation["member_macro_f1"])))
        for size in report.ensemble_sizes(len(evaluation["member_macro_f1"])):
            value = evaluation["ensemble_macro_f1_by_size"][str(size)]
            rows.append((f"ours: {size}-member ensemble", where, f"{value:.4f}"))
    members = manifest["members"]
    caption = (
        f"Macro F1, higher is better. Ours: profile `{recipe['run']['profile']}`, {len(members)} members, at most "
        f"{recipe['train']['epochs']} epochs, {manifest['data']['train_tokens']} training tokens; "
        f"{manifest['environment']['machine']}, {manifest['environment']['date'][:10]}, "
        f"commit {runner.short_commit(manifest['environment']['git'])}."
    )
    return report.markdown_table(("model", "data", "macro F1"), rows) + "\n\n" + caption + "\n"


def loss_scale_note(train_recipe: dict, source: dict) -> str:
    """How this run's loss values compare with the focal loss the write-up's figure draws (no α) and with the
    source's reported validation loss; "" for a loss other than the focal loss."""
    if train_recipe["loss"] != "CategoricalFocalCrossentropy":
        return ""
    options = train_recipe.get("loss_options", {})
    alpha, gamma = options.get("alpha", 0.25), options.get("gamma", 2.0)  # Keras's defaults where not set
    note = (
        f"Loss: Keras's `CategoricalFocalCrossentropy(alpha={alpha:g}, gamma={gamma:g})`, "
        f"−α·(1 − p)^γ·log p of the true class. The write-up's loss figure (RetinaNet's Figure 1) draws "
        "FL = −(1 − p)^γ·log p, without α, and neither it nor the text gives α or γ. "
    )
    if alpha == 1:
        return note + "With α = 1 this run's loss values are on the figure's scale."
    return note + (
        f"Here α multiplies every class's loss by exactly {alpha:g}, so this run's loss values (training and "
        f"validation, and the curves below) are {1 / alpha:g}× smaller than the figure's form: compare them with "
        f"the source's reported validation loss {source['validation_loss']} with that in mind. "
        "`--set train.loss_options.alpha=1.0` trains with the figure's form."
    )


def _subclass_rows(table: SubclassTable, data: MaicData, store: TokenStore) -> list[tuple]:
    persons = np.array([table.subclass_of(person) for person in data.train])
    tokens = persons[store.person]
    return [
        (label, diagnosis, sex, band, int((persons == i).sum()), int((tokens == i).sum()))
        for i, (label, (diagnosis, sex, band)) in enumerate(zip(table.labels, table.entries, strict=True))
    ]


def _masking_rows(table: SubclassTable) -> list[tuple]:
    rows = []
    for sex in SEXES:
        for band in BANDS:
            age = table.age_threshold + 1 if band == BANDS[0] else table.age_threshold - 1
            allowed = np.flatnonzero(table.mask(sex, age))
            rows.append(
                (
                    f"{sex}, {band}",
                    ", ".join(table.labels[i] for i in allowed),
                    ", ".join(table.entries[i][0] for i in allowed),
                    len(table.entries) - len(allowed),
                )
            )
    return rows


def write_report(run_dir: Path, scores: dict, data: MaicData, train_store: TokenStore) -> Path:
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    table = SubclassTable.from_config(manifest["subclasses"])
    histories = {
        f"seed {member['seed']}": report.read_history(run_dir / member["file"].replace(".keras", ".history.csv"))
        for member in manifest["members"]
    }
    report.plot_training_curves(histories, run_dir / "training_curves.png")
    monitor = recipe["train"]["monitor"]
    curves = "![training curves](training_curves.png)"
    if any(monitor in history for history in histories.values()):
        report.plot_history_metric(histories, monitor, run_dir / "validation_f1.png", label=f"{monitor} (validation)")
        curves += " ![validation F1](validation_f1.png)"
    counts = manifest["data"]["counts"]
    lines = [
        f"# MAIC 2021 voice pathology — run `{run_dir.name}`",
        "",
        f"Recipe `{recipe['name']}`, profile `{recipe['run']['profile']}`; data `{manifest['data']['root']}`.",
        "The source's numbers are on the real competition data; ours on the data named in each row. The",
        "competition's metric is the macro F1 over persons (the source's write-up calls its final 0.5759",
        '"Micro-F1" once, but "Macro F1-score" in its overview and leaderboard line).',
        "",
        "## Results",
        "",
        results_table(run_dir),
    ]
    loss_note = loss_scale_note(recipe["train"], recipe["source"])
    if loss_note:
        lines += [loss_note, ""]
    for split, evaluation in scores["evaluations"].items():
        slug = split.split()[0]
        report.plot_confusion_matrix(
            np.array(evaluation["confusion_matrix"]),
            list(DIAGNOSES),
            run_dir / f"confusion_{slug}.png",
            title=f"Persons, {split}: ensemble, {'label masking' if evaluation['label_masking'] else 'no masking'}",
        )
        size = str(len(evaluation["member_macro_f1"]))
        masking_word = "label masking" if evaluation["label_masking"] else "no label masking"
        lines += [
            f"### {split}: per diagnosis (ensemble of {size}, {masking_word})",
            "",
            report.markdown_table(
                ("diagnosis", "F1", "persons"),
                [
                    (name, evaluation["per_class_f1"][name], int(np.sum(evaluation["confusion_matrix"][i])))
                    for i, name in enumerate(DIAGNOSES)
                ],
            ),
            "",
            f"Person accuracy {evaluation['accuracy']:.4f}.",
            "",
            f"![confusion matrix](confusion_{slug}.png)",
            "",
            f"### {split}: label masking",
            "",
            report.markdown_table(
                ("", "with masking (source)", "without masking"),
                [
                    (
                        f"person macro F1, {size}-member ensemble",
                        evaluation["ensemble_macro_f1_by_size_masked"][size],
                        evaluation["ensemble_macro_f1_by_size_unmasked"][size],
                    ),
                    (
                        "person macro F1, single member mean",
                        float(np.mean(evaluation["member_macro_f1_masked"])),
                        float(np.mean(evaluation["member_macro_f1_unmasked"])),
                    ),
                    (
                        "token accuracy (diagnosis of the argmax sub-class)",
                        evaluation["token"]["masked"]["accuracy"],
                        evaluation["token"]["unmasked"]["accuracy"],
                    ),
                    (
                        "token macro F1 (diagnoses)",
                        evaluation["token"]["masked"]["macro_f1"],
                        evaluation["token"]["unmasked"]["macro_f1"],
                    ),
                ],
            ),
            "",
            f"Token-level numbers are over the {evaluation['tokens']} tokens that voted "
            f"(at most {recipe['inference']['tokens_per_person']} per person; 0 = all).",
            "",
        ]
    lines += [
        "## Sub-classes (derived from the training persons)",
        "",
        report.markdown_table(
            ("sub-class", "diagnosis", "sex", "age band", "persons", "tokens"), _subclass_rows(table, data, train_store)
        ),
        "",
        f"{len(table.entries)} of {len(DIAGNOSES) * len(SEXES) * len(BANDS)} (diagnosis, sex, age band) "
        f"combinations occur (age band: under / at least {table.age_threshold:g} years).",
        "",
        "## Label masking: the sub-classes a person can be assigned",
        "",
        report.markdown_table(("group", "allowed sub-classes", "their diagnoses", "masked"), _masking_rows(table)),
        "",
        "## Members",
        "",
        report.markdown_table(
            ("seed", "epochs run", "best epoch", f"best {recipe['train']['monitor']}", "train s", "tokens/s")
            + tuple(f"macro F1 {split}" for split in scores["evaluations"]),
            [
                (
                    m["seed"],
                    m["epochs_this_session"] if m.get("epochs_this_session") else m["epochs"],
                    m.get("best_epoch", "-"),
                    next(iter(m["best"].values())) if m.get("best") else "-",
                    f"{m['train_seconds']:.0f}",
                    f"{m['samples_per_second']:.1f}",
                    *(e["member_macro_f1"][i] for e in scores["evaluations"].values()),
                )
                for i, m in enumerate(manifest["members"])
            ],
        ),
        "",
        curves,
        "",
        "## Data and tokens",
        "",
    ]
    for split, split_counts in counts.items():
        if not split_counts:
            continue
        without = task.listing(split_counts["persons_without_tokens"]) or "none"
        lines.append(
            f"- {split}: {split_counts['persons']} persons, {split_counts['tokens_annotated']} annotated tokens, "
            f'{split_counts["tokens_kept"]} kept; {split_counts["tokens_skipped"]} skipped (token_skip = "skip") '
            f"and dropped; {split_counts['tokens_abnormal_pronounce']} kept tokens marked token_pronounce = "
            f'"abnormal"; persons without any kept token: {without}.'
        )
    frames = manifest["inputs"]["frames"]
    lengths = train_store.lengths
    lines += [
        f"- Token lengths (training): median {int(np.median(lengths))} frames, {int((lengths > frames).sum())} "
        f"longer than {frames} (randomly cropped, anew every epoch), {int((lengths < frames).sum())} shorter "
        "(zero-padded at the end).",
        f"- Split: `{recipe['split']['by']}`, {manifest['data']['train_tokens']} training and "
        f"{manifest['data']['validation_tokens']} validation tokens"
        + (
            f" ({len(manifest['data']['validation_persons'])} persons contribute validation tokens)."
            if manifest["data"]["validation_tokens"]
            else "."
        ),
        f"- Normalisation: `{recipe['features']['normalization']}`, mean {manifest['inputs']['mean']:.3f}, "
        f"std {manifest['inputs']['std']:.3f} (training tokens); aux = [sex (M = 1), age / "
        f"{manifest['inputs']['age_scale']:g}].",
        f"- Speed: the source reports about {recipe['source']['seconds_per_epoch']} s per epoch of 10,564 tokens on "
        "the competition GPU (~120 tokens/s with the full network); ours is the members' tokens/s column above.",
        f"- CSV parsing (or cache read): {manifest['parse_seconds']} s. Peak resident memory after training: "
        f"{report.memory_line(manifest.get('peak_memory_mb'))}.",
        f"- Environment: {report.environment_line(manifest['environment'])}.",
        "",
    ]
    return files.write_text(run_dir / "report.md", "\n".join(lines))


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return runner.command_line(
        argv,
        prog="python -m replicate.maic",
        description="MAIC 2021 voice-pathology 1st-place solution: tokens, mini-ResNet ensemble, person votes.",
        data_help="train/ and test/ with <id>.csv (128 mel rows) + <id>.json / <id>_*.json per person",
        load_recipe=load_recipe,
        run=run,
    )


if __name__ == "__main__":
    sys.exit(main())
