"""DCASE's members: their training data, schedule and selection, their export to built-in layers, and their
clip-level outputs and anomaly scores (the mean over each clip's windows)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replicate import features as feature_lib
from replicate import files
from replicate.dcase import scoring
from replicate.dcase.data import Clip

PREDICT_BATCH = 256  # windows per predict step
CLIP_CHUNK = 128  # clips normalised and predicted at a time (a memmap is read in chunks)


@dataclass
class Arrays:
    """Features of one run (cached mel power), its normaliser and the models' input frames."""

    train_power: np.ndarray
    dev_power: np.ndarray
    eval_power: np.ndarray | None
    normalizer: feature_lib.Normalizer
    frames: int


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
    """Clip-level outputs: the mean over each clip's windows of what `predict` (windows → a list of arrays,
    (windows, width) of one model or (members, windows, width) of an ensemble) gives for them, as (..., clips,
    width). `inputs` (clips, mels, T, 1) are read in chunks (a memmap), the clips `rows` (default all), each
    chunk through `transform` (the run's `Normalizer`) if given."""
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
        logits = keras.ops.convert_to_numpy(self.classifier(outputs))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return [shifted / shifted.sum(axis=1, keepdims=True)]


def dev_score_callback(clips, labels, class_indices, power, normalizer, frames, max_fpr, every):
    """`BestEpoch` on the development test set: softmax scores, Σ over types of (AUC + pAUC) decides."""
    from replicate import train

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
        train_table["learning_rate"] = WarmupCosineRestarts(
            train_table["learning_rate"],
            steps_per_epoch,
            first_cycle_epochs=train_table["first_cycle_epochs"],
            cycle_mult=train_table["cycle_mult"],
            warmup_epochs=train_table["warmup_epochs"],
            min_lr=train_table["min_lr"],
        )
    train_table["loss_options"] = {**train_table.get("loss_options", {}), "from_logits": margin}
    return {**recipe, "train": train_table}


def export_members(group_dir: Path, log: Callable[[str], None] = print) -> None:
    """Make every member of a group a built-in-only inference model (idempotent, crash-safe).

    `train_member` saves the trained model (margin layer, labels input) as `members/seed-XX.keras`; it is
    kept as `training/seed-XX.keras` (resume, inspection, fine-tuning; loads with the package imported) and
    the member becomes `models.dcase.inference_model` of it. The manifest entry records `exported`.
    """
    import keras

    from models.dcase import inference_model
    from replicate import train

    manifest_path = group_dir / "manifest.json"
    manifest = files.read_json(manifest_path)
    for entry in manifest["members"]:
        if entry.get("exported"):
            continue
        member_path = group_dir / entry["file"]
        training_path = group_dir / "training" / member_path.name
        if not training_path.is_file():
            with files.atomic_path(training_path, suffix=".keras") as temporary:
                os.replace(member_path, temporary)  # the member file is the trained model at this point
        model = keras.models.load_model(training_path, safe_mode=True)
        with files.atomic_path(member_path, suffix=".keras") as temporary:
            inference_model(model).save(temporary)
        entry.update(exported=True, training_file=str(training_path.relative_to(group_dir)))
        train.update_member(group_dir, entry)  # the member's record follows its new file
        files.write_json(manifest_path, manifest)
        log(f"member {member_path.name}: exported (built-in layers only)")
