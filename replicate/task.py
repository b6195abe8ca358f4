"""The task protocol: the few hooks a source implements; the engine (`replicate.runner`) does the rest.

A source is a package `replicate/<name>/` whose `TASK` is an instance of a `Task` subclass, listed in the
registry (`replicate.tasks`). The engine owns the command line (`python -m replicate.<name>`), the run
folder, the one run sequence, the manifest (one schema for every task), training (`replicate.train`), the
report's frame, the README's results block and inference (`replicate.ensemble`, `python -m
replicate.predict`). The task owns what only it knows: its recipe's own keys, its data layout, how data
become model inputs, what is trained, how it is scored and what its report adds.

The run sequence (`runner.run`), hook by hook:

    recipe = task.load_recipe(profile, overrides)   # engine keys + `rules` + `check_recipe`
    data = task.load(data_root)                     # the layout, checked: `DataError` naming the file
    run folder: created, locked, recipe.toml written
    prepared = task.prepare(run, data)              # features, normaliser, split → `Prepared`
    for group in task.groups(run, data, prepared):  # each a seed ensemble (`Group`) in run_dir/<name>/
        train.train_ensemble(...), then group.after_training(group_dir, log)
    manifest.json                                   # the inference ensemble: members of the `ensemble` groups
    scores = task.evaluate(run, data, prepared)     # predictions, submission, official files, "headline"
    scores.json; report.md                          # the frame + `task.results(run)` + `task.report(...)`

How the four sources map onto the hooks:

- DACON (`replicate/dacon/`): `load` reads train/, test/ and the CSVs; `prepare` caches four-resolution
  mel power (`features.MelPowerSpec`), fits the dB/z-score `Normalizer` (train + test, the source's) and
  the optional validation split; one group (the run folder itself); `evaluate` averages the members'
  word shares, writes submission.csv and scores KL per member and per ensemble size; `predict`: wav files.
- MAIC: `load` reads persons (CSV + JSON); `prepare` parses tokens into the cache (`files.cached_folder`),
  derives the sub-class table, splits tokens or persons and fits the token mean/std (`preprocessing`:
  the `Inputs` and sub-class table, what inference needs); one group whose `train_data` is
  `pipeline.from_columns({"mel": CropColumn(...), "aux": aux}, labels, ...)` (random token crops keyed
  by seed and epoch), `member_callbacks` BestEpoch (validation macro F1), ReduceLROnPlateau and early
  stopping; `evaluate` votes per person with label masking, writes submission.csv; `predict`: a folder of
  persons → diagnosis per person; `report` adds the per-diagnosis, masking and sub-class tables and
  `history_metrics` = {"val_macro_f1": ...}.
- DCASE: `prepare` caches one-resolution mel power with torchaudio's definition (`MelPowerSpec`), fits
  the normaliser on the training clips; `groups` follow `train.setup`: "integrated" (all IDs), or
  "per_machine/<type>" (one per machine type), or "integrated" (`ensemble=False`) then
  "finetune/<type>" whose `build_model(recipe, seed)` loads that seed's integrated member (which is why
  builders take the seed); each group's `recipe` carries the warm-restart schedule, its
  `member_callbacks` the dev AUC + pAUC BestEpoch, its `after_training` the export to built-in layers;
  `evaluate` loads each group (`Ensemble.load(run.run_dir, groups=[name])`), scores clips by every
  method (the members' outputs are dicts: `Ensemble.predict_members(..., output="embedding")`), writes the
  official CSVs, and saves what its score method needs of the training clips (e.g. each ID's centroid) so
  that `predict`: wav files → anomaly score per clip with the run's `score.method`, needs no training data.
- AI CUP: `prepare` caches MFCCs per n_mfcc (`features.MfccSpec`), fits the clinical encoder, draws the
  folds; one group per (modality, n_mfcc variant), "<modality>/mfcc<k>", each with its own `recipe`,
  `trained_from` and validation data, sample weights from `pipeline.from_columns(..., weights=...)`;
  `ensemble` = the submission modality; members take different named inputs, which `Ensemble` gives each
  by name; `evaluate` loads each modality's variant groups (`Ensemble.load(run.run_dir, groups=[...])`),
  votes (sum, argmax), writes submission.csv; `predict`: wav files + a clinical CSV (audio-only runs: wav
  files alone).

A new source: a package with `data.py` (the layout), `task.py` (a `Task` subclass and `TASK = ...`),
`report.py` (its `results` rows and report parts), `__init__.py`, `__main__.py` (`runner.main(TASK)`),
a recipe `recipes/<name>.toml`, and one line in `replicate/tasks.py`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from replicate import files
from replicate import recipe as recipe_lib


class DataError(ValueError):
    """The data folder does not have the competition's layout; the message names the file and rows."""


def listing(values: Sequence, limit: int = 10) -> str:
    """ "a, b, c" or, past `limit` values, "a, b, ... (and 7 more)"."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"{shown} (and {len(values) - limit} more)" if len(values) > limit else shown


def read_csv(path: str | os.PathLike, **options):
    """`pandas.read_csv(path, **options)`; a file that cannot be read or parsed is a `DataError` naming it."""
    import pandas as pd

    try:
        return pd.read_csv(path, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error


def read_json(path: str | os.PathLike) -> Any:
    """A data file's JSON content; a file that cannot be read or is not valid JSON (or UTF-8) is a `DataError`
    naming it."""
    try:
        return files.read_json(path)
    except ValueError as error:  # not valid JSON (or UTF-8); the message names the file
        raise DataError(str(error)) from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error


def csv_lines(table, rows, id_column: str | None = None) -> str:
    """Where rows of a table read by `read_csv` are in its file, for an error message: "line 2, 5" (line 1
    is the header), and with `id_column` the rows' IDs: "line 2, 5 (ID a, b)".

    Args:
        table: the `pandas.DataFrame` as read (its default index: row i on line i + 2).
        rows: the index labels of the rows.
    """
    lines = f"line {listing([int(row) + 2 for row in rows])}"
    return f"{lines} (ID {listing(table.loc[rows, id_column].tolist())})" if id_column else lines


def repeated_rows(table, keys: Sequence[str], values: str, values_name: str = "") -> list[str]:
    """Each key that more than one row of a table read by `read_csv` holds, for an error message, in the
    order of the file: "fan/a.wav on lines 4, 9 (labels 0, 1)": the key's columns joined by "/", the rows'
    lines (line 1 is the header) and their `values` column after `values_name`; empty if no key repeats."""
    repeated = table[table.duplicated(list(keys), keep=False)]
    return [
        f"{'/'.join(map(str, key))} on lines {', '.join(str(row + 2) for row in group.index)} "
        f"({values_name}{', '.join(map(str, group[values]))})"
        for key, group in repeated.groupby(list(keys), sort=False)
    ]


def header_names(
    path: str | os.PathLike,
    columns: Sequence[str],
    expected: Sequence[str],
    normalize: Callable[[str], str],
    optional: Sequence[str] = (),
) -> dict[str, str]:
    """Each column of a CSV's header → the `expected` (or `optional`) name it stands for, names compared
    after `normalize` (e.g. case- and space-insensitively); for `DataFrame.rename(columns=...)`.

    Raises:
        DataError: naming `path`: two columns that stand for the same name; `expected` names missing or
            columns unknown (both, when both).
    """
    by_normalized = {normalize(name): name for name in expected}
    for name in optional:
        by_normalized.setdefault(normalize(name), name)
    renames, unknown, seen = {}, [], {}
    for column in columns:
        canonical = by_normalized.get(normalize(column))
        if canonical is None:
            unknown.append(repr(column))
        elif canonical in seen:
            raise DataError(f"{path}: columns {seen[canonical]!r} and {column!r} are the same column {canonical!r}")
        else:
            seen[canonical] = column
            renames[column] = canonical
    missing = [name for name in expected if name not in seen]
    problems = ([f"missing columns {', '.join(map(repr, missing))}"] if missing else []) + (
        [f"unknown columns {', '.join(unknown)}"] if unknown else []
    )
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)} (expected the competition's {len(expected)} columns)")
    return renames


def layout_name(name: str) -> str:
    """A file or folder name as data layouts compare them: case-insensitive, with spaces, underscores and
    dashes alike ("Training Dataset" → "training_dataset")."""
    return re.sub(r"[\s_-]+", "_", name.strip()).lower()


def find_in_layout(root: Path, name: str, *, directory: bool, near: Path | None = None) -> Path | None:
    """The file (or folder) whose `layout_name` is `name`: beside `near` if it is there, else the one in
    `root` or one level down; None if there is none. Two candidates in the same search are a `DataError`
    (which one is the data cannot be told)."""

    def matches(place: Path) -> list[Path]:
        return [
            candidate
            for candidate in sorted(place.iterdir())
            if layout_name(candidate.name) == name and (candidate.is_dir() if directory else candidate.is_file())
        ]

    searches = ([[near]] if near is not None else []) + [[root, *sorted(p for p in root.iterdir() if p.is_dir())]]
    for places in searches:
        found = [candidate for place in places for candidate in matches(place)]
        if len(found) > 1:
            raise DataError(
                f"{root}: {name} is there {len(found)} times ({listing(map(str, found))}); keep one (or use "
                "a data folder that holds one)"
            )
        if found:
            return found[0]
    return None


def wav_files_by_id(folder: Path, ids: Sequence[str], table: Path) -> tuple[list[Path], list[str]]:
    """The wav file `<id>.wav` (`.wav` in any case) of every id of a `table`, in the ids' order, and the names
    of the folder's other wav files, sorted; ids without a file are a `DataError` listing them."""
    on_disk = {path.stem: path for path in folder.iterdir() if path.suffix.lower() == ".wav"}
    missing = [identifier for identifier in ids if identifier not in on_disk]
    if missing:
        raise DataError(f"{len(missing)} IDs of {table} have no {folder}/<ID>.wav: {listing(missing)}")
    return [on_disk[identifier] for identifier in ids], sorted(set(on_disk) - set(ids))


def holdout_rows(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows) of `count` rows, both sorted: a seeded random `fraction` held out (at least one
    row unless `fraction` is 0), e.g. a validation split."""
    rows = np.arange(count)
    if fraction == 0:
        return rows, np.array([], dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(rows)
    cut = max(1, round(fraction * count))
    return np.sort(shuffled[cut:]), np.sort(shuffled[:cut])


def stratified_fold_rows(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows), both sorted: fold `fold` of a seeded stratified `folds`-fold split of
    `labels` (scikit-learn's shuffled `StratifiedKFold`), e.g. AI CUP's fold 0 of 4."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_rows, validation_rows = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return np.sort(train_rows), np.sort(validation_rows)


@dataclass
class Run:
    """One run of a task, as the hooks see it: its recipe and folder, and what the engine has made so far.

    Attributes:
        task: the task.
        recipe: the resolved recipe.
        run_dir: the run folder.
        data_root: the data folder (None for a run read back from its files).
        progress: show progress bars.
        retrain: train again the members trained from another set-up.
        log: where progress lines go.
        manifest: the run's manifest, once its groups are trained (or read back).
        scores: `scores.json`, once evaluated (or read back).
    """

    task: Task
    recipe: dict
    run_dir: Path
    data_root: Path | None = None
    progress: bool = True
    retrain: bool = False
    log: Callable[[str], None] = print
    manifest: dict | None = None
    scores: dict | None = None

    @classmethod
    def read(cls, run_dir: str | os.PathLike, task: Task) -> Run:
        """A finished run folder read back: its recipe, manifest and scores (for the README's results)."""
        run_dir = Path(run_dir)
        return cls(
            task,
            recipe_lib.load_recipe(run_dir / "recipe.toml"),
            run_dir,
            manifest=files.read_json(run_dir / "manifest.json"),
            scores=files.read_json(run_dir / "scores.json"),
        )

    @property
    def seeds(self) -> list[int]:
        """The ensemble's seeds (`recipe.seeds_of`)."""
        return recipe_lib.seeds_of(self.recipe)

    def cached(self, spec, paths: Sequence[str | os.PathLike], name: str) -> tuple[Any, dict]:
        """The features of `spec` (a `features.FeatureSpec`) for `paths`, from the recipe's cache folder."""
        run = self.recipe["run"]
        return spec.cached(
            paths,
            cache_dir=run["cache_dir"],
            name=name,
            workers=run["workers"] or None,
            progress=self.progress,
            log=self.log,
        )


@dataclass
class Prepared:
    """What `Task.prepare` hands the engine: the task's parts of the manifest and what members learn from.

    Attributes:
        class_names: the ensemble's output classes.
        inputs: model input name → shape of one row (the members' `keras.Input`s).
        unit: what a row of training data is: "clips", "tokens" or "persons".
        splits: rows per split in `unit`, "train" and "validation" first, then the task's own (e.g. "test").
        features: input name → `FeatureSpec.to_manifest()`, for the inputs computed from audio.
        preprocessing: the task's inference state, JSON-able: normalisation statistics, encoders, tables.
        data: other facts about the data for the manifest and the report (audio changes, counts).
        trained_from: what every member learns from besides the recipe (`train.train_ensemble`).
        state: the task's own objects (arrays, caches, splits) for its other hooks; not saved.
    """

    class_names: list[str]
    inputs: dict[str, list[int]]
    unit: str
    splits: dict[str, int]
    features: dict[str, dict] = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    trained_from: dict = field(default_factory=dict)
    state: Any = None


@dataclass
class Group:
    """One seed ensemble to train: a member per seed, in its own folder under the run folder.

    Attributes:
        build_model: seed → a new, uncompiled member (called after `keras.utils.set_random_seed(seed)`;
            the seed also lets a member start from its own seed's member of an earlier group).
        train_data: (seed, epoch) → that epoch's training dataset, drawn from (seed, epoch) only
            (`replicate.pipeline`), so that an interrupted member resumes exactly.
        name: its folder under the run folder: "" (the run folder itself) for a task's only group; with
            several groups each has its own, e.g. "integrated", "per_machine/fan", "multimodal/mfcc13".
        validation_data: given to `fit` every epoch, or None.
        member_callbacks: (member folder, member name) → the member's own stateful callbacks (`BestEpoch`,
            ReduceLROnPlateau, EarlyStopping), whose state is checkpointed.
        recipe: the recipe its members are compiled and trained with (None: the run's), e.g. with a
            learning-rate schedule object or one variant's values.
        trained_from: added to `Prepared.trained_from` for its members (its rows, its classes...).
        manifest: its own manifest entries beside the run's (e.g. its class_names, machine type, inputs).
        after_training: (group folder, log) → None, run after its members are trained (DCASE's export).
        ensemble: its members belong to the run's inference ensemble (the top-level manifest).
        metrics: compiled metrics, logged per epoch.
    """

    build_model: Callable[[int], Any]
    train_data: Callable[[int, Any], Any]
    name: str = ""
    validation_data: Any = None
    member_callbacks: Callable[[Path, str], Sequence[Any]] | None = None
    recipe: dict | None = None
    trained_from: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    after_training: Callable[[Path, Callable[[str], None]], None] | None = None
    ensemble: bool = True
    metrics: Sequence[Any] | None = None


@dataclass
class ResultsTable:
    """A run's results beside the source's: the README's block and the head of the report.

    The engine adds the caption: "<metric> Ours: profile `p`, <details>; <machine>, <date>, commit <c>."

    Attributes:
        headers: the column names, e.g. ("model", "data", "KL").
        rows: the source's reported numbers first ("source: ..."), then ours ("ours: ...").
        metric: what the numbers are, e.g. "KL divergence, lower is better."
        details: what our rows were trained on, e.g. ["2 members × 3 epochs", "800 training clips"].
    """

    headers: tuple[str, ...]
    rows: list[tuple]
    metric: str
    details: list[str]


@dataclass
class EnsembleCurve:
    """A score of the ensemble of the first k members against k, plotted by the engine."""

    split: str
    sizes: list[int]
    scores: list[float]
    metric: str
    baselines: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_sizes(
        cls,
        split: str,
        by_size: Mapping[str, float],
        metric: str,
        baselines: Mapping[str, float] | None = None,
        members: Sequence[float] = (),
    ) -> EnsembleCurve:
        """The curve of a scores.json table {"k": score} (e.g. `ensemble_macro_f1_by_size`); given the single
        members' scores (`members`), their mean is the last baseline, "single member (mean)"."""
        baselines = dict(baselines or {})
        if len(members):
            baselines["single member (mean)"] = float(np.mean(members))
        return cls(split, list(map(int, by_size)), list(by_size.values()), metric, baselines)


@dataclass
class ReportParts:
    """What a task adds to the engine's report frame (header, results, members, curves, footer).

    Attributes:
        intro: lines under the header: where the source's and our numbers come from, the metric.
        sections: markdown after the results (and the ensemble-size plots): per-class tables, confusion
            matrices, ROC curves... (the task writes its own plots into the run folder).
        member_columns: extra columns of the members table, header → one value per member of the manifest.
        ensemble_curves: ensemble-size plots, one per split.
        history_metrics: logged value → label, plotted per epoch beside the training curves (when logged).
        notes: the bullet lines of the footer ("Features and data"), before timing, memory and environment.
        notes_title: the footer's title.
    """

    intro: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    member_columns: dict[str, list] = field(default_factory=dict)
    ensemble_curves: list[EnsembleCurve] = field(default_factory=list)
    history_metrics: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    notes_title: str = "Features and data"


@dataclass
class BenchmarkMember:
    """One member as the full recipe trains it, from the recipe alone (no data): what
    `benchmarks.training` times.

    Attributes:
        build: () → a new, uncompiled member with the real data's input shapes and classes.
        train: the recipe's train table as `train.compile_model` takes it.
        label_input: an input that is fed the targets (DCASE's margin layer), or "".
    """

    build: Callable[[], Any]
    train: dict
    label_input: str = ""


class Task:
    """A source's hooks. Subclass it, set the class attributes, implement the hooks; the engine calls them.

    Class attributes:
        name: the recipe (`recipes/<name>.toml`), the command (`python -m replicate.<name>`), `runs/<name>/`.
        title: the report's title, e.g. "DACON overlapping speech".
        description: the command's one-line description.
        data_help: what `--data` must contain.
        rules: the task's own recipe keys → rule (`recipe.one_of`, `recipe.positive`...). The engine's keys
            (`recipe.ENGINE_RULES`: train.epochs, batch_size, precision, fused, ensemble.*, run.*) are
            checked for every recipe and must not be repeated here.
    """

    name: str = ""
    title: str = ""
    description: str = ""
    data_help: str = ""
    rules: Mapping[str, recipe_lib.Rule] = {}

    # --- the recipe --------------------------------------------------------------------------------

    def load_recipe(self, profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
        """The task's recipe with a profile and `--set` overrides, validated (`recipe.load_recipe`, then
        `check_recipe`)."""
        recipe = recipe_lib.load_recipe(path or self.name, profile, overrides, self.rules, task=self.name)
        self.check_recipe(recipe)
        return recipe

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The command line, `python -m replicate.<name>` (`runner.main`)."""
        from replicate import runner

        return runner.main(self, argv)

    def run(self, recipe: dict, data_root: str | os.PathLike, run_dir: str | os.PathLike | None = None, **options):
        """Run the recipe on a data folder (`runner.run`: progress, retrain, log); returns the run folder."""
        from replicate import runner

        return runner.run(self, recipe, data_root, run_dir, **options)

    def check_recipe(self, recipe: dict) -> None:
        """Checks across keys, and refusals of engine options the task cannot honour; raise
        `recipe.RecipeError` naming the keys and the reason (e.g. DCASE: `train.fused` must be 1, its
        members keep their best epoch by a per-member callback)."""

    # --- the run (called in this order by `runner.run`) -----------------------------------------------

    def load(self, data_root: Path) -> Any:
        """Read and check the data folder (the competition's layout); `DataError` naming the file and the
        rows for anything wrong. Returns the task's typed data, given to the other hooks."""
        raise NotImplementedError(f"{type(self).__name__} must define load()")

    def prepare(self, run: Run, data: Any) -> Prepared:
        """Features (from the cache: `run.cached(spec, paths, name)`), normalisation statistics, splits;
        logs one "data: ..." line. Returns the manifest's task parts and what members learn from."""
        raise NotImplementedError(f"{type(self).__name__} must define prepare()")

    def groups(self, run: Run, data: Any, prepared: Prepared) -> Sequence[Group]:
        """What to train, in order: one `Group` (a seed ensemble) or several."""
        raise NotImplementedError(f"{type(self).__name__} must define groups()")

    def evaluate(self, run: Run, data: Any, prepared: Prepared) -> dict:
        """Predict with the trained members (`Ensemble.load(run.run_dir)`), write the submission and any
        official files, and return the scores (written as scores.json), with "headline": the run's result
        in a phrase beside the source's number (the command's last line)."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate()")

    # --- the report ----------------------------------------------------------------------------------

    def results(self, run: Run) -> ResultsTable:
        """The results table, from the run's files alone (`run.recipe`, `run.manifest`, `run.scores`): the
        README's block is made from a finished run folder."""
        raise NotImplementedError(f"{type(self).__name__} must define results()")

    def report(self, run: Run, data: Any, prepared: Prepared) -> ReportParts:
        """What the report adds to the engine's frame (default: nothing)."""
        return ReportParts()

    # --- inference -----------------------------------------------------------------------------------

    def inference_inputs(self, manifest: dict, paths: Sequence[str | os.PathLike]) -> Any:
        """Model inputs for audio files, computed as in training from the manifest (feature specs,
        statistics): an array, or {input name: array}. For tasks whose members take audio files."""
        raise NotImplementedError(f"the {self.name} task predicts from {self.data_help}, not from audio files alone")

    def predict(self, ensemble, inputs: Sequence[str]) -> Any:
        """Predictions from the task's natural raw input (the command line's INPUT... paths: files or
        folders) with a loaded `Ensemble`: a `pandas.DataFrame`, one row per item, its first column naming
        the item. Bad input: a `ValueError` subclass of the package naming the file."""
        raise NotImplementedError(f"{type(self).__name__} must define predict()")

    # --- benchmarks ----------------------------------------------------------------------------------

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        """One member of the recipe, for `benchmarks.training` (the real data's shapes, from the recipe)."""
        raise NotImplementedError(f"{type(self).__name__} must define benchmark_member()")
