"""A trained seed ensemble: its manifest and members, loadable anywhere for prediction.

>>> from replicate.ensemble import Ensemble
>>> ensemble = Ensemble.load("runs/dacon/quick-1a2b3c4d5e6f")
>>> probabilities = ensemble.predict_files(["clip.wav"])   # (1, 30), rows sum to 1
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from replicate import files, task, train
from replicate.train import MANIFEST


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
        manifest: the run's manifest (task, features, normalisation, class names, members).
        members: the loaded `keras.Model`s, in manifest order.
    """

    def __init__(self, run_dir: Path, manifest: dict, members: Sequence[keras.Model]):
        if not members:
            raise ValueError(f"{run_dir}: the ensemble has no members")
        self.run_dir = run_dir
        self.manifest = manifest
        self.members = list(members)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, size: int | None = None) -> Ensemble:
        """Load the manifest and the first `size` members (all by default), in safe mode, each checked
        against the SHA-256 in its record (`members/seed-XX.json` beside it) where it has one.

        Raises:
            task.RunFolderError: a member's file differs from its record.
        """
        run_dir = Path(run_dir)
        manifest_path = run_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; is {run_dir} a finished run folder?")
        manifest = files.read_json(manifest_path)
        entries = manifest["members"][:size]
        missing = [entry["file"] for entry in entries if not (run_dir / entry["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{run_dir}: member files listed in the manifest are missing: {missing}")
        for entry in entries:
            record_path = (run_dir / entry["file"]).with_suffix(".json")
            recorded = files.read_json(record_path).get("sha256") if record_path.is_file() else None
            if recorded is not None:
                problem = train.damaged_member(run_dir, entry["file"], recorded)
                if problem:
                    raise task.RunFolderError(f"{run_dir}: {problem}; run the recipe again to train it again")
        members = [keras.models.load_model(run_dir / entry["file"], safe_mode=True) for entry in entries]
        return cls(run_dir, manifest, members)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def seeds(self) -> list[int]:
        return [entry["seed"] for entry in self.manifest["members"][: len(self.members)]]

    def predict_members(self, inputs, batch_size: int = 256) -> np.ndarray:
        """Each member's probabilities: (members, rows, classes).

        Raises:
            PredictionError: a member predicts a NaN or infinite value (its seed is named).
        """
        outputs = np.stack([member.predict(inputs, batch_size=batch_size, verbose=0) for member in self.members])
        check_finite(outputs, self.seeds, str(self.run_dir))
        return outputs

    def predict(self, inputs, batch_size: int = 256) -> np.ndarray:
        """The ensemble's probabilities: the plain mean of the members' (as every source averaged)."""
        return self.predict_members(inputs, batch_size).mean(axis=0)

    def features(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Model inputs for audio files, computed exactly as in training (the task module's rule)."""
        task = importlib.import_module(f"replicate.{self.manifest['task']}")
        return task.inference_features(paths, self.manifest)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 256) -> np.ndarray:
        """The ensemble's probabilities for audio files: (files, classes)."""
        return self.predict(self.features(paths), batch_size)

    def evaluate(self, inputs, targets: np.ndarray, metric: Callable, batch_size: int = 256) -> dict:
        """Score every member and the ensembles of the first k members with `metric(targets, predictions)`."""
        return score_members(self.predict_members(inputs, batch_size), targets, metric)


def score_members(member_predictions: np.ndarray, targets: np.ndarray, metric: Callable) -> dict:
    """Scores of each member and of the plain average of the first k members, for every k.

    Args:
        member_predictions: (members, rows, classes) probabilities.
        targets: what `metric` compares them with.
        metric: `metric(targets, predictions) -> float`, e.g. `metrics.kl_divergence`.

    Returns:
        {"member": [score per member], "ensemble_by_size": {"k": score of the first k averaged}}.
    """
    member_predictions = np.asarray(member_predictions)
    return {
        "member": [metric(targets, predictions) for predictions in member_predictions],
        "ensemble_by_size": {
            str(size): metric(targets, member_predictions[:size].mean(axis=0))
            for size in range(1, len(member_predictions) + 1)
        },
    }
