"""DCASE's members: their training data, schedule and selection, their export to built-in layers, and their
clip-level outputs and anomaly scores (the mean over each clip's windows)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import special

from replicate import features as feature_lib
from replicate.dcase import scoring
from replicate.dcase.data import Clip

PREDICT_BATCH = 256  # windows per predict step


@dataclass
class Arrays:
    """Features of one run (cached mel power), its normaliser and the models' input frames."""

    train_power: np.ndarray
    dev_power: np.ndarray
    eval_power: np.ndarray | None
    normalizer: feature_lib.Normalizer
    frames: int


def ensemble_outputs(ensemble, names: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """windows → every member's outputs of these names (`Ensemble.predict_members`), for `clip_outputs`."""
    return lambda windows: [ensemble.predict_members(windows, PREDICT_BATCH, output=name) for name in names]


def rows_of(clips: Sequence[Clip], class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of the clips of these classes, each one's index in `class_names`)."""
    index_of = {name: index for index, name in enumerate(class_names)}
    rows = np.array([i for i, clip in enumerate(clips) if clip.class_name in index_of], dtype=np.int64)
    return rows, np.array([index_of[clips[i].class_name] for i in rows], dtype=np.int64)


def ensemble_scores(
    ensemble,
    clips: Sequence[Clip],
    class_names: Sequence[str],
    inputs: np.ndarray,
    frames: int,
    references: Mapping[str, Sequence[dict]],
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """Each member's anomaly scores of the clips of a group's machine IDs (`class_names`, the group's classes)
    by every method of `references` (method → one `scoring.fit_reference` per member), each clip against its
    own ID: (their rows in `clips` and `inputs`, {method: (members, rows) scores}, the members' clip
    embeddings or None); no clip of these IDs: nothing is predicted."""
    from replicate.ensemble import clip_outputs

    rows, class_indices = rows_of(clips, class_names)
    if not len(rows):
        return rows, {}, None
    names = ["probabilities"] * ("softmax" in references) + ["embedding"] * bool(set(references) - {"softmax"})
    arrays = clip_outputs(ensemble_outputs(ensemble, names), inputs, frames, rows, transform)
    outputs = dict(zip(names, arrays, strict=True))
    scores = {}
    for method, by_member in references.items():
        if method == "softmax":
            scores[method] = np.stack([scoring.softmax_scores(p, class_indices) for p in outputs["probabilities"]])
        else:
            scores[method] = np.stack(
                [
                    scoring.reference_scores(method, reference, embeddings, class_indices)
                    for reference, embeddings in zip(by_member, outputs["embedding"], strict=True)
                ]
            )
    return rows, scores, outputs.get("embedding")


class LiveProbabilities:
    """Class probabilities of a model being trained, from its current weights: a margin model's are the
    softmax of its plain cosine logits (the margin needs the labels, which scoring does not have)."""

    def __init__(self, model):
        import keras

        self.margin = any(layer.name == "labels" for layer in model.layers)
        output = model.get_layer("embedding" if self.margin else "probabilities").output
        self.network = keras.Model(model.get_layer("log_mel").output, output)
        self.classifier = model.get_layer("classifier") if self.margin else None

    def __call__(self, inputs: np.ndarray) -> list[np.ndarray]:
        import keras

        outputs = self.network.predict(inputs, batch_size=PREDICT_BATCH, verbose=0)
        if not self.margin:
            return [outputs]
        return [special.softmax(keras.ops.convert_to_numpy(self.classifier(outputs)), axis=1)]


def dev_score_callback(clips, labels, class_indices, power, normalizer, frames, max_fpr, every):
    """`BestEpoch` on the development test set: softmax scores, Σ over types of (AUC + pAUC) decides."""
    from replicate import train
    from replicate.ensemble import clip_outputs

    def score(model):
        [probabilities] = clip_outputs(LiveProbabilities(model), power, frames, transform=normalizer)
        result = scoring.evaluate_scores(clips, labels, scoring.softmax_scores(probabilities, class_indices), max_fpr)
        total = sum(value["auc"] + value["pauc"] for value in result["types"].values())
        return {"dev_auc": result["mean_auc"], "dev_pauc": result["mean_pauc"], "dev_score": total}

    return train.BestEpoch(score, monitor="dev_score", every=every, keys=("dev_auc", "dev_pauc", "dev_score"))


def training_dataset(
    arrays: Arrays,
    rows: np.ndarray,
    class_indices: np.ndarray,
    num_classes: int,
    *,
    batch_size: int,
    mixup_alpha: float,
    margin: bool,
    seed: int,
    epoch=0,
):
    """One epoch (`epoch`, int or scalar tensor) of shuffled batches of (log-mel crop, one-hot ID) with
    mixup; ((x, y), y) for a margin model. The order, crops and mixing are drawn from (seed, epoch)."""
    from replicate import pipeline

    targets = np.zeros((len(arrays.train_power), num_classes), dtype=np.float32)  # indexed by row, like features
    targets[rows, class_indices] = 1.0
    dataset = pipeline.from_arrays(
        arrays.train_power,
        targets,
        batch_size=batch_size,
        indices=rows,
        transform=arrays.normalizer,
        shuffle=True,
        seed=seed,
        epoch=epoch,
    )
    if arrays.frames != arrays.train_power.shape[2]:
        dataset = pipeline.random_crop_or_pad(dataset, arrays.frames, axis=2, seed=seed, epoch=epoch)
    if mixup_alpha > 0:
        dataset = pipeline.mixup(dataset, mixup_alpha, seed=seed, epoch=epoch)
    if margin:  # the margin layer needs the (mixed) labels as its second input
        dataset = dataset.map(lambda x, y: ((x, y), y), num_parallel_calls=pipeline.AUTOTUNE)
    return dataset


def train_recipe_for(recipe: dict, steps_per_epoch: int, *, finetune: bool, margin: bool) -> dict:
    """The recipe `train.train_member` compiles: the schedule object as learning rate, logits for margins."""
    from replicate.layers import WarmupCosineRestarts

    train_table = dict(recipe["train"])
    if finetune:
        train_table.update(epochs=recipe["finetune"]["epochs"], learning_rate=recipe["finetune"]["learning_rate"])
    else:
        schedule = {key: train_table[key] for key in ("first_cycle_epochs", "cycle_mult", "warmup_epochs", "min_lr")}
        train_table["learning_rate"] = WarmupCosineRestarts(train_table["learning_rate"], steps_per_epoch, **schedule)
    train_table["loss_options"] = {**train_table.get("loss_options", {}), "from_logits": margin}
    return {**recipe, "train": train_table}


def export_members(group_dir: Path, log: Callable[[str], None] = print) -> None:
    """Make every member of a group a built-in-only inference model (`models.dcase.inference_model`); the
    trained model (margin layer, labels input) stays as `training/seed-XX.keras`, which loads with the
    package imported (`train.export_members`)."""
    from models.dcase import inference_model
    from replicate import train

    train.export_members(group_dir, inference_model, "built-in layers only", log)
