"""MAIC's tokens: every person's CSV cut into its annotated tokens once and cached (`token_store`), and how
tokens become model inputs (`Inputs`: the 64-frame crops, normalised, and the [sex, age] input)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from replicate import files
from replicate.maic.data import Person
from replicate.task import DataError

CACHE_VERSION = 1
INDEX_COLUMNS = ("offsets", "lengths", "person", "token_no")  # index.npz: int64 per token, `TokenStore`'s


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
    data: dict,
    *,
    cache_dir: str | os.PathLike,
    name: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TokenStore:
    """The tokens of `persons`, parsed from their CSVs once and memory-mapped from the cache afterwards
    (`files.cached_folder`: `<cache_dir>/<name>-<key>/`, the key hashing `data` and every CSV/JSON file's
    path, size and modification time), so a second run reads no CSV.

    Args:
        persons: the split's persons.
        data: the recipe's `data` table: `mel_bins` (the rows of every CSV), `drop_skipped` (leave out the
            tokens marked token_skip = "skip"), `end_frame_inclusive` (endFrame is a token's last column,
            or one past it).
        cache_dir, name: the cache folder and the cache's name in it, e.g. "maic-train".
        progress, log: a progress bar while parsing; where a damaged cache is said.

    Raises:
        DataError: a CSV with the wrong shape or bad cells, or a token whose frames are empty or fall outside
            its CSV.
        files.LockedError: another process is building the same cache.
    """
    params = {"kind": "maic-tokens", "version": CACHE_VERSION, **data}
    try:
        key = files.cache_key(params, [path for person in persons for path in (person.csv_path, *person.json_paths)])
    except OSError as error:
        raise DataError(f"{error.filename}: cannot read the file ({error.strerror})") from error
    final_dir = Path(cache_dir) / f"{name}-{key}"
    meta = files.cached_folder(
        final_dir,
        lambda partial: _build_token_cache(persons, partial, data, name=name, progress=progress),
        what="token cache",
        log=log,
    )
    index = np.load(final_dir / "index.npz")
    columns = {key: index[key] for key in INDEX_COLUMNS}
    frames = np.load(final_dir / "frames.npy", mmap_mode="r")
    return TokenStore(frames=frames, **columns, counts=meta["counts"], checksums=meta["checksums"])


def _check_frames(person: Person, width: int, inclusive: bool) -> None:
    """Every token of the person has frames, inside its CSV of `width` columns (`inclusive`: endFrame is a
    token's last column)."""
    for token in person.tokens:
        if token.end + inclusive <= token.start:
            raise DataError(
                f"{person.annotation}: token {token.token_no} has no frames ({token.start}..{token.end} with "
                f"data.end_frame_inclusive = {str(inclusive).lower()})"
            )
    outside = [token for token in person.tokens if token.end + inclusive > width]
    if outside:
        token = outside[0]
        raise DataError(
            f"{person.csv_path}: token {token.token_no} spans frames {token.start}..{token.end + inclusive - 1} but "
            f"the CSV has {width} columns ({len(outside)} token(s) outside; annotation {person.annotation.name})"
        )


def _build_token_cache(persons: Sequence[Person], partial_dir: Path, data: dict, *, name: str, progress: bool) -> dict:
    """Parse every person's CSV into `partial_dir` (`files.cached_folder`'s): frames.npy, index.npz."""
    inclusive = data["end_frame_inclusive"]
    kept = [[token for token in person.tokens if not (data["drop_skipped"] and token.skip)] for person in persons]
    total = sum(token.end + inclusive - token.start for tokens in kept for token in tokens)
    frames = np.lib.format.open_memmap(
        partial_dir / "frames.npy", mode="w+", dtype=np.float32, shape=(max(total, 1), data["mel_bins"])
    )
    index_columns = {key: [] for key in INDEX_COLUMNS}
    position = 0
    for index, (person, tokens) in enumerate(
        tqdm(list(zip(persons, kept, strict=True)), desc=f"tokens {name}", unit="person", disable=not progress)
    ):
        mel = read_mel_csv(person.csv_path, data["mel_bins"])
        _check_frames(person, mel.shape[1], inclusive)
        for token in tokens:
            length = token.end + inclusive - token.start
            frames[position : position + length] = mel[:, token.start : token.start + length].T
            for key, value in zip(INDEX_COLUMNS, (position, length, index, token.token_no), strict=True):
                index_columns[key].append(value)
            position += length
    frames.flush()
    del frames
    np.savez(partial_dir / "index.npz", **{key: np.array(values, np.int64) for key, values in index_columns.items()})
    counts = {
        "persons": len(persons),
        "tokens_annotated": sum(len(person.tokens) for person in persons),
        "tokens_kept": len(index_columns["lengths"]),
        "tokens_skipped": sum(len(person.tokens) - len(tokens) for person, tokens in zip(persons, kept, strict=True)),
        "tokens_abnormal_pronounce": sum(token.abnormal_pronounce for tokens in kept for token in tokens),
        "persons_without_tokens": [
            person.person_id for person, tokens in zip(persons, kept, strict=True) if not tokens
        ],
    }
    return {"name": name, "counts": counts}


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

    def normalize(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def columns(self, store: TokenStore, persons: Sequence[Person], crop_seed: int | None = None) -> dict:
        """The model's inputs per token of `store` (`pipeline.from_columns`): "mel", its `frames`-wide crop,
        normalised, zero-padded at the end when shorter, and "aux", its person's [sex, age]. The crops start
        at random frames drawn anew every epoch (training), or at the fixed starts of `crop_seed`
        (`crop_offsets`: validation and inference)."""
        from replicate import pipeline

        starts = None if crop_seed is None else crop_offsets(store.lengths, self.frames, crop_seed)
        mel = pipeline.CropColumn(
            store.frames, store.offsets, store.lengths, self.frames, transform=self.normalize, starts=starts
        )
        return {"mel": mel, "aux": self.aux(persons)[store.person]}

    def to_config(self) -> dict:
        return {"frames": self.frames, "mean": self.mean, "std": self.std, "age_scale": self.age_scale}

    @classmethod
    def from_config(cls, config: dict) -> Inputs:
        return cls(config["frames"], config["mean"], config["std"], config["age_scale"])


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


def person_rows(store: TokenStore, tokens_per_person: int) -> np.ndarray:
    """The token rows used to predict persons: each person's first `tokens_per_person` kept tokens (0: all)."""
    if tokens_per_person == 0:
        return np.arange(len(store))
    keep = np.zeros(len(store), dtype=bool)
    for person in np.unique(store.person):
        keep[np.flatnonzero(store.person == person)[:tokens_per_person]] = True
    return np.flatnonzero(keep)
