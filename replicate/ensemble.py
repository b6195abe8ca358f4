"""A trained seed ensemble: its manifest and members, loadable anywhere for prediction.

>>> from replicate.ensemble import Ensemble
>>> ensemble = Ensemble.load("runs/dacon/quick-1a2b3c4d5e6f")
>>> probabilities = ensemble.predict_files(["clip.wav"])     # (1, 30), rows sum to 1
>>> table = ensemble.predict_table(["clip.wav", "test/"])    # the task's own predictions, one row per item

Members may take several named inputs (each is given the inputs it names) and return a dict of outputs
(one is chosen by name). From raw input (audio files, a folder of persons, ...) the task's inference hook
(`Task.predict`, found through the registry `replicate.tasks`) computes the inputs exactly as in training
and combines the members as the source did. Clips longer than the members' input are predicted window by
window and averaged per clip (`clip_outputs`; DCASE's mean over each clip's windows).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np

from replicate import files, train
from replicate.runner import MANIFEST, RunFolderError

CLIP_CHUNK = 128  # clips normalised and predicted at a time by `clip_outputs` (a memmap is read in chunks)


class PredictionError(ValueError):
    """Members whose outputs are not finite numbers; the message names their seeds. Nothing is written from
    such outputs: a NaN probability would become an empty submission cell or a label chosen by argmax of NaN."""


def check_finite(member_outputs: Sequence, seeds: Sequence[int | str], what: str) -> None:
    """Refuse member outputs with a NaN or infinite value, naming the members' seeds.

    Args:
        member_outputs: per member, an array or a list of arrays (probabilities, embeddings, scores).
        seeds: the members' seeds (or other names), in the same order.
        what: what was predicted, for the message (e.g. "runs/dacon/x: the test clips").

    Raises:
        PredictionError: listing every member with a non-finite value.
    """

    def finite(output) -> bool:
        parts = output if isinstance(output, (list, tuple)) else [output]
        return all(np.isfinite(part).all() for part in parts)

    bad = [seed for seed, output in zip(seeds, member_outputs, strict=True) if not finite(output)]
    if bad:
        raise PredictionError(
            f"{what}: the member(s) of seed(s) {', '.join(map(str, bad))} predict NaN or infinite values "
            f"(of {len(seeds)} members); nothing was written from these predictions"
        )


class Ensemble:
    """Members of one run, averaged.

    Attributes:
        run_dir: the run folder.
        manifest: the run's manifest (task, features, preprocessing, class names, members).
        members: the loaded `keras.Model`s, in manifest order.
    """

    def __init__(self, run_dir: Path, manifest: dict, members: Sequence[keras.Model]):
        if not members:
            raise ValueError(f"{run_dir}: the ensemble has no members")
        self.run_dir = run_dir
        self.manifest = manifest
        self.members = list(members)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, size: int | None = None, *, groups: Sequence[str] | None = None):
        """Load the manifest and its members (all, or the first `size` seeds of each group), in safe mode, each
        checked against the SHA-256 in its record (`members/seed-XX.json` beside it) where it has one.

        Args:
            run_dir: a finished run folder.
            size: load the first `size` members of each group only (of a run of several groups, e.g. AI CUP's
                variants or DCASE's machine types, the first `size` would leave later groups without any).
            groups: load these groups' members (each group folder's own manifest) instead of the run's
                ensemble, e.g. AI CUP's other modality; their files are taken relative to the run folder.

        Raises:
            RunFolderError: no manifest, a member's file missing, or differing from its record.
        """
        run_dir = Path(run_dir)
        manifest = _read_manifest(run_dir)
        if groups is not None:
            manifest = {**manifest, "members": [entry for name in groups for entry in _group_members(run_dir, name)]}
        entries = manifest["members"]
        if size is not None:
            groups = [entry.get("group", "") for entry in entries]  # a run from before groups has none
            entries = [entry for k, entry in enumerate(entries) if groups[:k].count(groups[k]) < size]
        missing = [entry["file"] for entry in entries if not (run_dir / entry["file"]).is_file()]
        if missing:
            raise RunFolderError(f"{run_dir}: member files listed in the manifest are missing: {missing}")
        for entry in entries:
            record_path = (run_dir / entry["file"]).with_suffix(".json")
            recorded = files.read_json(record_path).get("sha256") if record_path.is_file() else None
            if recorded is not None:
                problem = train.damaged_member(run_dir, entry["file"], recorded)
                if problem:
                    raise RunFolderError(f"{run_dir}: {problem}; run the recipe again to train it again")
        members = [keras.models.load_model(run_dir / entry["file"], safe_mode=True) for entry in entries]
        return cls(run_dir, {**manifest, "members": entries}, members)

    def group(self, name: str) -> Ensemble:
        """The loaded members of one group (`manifest["groups"]`), as an ensemble of their own."""
        kept = [k for k, entry in enumerate(self.manifest["members"]) if entry.get("group", "") == name]
        if not kept:
            raise RunFolderError(f"{self.run_dir}: no member of the group {name!r} is loaded")
        entries = [self.manifest["members"][k] for k in kept]
        return Ensemble(self.run_dir, {**self.manifest, "members": entries}, [self.members[k] for k in kept])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def seeds(self) -> list[int]:
        return [entry["seed"] for entry in self.manifest["members"]]

    @property
    def task(self):
        """The run's task (`replicate.task.Task`), from the registry."""
        from replicate import tasks

        return tasks.get(self.manifest["task"])

    def predict_members(self, inputs, batch_size: int = 256, *, output: str | None = None) -> np.ndarray:
        """Each member's predictions: (members, rows, ...).

        Args:
            inputs: an array, a `tf.data.Dataset`, or {input name: array}, of which each member gets the
                inputs it names (members of one ensemble may take different inputs).
            batch_size: rows per predict step.
            output: which output of members that return a dict of outputs (e.g. "embedding").

        Raises:
            PredictionError: a member predicts a NaN or infinite value (its seed is named).
        """
        outputs = np.stack(
            [
                _chosen_output(member.predict(_inputs_of(member, inputs), batch_size=batch_size, verbose=0), output)
                for member in self.members
            ]
        )
        check_finite(outputs, self.seeds, str(self.run_dir))
        return outputs

    def predict(self, inputs, batch_size: int = 256, *, output: str | None = None) -> np.ndarray:
        """The ensemble's predictions: the plain mean of the members' (as every source averaged)."""
        return self.predict_members(inputs, batch_size, output=output).mean(axis=0)

    def features(self, paths: Sequence[str | os.PathLike]):
        """Model inputs for audio files, computed exactly as in training (`Task.inference_inputs`)."""
        return self.task.inference_inputs(self.manifest, paths)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 256) -> np.ndarray:
        """The ensemble's probabilities for audio files: (files, classes)."""
        return self.predict(self.features(paths), batch_size)

    def predict_table(self, inputs: Sequence[str | os.PathLike]):
        """The task's predictions from its natural raw input (`Task.predict`): a `pandas.DataFrame` with one
        row per item (a clip, a person), e.g. DACON's word shares of each wav file."""
        return self.task.predict(self, [os.fspath(path) for path in inputs])

    def evaluate(self, inputs, targets: np.ndarray, metric: Callable, batch_size: int = 256) -> dict:
        """Score every member and the ensembles of the first k members with `metric(targets, predictions)`."""
        return score_members(self.predict_members(inputs, batch_size), targets, metric)


def _read_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise RunFolderError(f"{path}: no manifest; is {run_dir} a finished run folder?")
    return files.read_json(path)


def _group_members(run_dir: Path, name: str) -> list[dict]:
    """A group's members from its own manifest, their files relative to the run folder."""
    manifest = _read_manifest(run_dir / name)
    return [
        {**entry, "group": name, "file": f"{name}/{entry['file']}" if name else entry["file"]}
        for entry in manifest["members"]
    ]


def _inputs_of(member: keras.Model, inputs):
    """What `member` takes of `inputs`: the arrays its inputs name when `inputs` is a dict, else `inputs`."""
    if not isinstance(inputs, Mapping):
        return inputs
    names = [tensor.name for tensor in member.inputs]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(f"the member {member.name!r} takes inputs {names}; not given: {missing}")
    return inputs[names[0]] if len(names) == 1 else {name: inputs[name] for name in names}


def _chosen_output(prediction, output: str | None) -> np.ndarray:
    """A member's prediction, or the named one of its dict of outputs."""
    if not isinstance(prediction, Mapping):
        if output is not None:
            raise ValueError(f"output={output!r} names an output, but the members have a single one")
        return np.asarray(prediction)
    if output is None and len(prediction) == 1:
        return np.asarray(next(iter(prediction.values())))
    if output not in prediction:
        raise ValueError(f"the members return the outputs {sorted(prediction)}: choose one with output=...")
    return np.asarray(prediction[output])


def window_starts(total_frames: int, frames: int) -> list[int]:
    """Non-overlapping windows of `frames` covering a clip; the last one ends at the clip's end."""
    if frames >= total_frames:
        return [0]
    starts = list(range(0, total_frames - frames + 1, frames))
    if starts[-1] + frames < total_frames:
        starts.append(total_frames - frames)
    return starts


def to_windows(batch: np.ndarray, frames: int) -> np.ndarray:
    """(clips, mels, T, 1) → (clips × windows, mels, frames, 1), clip-major; a short clip is zero-padded."""
    total = batch.shape[2]
    if total < frames:
        batch = np.pad(batch, ((0, 0), (0, 0), (0, frames - total), (0, 0)))
        total = frames
    starts = window_starts(total, frames)
    return np.stack([batch[:, :, start : start + frames] for start in starts], axis=1).reshape(
        (-1, batch.shape[1], frames, batch.shape[3])
    )


def clip_outputs(
    predict: Callable[[np.ndarray], list[np.ndarray]],
    inputs: np.ndarray,
    frames: int,
    rows: np.ndarray | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Clip-level outputs: the mean over each clip's windows (`to_windows`: a model's input is shorter than
    the clips) of what `predict` (windows → a list of arrays, (windows, width) of one model or (members,
    windows, width) of an ensemble) gives for them, as (..., clips, width). `inputs` (clips, mels, T, 1) are
    read in chunks (a memmap), the clips `rows` (default all), each chunk through `transform` (the run's
    `Normalizer`) if given."""
    rows = np.arange(len(inputs)) if rows is None else rows
    chunks = []
    for start in range(0, len(rows), CLIP_CHUNK):
        batch = np.asarray(inputs[rows[start : start + CLIP_CHUNK]], dtype=np.float32)
        windows = to_windows(transform(batch) if transform is not None else batch, frames)
        per_window = len(windows) // len(batch)
        chunks.append(
            [
                out.reshape(*out.shape[:-2], len(batch), per_window, out.shape[-1]).mean(axis=-2)
                for out in predict(windows)
            ]
        )
    return [np.concatenate(parts, axis=-2) for parts in zip(*chunks, strict=True)]


def score_members(
    member_predictions: np.ndarray, targets: np.ndarray, metric: Callable, name: str | None = None
) -> dict:
    """Scores of each member and of the plain average of the first k members, for every k.

    Args:
        member_predictions: (members, rows, classes) probabilities.
        targets: what `metric` compares them with.
        metric: `metric(targets, predictions) -> float`, e.g. `metrics.kl_divergence`.
        name: the metric's name in scores.json, e.g. "kl": the keys become "member_kl" and
            "ensemble_kl_by_size".

    Returns:
        {"member": [score per member], "ensemble_by_size": {"k": score of the first k averaged}}, those
        keys named after `name` when it is given.
    """
    member_predictions = np.asarray(member_predictions)
    member = [metric(targets, predictions) for predictions in member_predictions]
    by_size = {
        str(size): metric(targets, member_predictions[:size].mean(axis=0))
        for size in range(1, len(member_predictions) + 1)
    }
    if name is None:
        return {"member": member, "ensemble_by_size": by_size}
    return {f"member_{name}": member, f"ensemble_{name}_by_size": by_size}
