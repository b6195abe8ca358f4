"""DCASE 2020 Task 2 (anomalous machine sounds) by machine-ID classification: data, training, scores, report.

    python -m replicate.dcase --data /path/to/dcase2020                 # integrated ArcFace model, source recipe
    python -m replicate.dcase --data ... --set model.head=cosface       # or model.head=softmax (bottleneck CE)
    python -m replicate.dcase --data ... --set setup=per_machine        # six individual models
    python -m replicate.dcase --data ... --set setup=finetune           # integrated + per-machine classifier
    python -m replicate.dcase --data data/synth/dcase --profile quick   # the synthetic demo

Stages, each skipping work already done: read and check the layout → log-mel features (cached) →
normalisation statistics → the set-up's seed ensembles (resumable; best epoch by dev AUC + pAUC every
2 epochs) → built-in-only members → anomaly scores (softmax, centroid, GMM, LOF) → the official CSVs
(`anomaly_score_<type>_id_<ID>.csv`, `result.csv`) → `scores.json` and `report.md`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from replicate import features as feature_lib
from replicate import files, metrics, report, runner, task, train
from replicate import recipe as recipe_lib
from replicate.task import DataError

SETUPS = ("integrated", "per_machine", "finetune")
HEADS = ("arcface", "cosface", "softmax")
SCORE_METHODS = ("softmax", "centroid", "gmm", "lof")
# File names of the official layout, matched on the file name only (a directory may look like an ID).
LABELLED_NAME = re.compile(r"^(normal|anomaly)_id_(\d+)_(\d+)\.wav$")
EVAL_TEST_NAME = re.compile(r"^id_(\d+)_(\d+)\.wav$")

RULES: dict[str, recipe_lib.Rule] = {
    "data.sample_rate": recipe_lib.positive,
    "data.clip_samples": recipe_lib.positive,
    "features.n_fft": recipe_lib.positive,
    "features.hop_length": recipe_lib.positive,
    "features.n_mels": recipe_lib.positive,
    "features.pad_mode": recipe_lib.one_of(*feature_lib.PAD_MODES),
    "features.mel_scale": recipe_lib.one_of(*feature_lib.MEL_SCALES),
    "features.mel_norm": recipe_lib.one_of(*feature_lib.MEL_NORMS),
    "features.input_frames": recipe_lib.non_negative,
    "features.top_db": recipe_lib.positive,
    "features.db_reference": recipe_lib.one_of("global", "per_clip"),
    "model.head": recipe_lib.one_of(*HEADS),
    "model.scale": recipe_lib.positive,
    "model.margin": recipe_lib.non_negative,
    "model.embedding_dim": recipe_lib.positive,
    "model.dropout": recipe_lib.fraction,
    "model.blocks": recipe_lib.positive,
    "model.width": recipe_lib.positive,
    "train.setup": recipe_lib.one_of(*SETUPS),
    "train.epochs": recipe_lib.positive,
    "train.batch_size": recipe_lib.positive,
    "train.learning_rate": recipe_lib.positive,
    "train.optimizer": recipe_lib.one_of("Adam", "AdamW", "SGD", "Nadam", "RMSprop"),
    "train.loss": recipe_lib.one_of("CategoricalCrossentropy", "CategoricalFocalCrossentropy"),
    "train.warmup_epochs": recipe_lib.non_negative,
    "train.first_cycle_epochs": recipe_lib.positive,
    "train.cycle_mult": recipe_lib.positive,
    "train.min_lr": recipe_lib.non_negative,
    "train.mixup_alpha": recipe_lib.non_negative,
    "train.score_every": recipe_lib.positive,
    "finetune.epochs": recipe_lib.positive,
    "finetune.learning_rate": recipe_lib.positive,
    "finetune.mixup_alpha": recipe_lib.non_negative,
    "score.method": recipe_lib.one_of(*SCORE_METHODS),
    "score.gmm_components": recipe_lib.positive,
    "score.lof_neighbors": recipe_lib.positive,
    "score.max_fpr": lambda value: None if 0 < value <= 1 else "must be in (0, 1]",
    "ensemble.seeds": recipe_lib.positive,
    "ensemble.first_seed": recipe_lib.non_negative,
    "run.workers": recipe_lib.non_negative,
}


def load_recipe(profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
    """The DCASE recipe with a profile and overrides, validated. `setup=X` is short for `train.setup=X`."""
    overrides = [f"train.{item}" if item.split("=", 1)[0].strip() == "setup" else item for item in overrides]
    recipe = recipe_lib.load_recipe(path or "dcase", profile, overrides, RULES, task="dcase")
    train = recipe["train"]
    if len(recipe["model"]["blocks"]) != 4:
        raise recipe_lib.RecipeError(f"model.blocks = {recipe['model']['blocks']}: must be four unit counts")
    if train["warmup_epochs"] >= train["first_cycle_epochs"]:
        raise recipe_lib.RecipeError(
            f"train.warmup_epochs = {train['warmup_epochs']} must be shorter than "
            f"train.first_cycle_epochs = {train['first_cycle_epochs']}"
        )
    return recipe


# --- the official layout -------------------------------------------------------------------------


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
        return f"{self.machine_type}/id_{self.machine_id}"


@dataclass
class DcaseData:
    """A data folder: training clips of every ID, labelled dev test clips, unlabelled eval test clips."""

    root: Path
    machine_types: list[str]
    train: list[Clip]
    dev_test: list[Clip]
    eval_test: list[Clip]
    ignored: list[str] = field(default_factory=list)  # files that are not .wav (listed in the report)

    @property
    def class_names(self) -> list[str]:
        return sorted({clip.class_name for clip in self.train})

    def type_class_names(self, machine_type: str) -> list[str]:
        return [name for name in self.class_names if name.split("/")[0] == machine_type]


def parse_name(path: Path, *, labelled: bool) -> tuple[int | None, str]:
    """(label, machine ID) from a file name alone: `normal_id_00_00000012.wav` → (0, "00").

    Args:
        path: the file; only its name is parsed (directories such as `id_03/` are ignored).
        labelled: the name must carry `normal_`/`anomaly_` (train and dev test); else `id_XX_n.wav` (eval test).

    Raises:
        DataError: the name does not have the official form (a two-digit ID among them).
    """
    name = Path(path).name
    if labelled:
        match = LABELLED_NAME.match(name)
        if not match:
            raise DataError(f"{path}: file name does not parse; expected normal_id_<ID>_<index>.wav or anomaly_id_…")
        label, machine_id = (1 if match.group(1) == "anomaly" else 0), match.group(2)
    else:
        match = EVAL_TEST_NAME.match(name)
        if not match:
            raise DataError(f"{path}: file name does not parse; evaluation test files are named id_<ID>_<index>.wav")
        label, machine_id = None, match.group(1)
    if len(machine_id) != 2:  # "id_0" beside "id_00" would be two IDs of one machine
        raise DataError(f"{path}: machine ID {machine_id!r} must have two digits, as in the official layout (id_00)")
    return label, machine_id


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


def load_data(root: str | os.PathLike) -> DcaseData:
    """Read and check a DCASE 2020 Task 2 folder: dev_data/<type>/{train,test}/ and, if present,
    eval_data/<type>/{train,test}/ (plus `eval_ground_truth.csv`, which only synthetic data have)."""
    root = Path(root)
    dev_root = root / "dev_data"
    if not dev_root.is_dir():
        raise DataError(f"{dev_root}: folder not found (expected dev_data/<machine_type>/train and test)")
    machine_types = sorted(path.name for path in dev_root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not machine_types:
        raise DataError(f"{dev_root}: no machine-type folders")
    train, dev_test, eval_test, ignored = [], [], [], []
    for machine_type in machine_types:
        type_train = _clips_in(dev_root / machine_type / "train", machine_type, "dev", "train", ignored)
        type_train += _clips_in(root / "eval_data" / machine_type / "train", machine_type, "eval", "train", ignored)
        if not type_train:
            raise DataError(f"{dev_root / machine_type / 'train'}: machine type {machine_type!r} has no training files")
        type_dev_test = _clips_in(dev_root / machine_type / "test", machine_type, "dev", "test", ignored)
        type_eval_test = _clips_in(root / "eval_data" / machine_type / "test", machine_type, "eval", "test", ignored)
        trained_ids = {clip.machine_id for clip in type_train}
        for clip in type_dev_test + type_eval_test:
            if clip.machine_id not in trained_ids:
                raise DataError(
                    f"{clip.path}: machine ID {clip.machine_id} of {machine_type} has no training files "
                    f"(training IDs: {task.listing(sorted(trained_ids))})"
                )
        for machine_id in sorted({clip.machine_id for clip in type_dev_test}):
            labels = {clip.label for clip in type_dev_test if clip.machine_id == machine_id}
            if labels != {0, 1}:
                raise DataError(
                    f"{dev_root / machine_type / 'test'}: ID {machine_id} needs normal_ and anomaly_ test files for AUC"
                )
        train += type_train
        dev_test += type_dev_test
        eval_test += type_eval_test
    eval_types = {path.name for path in (root / "eval_data").iterdir()} if (root / "eval_data").is_dir() else set()
    unknown = sorted(name for name in eval_types - set(machine_types) if not name.startswith("."))
    if unknown:
        raise DataError(f"{root / 'eval_data'}: machine types {task.listing(unknown)} are not in dev_data")
    return DcaseData(root, machine_types, train, dev_test, eval_test, ignored)


def read_ground_truth(root: Path, eval_test: Sequence[Clip]) -> np.ndarray | None:
    """Labels of the evaluation test clips from `eval_ground_truth.csv` (machine_type,file,label), or None."""
    path = root / "eval_ground_truth.csv"
    if not path.is_file() or not eval_test:
        return None
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"machine_type": str, "file": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    if list(table.columns) != ["machine_type", "file", "label"]:
        raise DataError(f"{path}: columns must be machine_type,file,label; found {list(table.columns)}")
    bad = table.index[~table["label"].isin([0, 1])].tolist()
    if bad:
        raise DataError(f"{path}: labels must be 0 or 1 (rows {task.listing([row + 2 for row in bad])})")
    repeated = table[table.duplicated(["machine_type", "file"], keep=False)]
    if len(repeated):
        rows = [
            f"{machine_type}/{name} on lines {', '.join(str(row + 2) for row in group.index)} "
            f"(labels {', '.join(map(str, group['label']))})"
            for (machine_type, name), group in repeated.groupby(["machine_type", "file"], sort=False)
        ]
        raise DataError(f"{path}: more than one row for {task.listing(rows)}; one label per file")
    labels = {(row.machine_type, row.file): int(row.label) for row in table.itertuples()}
    missing = [
        f"{clip.machine_type}/{clip.path.name}"
        for clip in eval_test
        if (clip.machine_type, clip.path.name) not in labels
    ]
    if missing:
        raise DataError(f"{path}: no row for {len(missing)} evaluation test files: {task.listing(missing)}")
    return np.array([labels[(clip.machine_type, clip.path.name)] for clip in eval_test])


# --- features ------------------------------------------------------------------------------------


def audio_spec(recipe: dict) -> feature_lib.AudioSpec:
    data = recipe["data"]
    return feature_lib.AudioSpec(data["sample_rate"], data["clip_samples"], data["resample"], data["fix_length"])


# What runs made before the recipe had `features.pad_mode`, `mel_scale` and `mel_norm` computed (librosa's).
LIBROSA_DEFINITION = {"pad_mode": "constant", "mel_scale": "slaney", "mel_norm": "slaney"}


def mel_resolution(features: dict) -> feature_lib.MelResolution:
    """The recipe's `[features]` as a `MelResolution` (the window is n_fft long, as torchaudio's default)."""
    return feature_lib.MelResolution(
        features["n_fft"],
        features["n_fft"],
        features["hop_length"],
        features["n_mels"],
        pad_mode=features["pad_mode"],
        mel_scale=features["mel_scale"],
        mel_norm=features["mel_norm"],
    )


def _extractor(recipe: dict) -> Callable:
    return feature_lib.mel_power_extractor(recipe["data"]["sample_rate"], [mel_resolution(recipe["features"])])


def mel_power_cached(clips: Sequence[Clip], recipe: dict, name: str, progress: bool = True):
    """Cached (clips, n_mels, frames, 1) mel power of `clips` and the cache's metadata."""
    params = {
        "kind": "mel_power",
        "sample_rate": recipe["data"]["sample_rate"],
        **asdict(mel_resolution(recipe["features"])),  # every field: a cache of another definition is not reused
    }
    return feature_lib.cached_features(
        [clip.path for clip in clips],
        audio=audio_spec(recipe),
        extractor=_extractor(recipe),
        params=params,
        cache_dir=recipe["run"]["cache_dir"],
        name=name,
        workers=recipe["run"]["workers"] or None,
        progress=progress,
    )


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


def inference_features(paths: Sequence[str | os.PathLike], manifest: dict) -> np.ndarray:
    """Normalised log-mel inputs for new audio files (whole clips), with the training run's definition and
    statistics (a manifest without the mel definition keys comes from a run that computed librosa's)."""
    recipe = {"data": manifest["recipe"]["data"], "features": {**LIBROSA_DEFINITION, **manifest["recipe"]["features"]}}
    power = feature_lib.extract_features(
        paths, audio=feature_lib.AudioSpec(**manifest["audio"]), extractor=_extractor(recipe)
    )
    return feature_lib.Normalizer.from_config(manifest["normalization"])(power)


# --- models, training ----------------------------------------------------------------------------


def build_model(recipe: dict, input_shape: tuple[int, int, int], num_classes: int):
    """The recipe's training model: IR-ResNet-50 + margin classifier, or the bottleneck ResNet-50 softmax."""
    from models import dcase as dcase_models

    model = recipe["model"]
    if model["head"] == "softmax":
        return dcase_models.build_resnet50_softmax(input_shape, num_classes, model["blocks"], model["width"])
    return dcase_models.build_ir_resnet50_margin(
        input_shape,
        num_classes,
        margin_type=model["head"],
        scale=model["scale"],
        margin=model["margin"],
        embedding_dim=model["embedding_dim"],
        dropout=model["dropout"],
        blocks=model["blocks"],
        width=model["width"],
    )


def is_margin_model(model) -> bool:
    return any(layer.name == "labels" for layer in model.layers)


class LiveOutputs:
    """Class probabilities and embeddings of a model being trained (its current weights, no labels input)."""

    def __init__(self, model):
        import keras

        self.model = model
        inputs = model.get_layer("log_mel").output
        embedding = model.get_layer("embedding").output
        self.margin = is_margin_model(model)
        outputs = [embedding] if self.margin else [model.get_layer("probabilities").output, embedding]
        self.network = keras.Model(inputs, outputs)

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import keras

        outputs = self.network.predict(inputs, batch_size=256, verbose=0)
        if not self.margin:
            return outputs[0], outputs[1]
        embedding = outputs[0] if isinstance(outputs, list) else outputs
        classifier = self.model.get_layer("classifier")
        logits = keras.ops.convert_to_numpy(classifier(embedding))
        return _softmax(logits), embedding


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def clip_outputs(predict: Callable, power: np.ndarray, normalizer, frames: int, chunk: int = 128):
    """Clip-level probabilities and embeddings: the mean over each clip's windows.

    Args:
        predict: inputs → (probabilities, embeddings), e.g. `LiveOutputs` or `member_predictor`.
        power: (clips, mels, T, 1) mel power (a memmap is read in chunks).
        normalizer: the run's `Normalizer`.
        frames: the model's input frames.
    """
    probabilities, embeddings = [], []
    for start in range(0, len(power), chunk):
        batch = normalizer(np.asarray(power[start : start + chunk], dtype=np.float32))
        windows = to_windows(batch, frames)
        per_window = len(windows) // len(batch)
        window_probabilities, window_embeddings = predict(windows)
        probabilities.append(window_probabilities.reshape(len(batch), per_window, -1).mean(axis=1))
        embeddings.append(window_embeddings.reshape(len(batch), per_window, -1).mean(axis=1))
    return np.concatenate(probabilities), np.concatenate(embeddings)


def member_predictor(member) -> Callable:
    """A saved member (outputs {"probabilities", "embedding"}) as inputs → (probabilities, embeddings)."""

    def predict(inputs):
        outputs = member.predict(inputs, batch_size=256, verbose=0)
        return outputs["probabilities"], outputs["embedding"]

    return predict


def softmax_scores(probabilities: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """The source's anomaly score: 1 − the probability of the clip's own machine ID."""
    return 1.0 - probabilities[np.arange(len(class_indices)), class_indices]


def embedding_scores(
    method: str,
    train_embeddings: np.ndarray,
    train_ids: np.ndarray,
    test_embeddings: np.ndarray,
    test_ids: np.ndarray,
    score_recipe: dict,
    seed: int = 0,
) -> np.ndarray:
    """Anomaly scores from embeddings, one model of the normal training embeddings per machine ID.

    Args:
        method: "centroid" (cosine distance to the ID's mean unit embedding), "gmm" (negative
            log-likelihood under a diagonal GaussianMixture), "lof" (LocalOutlierFactor novelty score).
        train_embeddings, train_ids: normal training clips' embeddings and their class indices.
        test_embeddings, test_ids: the clips to score.
        score_recipe: the recipe's `score` table (gmm_components, lof_neighbors).
    """
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import LocalOutlierFactor

    scores = np.zeros(len(test_ids))
    for class_index in np.unique(test_ids):
        reference = train_embeddings[train_ids == class_index]
        rows = test_ids == class_index
        if method == "centroid":
            unit = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
            centroid = unit.mean(axis=0)
            centroid /= max(np.linalg.norm(centroid), 1e-12)
            test = test_embeddings[rows] / np.maximum(
                np.linalg.norm(test_embeddings[rows], axis=1, keepdims=True), 1e-12
            )
            scores[rows] = 1.0 - test @ centroid
        elif method == "gmm":
            components = min(score_recipe["gmm_components"], len(reference))
            mixture = GaussianMixture(components, covariance_type="diag", reg_covar=1e-4, random_state=seed)
            scores[rows] = -mixture.fit(reference).score_samples(test_embeddings[rows])
        elif method == "lof":
            neighbors = min(score_recipe["lof_neighbors"], len(reference) - 1)
            if neighbors < 1:
                raise DataError(f"LOF needs at least two training clips of class {class_index}")
            lof = LocalOutlierFactor(n_neighbors=neighbors, novelty=True).fit(reference)
            scores[rows] = -lof.score_samples(test_embeddings[rows])
        else:
            raise ValueError(f"unknown score method {method!r}; known: {', '.join(SCORE_METHODS)}")
    return scores


def evaluate_scores(clips: Sequence[Clip], labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> dict:
    """AUC and pAUC per machine ID, the mean per machine type, and the mean and harmonic mean over types."""
    by_type = {}
    for machine_type in sorted({clip.machine_type for clip in clips}):
        ids = {}
        for machine_id in sorted({clip.machine_id for clip in clips if clip.machine_type == machine_type}):
            rows = np.array([clip.machine_type == machine_type and clip.machine_id == machine_id for clip in clips])
            ids[machine_id] = {
                "auc": metrics.auc(labels[rows], scores[rows]),
                "pauc": metrics.partial_auc(labels[rows], scores[rows], max_fpr),
                "clips": int(rows.sum()),
            }
        by_type[machine_type] = {
            "ids": ids,
            "auc": float(np.mean([value["auc"] for value in ids.values()])),
            "pauc": float(np.mean([value["pauc"] for value in ids.values()])),
        }
    aucs = [value["auc"] for value in by_type.values()]
    paucs = [value["pauc"] for value in by_type.values()]
    return {
        "types": by_type,
        "mean_auc": float(np.mean(aucs)),
        "mean_pauc": float(np.mean(paucs)),
        "hmean_auc": metrics.harmonic_mean(np.maximum(aucs, 1e-9)),
        "hmean_pauc": metrics.harmonic_mean(np.maximum(paucs, 1e-9)),
    }


def dev_score_callback(clips, labels, class_indices, power, normalizer, frames, max_fpr, every):
    """`BestEpoch` on the development test set: softmax scores, Σ over types of (AUC + pAUC) decides."""

    def score(model):
        probabilities, _ = clip_outputs(LiveOutputs(model), power, normalizer, frames)
        result = evaluate_scores(clips, labels, softmax_scores(probabilities, class_indices), max_fpr)
        total = sum(value["auc"] + value["pauc"] for value in result["types"].values())
        return {"dev_auc": result["mean_auc"], "dev_pauc": result["mean_pauc"], "dev_score": total}

    return train.BestEpoch(score, monitor="dev_score", every=every, keys=("dev_auc", "dev_pauc", "dev_score"))


@dataclass
class Arrays:
    """Features and labels of one run, built once."""

    train_power: np.ndarray
    dev_power: np.ndarray
    eval_power: np.ndarray | None
    normalizer: feature_lib.Normalizer
    frames: int


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

    train = dict(recipe["train"])
    if finetune:
        train.update(epochs=recipe["finetune"]["epochs"], learning_rate=recipe["finetune"]["learning_rate"])
    else:
        train["learning_rate"] = WarmupCosineRestarts(
            train["learning_rate"],
            steps_per_epoch,
            first_cycle_epochs=train["first_cycle_epochs"],
            cycle_mult=train["cycle_mult"],
            warmup_epochs=train["warmup_epochs"],
            min_lr=train["min_lr"],
        )
    train["loss_options"] = {**train.get("loss_options", {}), "from_logits": margin}
    return {**recipe, "train": train}


def export_members(run_dir: Path, log: Callable[[str], None] = print) -> None:
    """Make every member of a sub-run a built-in-only inference model (idempotent, crash-safe).

    `train_member` saves the trained model (margin layer, labels input) as `members/seed-XX.keras`; it is
    kept as `training/seed-XX.keras` (resume, inspection, fine-tuning; loads with the package imported) and
    the member becomes `models.dcase.inference_model` of it. The manifest entry records `exported`.
    """
    import keras

    from models.dcase import inference_model

    manifest_path = run_dir / "manifest.json"
    manifest = files.read_json(manifest_path)
    for entry in manifest["members"]:
        if entry.get("exported"):
            continue
        member_path = run_dir / entry["file"]
        training_path = run_dir / "training" / member_path.name
        if not training_path.is_file():
            with files.atomic_path(training_path, suffix=".keras") as temporary:
                os.replace(member_path, temporary)  # the member file is the trained model at this point
        model = keras.models.load_model(training_path, safe_mode=True)
        with files.atomic_path(member_path, suffix=".keras") as temporary:
            inference_model(model).save(temporary)
        entry.update(exported=True, training_file=str(training_path.relative_to(run_dir)))
        train.update_member(run_dir, entry)  # the member's record follows its new file
        files.write_json(manifest_path, manifest)
        log(f"member {member_path.name}: exported (built-in layers only)")


# --- the run -------------------------------------------------------------------------------------


def run(
    recipe: dict,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the whole recipe on a data folder; returns the run folder (report.md, dev/ and eval/ CSVs).
    `retrain`: train again the members trained from another set-up (`train.train_ensemble`)."""

    data_root = Path(data_root)
    data = load_data(data_root)
    ground_truth = read_ground_truth(data_root, data.eval_test)
    run_dir = runner.open_run_dir(recipe, data_root, run_dir)
    log(f"run folder: {run_dir}")
    log(
        f"data: {len(data.machine_types)} machine types, {len(data.class_names)} IDs, {len(data.train)} training, "
        f"{len(data.dev_test)} development test, {len(data.eval_test)} evaluation test clips"
    )

    started = time.perf_counter()
    train_power, train_meta = mel_power_cached(data.train, recipe, "dcase-train", progress)
    dev_power, dev_meta = mel_power_cached(data.dev_test, recipe, "dcase-dev-test", progress)
    eval_power, eval_meta = (
        mel_power_cached(data.eval_test, recipe, "dcase-eval-test", progress) if data.eval_test else (None, None)
    )
    feature_seconds = time.perf_counter() - started
    normalizer = feature_lib.Normalizer.fit(
        [train_power],
        recipe["features"]["db_reference"],
        recipe["features"]["top_db"],
        name=f"the training clips of {data_root} (<dataset>/<machine type>/train/)",
    )
    total_frames = train_power.shape[2]
    frames = recipe["features"]["input_frames"] or total_frames
    arrays = Arrays(train_power, dev_power, eval_power, normalizer, frames)
    input_shape = (train_power.shape[1], frames, 1)

    manifest = {
        "task": "dcase",
        "recipe_name": recipe["name"],
        "setup": recipe["train"]["setup"],
        "class_names": data.class_names,
        "machine_types": data.machine_types,
        "input_shape": list(input_shape),
        "clip_frames": int(total_frames),
        "audio": vars(audio_spec(recipe)),
        "normalization": normalizer.to_config(),
        "recipe": {"data": recipe["data"], "features": recipe["features"]},
        "data": {
            "root": str(data_root.resolve()),
            "train_clips": len(data.train),
            "dev_test_clips": len(data.dev_test),
            "eval_test_clips": len(data.eval_test),
            "eval_ground_truth": ground_truth is not None,
            "ignored_files": data.ignored,
            "audio_changes": {
                "train": train_meta["notes"],
                "dev test": dev_meta["notes"],
                **({"eval test": eval_meta["notes"]} if eval_meta else {}),
            },
        },
        "feature_seconds": round(feature_seconds, 2),
        "feature_peak_memory_mb": train.peak_memory_mb(),
    }
    seeds = recipe_lib.seeds_of(recipe)
    setup = recipe["train"]["setup"]
    members = {
        "trained_from": {
            "features": train_meta["checksums"],
            "dev features": dev_meta["checksums"],  # they choose the best epoch
            "normalization": normalizer.to_config(),
        },
        "retrain": retrain,
    }
    groups: dict[str, list[tuple[str, Path]]] = {}  # model group → [(machine types it scores, sub-run folder)]
    if setup in ("integrated", "finetune"):
        _train_group(recipe, run_dir, data, arrays, data.class_names, None, seeds, manifest, progress, log, **members)
        groups["integrated"] = [("*", run_dir)]
    if setup == "per_machine":
        groups["per_machine"] = []
        for machine_type in data.machine_types:
            sub_dir = run_dir / "per_machine" / machine_type
            _train_group(
                recipe,
                sub_dir,
                data,
                arrays,
                data.type_class_names(machine_type),
                machine_type,
                seeds,
                {**manifest, "machine_type": machine_type},
                progress,
                log,
                **members,
            )
            groups["per_machine"].append((machine_type, sub_dir))
        files.write_json(
            run_dir / "manifest.json",
            {
                **manifest,
                "members": [],
                "environment": train.environment(),
                "groups": {"per_machine": data.machine_types},
            },
        )
    if setup == "finetune":
        groups["finetune"] = []
        for machine_type in data.machine_types:
            sub_dir = run_dir / "finetune" / machine_type
            _train_group(
                recipe,
                sub_dir,
                data,
                arrays,
                data.type_class_names(machine_type),
                machine_type,
                seeds,
                {**manifest, "machine_type": machine_type},
                progress,
                log,
                pretrained=run_dir,
                **members,
            )
            groups["finetune"].append((machine_type, sub_dir))

    scores = evaluate_and_write(run_dir, recipe, data, arrays, groups, ground_truth, log=log)
    write_report(run_dir, recipe, data, arrays, groups, scores)
    log(f"report: {run_dir / 'report.md'}")
    return run_dir


def _train_group(
    recipe,
    group_dir,
    data,
    arrays,
    class_names,
    machine_type,
    seeds,
    manifest,
    progress,
    log,
    pretrained: Path | None = None,
    *,
    trained_from: dict,
    retrain: bool,
):
    """Train (or keep) one seed ensemble over `class_names`, scored on its machine types' dev test clips.
    `trained_from` and `retrain` as for `train.train_ensemble` (this group's rows are added)."""
    import keras

    from models.dcase import finetune_model

    index_of = {name: index for index, name in enumerate(class_names)}
    rows = np.array([i for i, clip in enumerate(data.train) if clip.class_name in index_of], dtype=np.int64)
    class_indices = np.array([index_of[data.train[i].class_name] for i in rows])
    dev_rows = np.array([i for i, clip in enumerate(data.dev_test) if clip.class_name in index_of], dtype=np.int64)
    dev_clips = [data.dev_test[i] for i in dev_rows]
    dev_labels = np.array([clip.label for clip in dev_clips])
    dev_indices = np.array([index_of[clip.class_name] for clip in dev_clips])
    dev_power = arrays.dev_power[dev_rows] if machine_type else arrays.dev_power
    margin = recipe["model"]["head"] != "softmax"
    finetune = pretrained is not None
    batch_size = recipe["train"]["batch_size"]
    steps = max(1, -(-len(rows) // batch_size))
    member_recipe = train_recipe_for(recipe, steps, finetune=finetune, margin=margin)
    mixup_alpha = recipe["finetune" if finetune else "train"]["mixup_alpha"]
    input_shape = (arrays.train_power.shape[1], arrays.frames, 1)
    what = f"{machine_type or 'all types'}{' (fine-tune)' if finetune else ''}"
    log(f"{what}: {len(class_names)} IDs, {len(rows)} training clips, {steps} steps per epoch")

    def build(seed: int):
        if not finetune:
            return build_model(recipe, input_shape, len(class_names))
        integrated = keras.models.load_model(
            pretrained / "training" / f"{train.member_name(seed)}.keras", safe_mode=True
        )
        all_names = files.read_json(pretrained / "manifest.json")["class_names"]
        return finetune_model(integrated, [all_names.index(name) for name in class_names])

    arguments = {
        "run_dir": group_dir,
        "manifest": {**manifest, "class_names": class_names, "finetune_of": str(pretrained) if finetune else None},
        "trained_from": {
            **trained_from,
            "rows": rows,
            "classes": class_indices,
            "dev rows": dev_rows,
            "dev labels": dev_labels,
            "dev classes": dev_indices,
        },
        "retrain": retrain,
        "log": log,
        "train_data": lambda seed, epoch: training_dataset(
            arrays,
            rows,
            class_indices,
            len(class_names),
            batch_size=batch_size,
            mixup_alpha=mixup_alpha,
            margin=margin,
            seed=seed,
            epoch=epoch,
        ),
        "member_callbacks": lambda run_dir, name: [
            dev_score_callback(
                dev_clips,
                dev_labels,
                dev_indices,
                dev_power,
                arrays.normalizer,
                arrays.frames,
                recipe["score"]["max_fpr"],
                recipe["train"]["score_every"],
            )
        ],
        "verbose": "auto" if progress else 0,
    }
    # A fine-tuned member starts from its own seed's integrated model: the builder takes the seed.
    train.train_ensemble(member_recipe, seeds, build_model=build, **arguments)
    export_members(group_dir, log)


# --- scores and the official files ---------------------------------------------------------------


def _group_outputs(recipe, data, arrays, types, sub_dir, log):
    """Every member's clip-level outputs for the clips of `types` ("*" = all): scores by method, embeddings.

    Raises:
        PredictionError: a member's probabilities or embeddings are not finite (its seed is named).
    """
    import keras

    from replicate.ensemble import check_finite

    manifest = files.read_json(sub_dir / "manifest.json")
    class_names = manifest["class_names"]
    index_of = {name: index for index, name in enumerate(class_names)}

    def rows_of(clips):
        return np.array(
            [i for i, clip in enumerate(clips) if types == "*" or clip.machine_type == types], dtype=np.int64
        )

    splits = {"train": (data.train, arrays.train_power), "dev": (data.dev_test, arrays.dev_power)}
    if data.eval_test:
        splits["eval"] = (data.eval_test, arrays.eval_power)
    rows = {split: rows_of(clips) for split, (clips, _) in splits.items()}
    indices = {
        split: np.array([index_of[clips[i].class_name] for i in rows[split]]) for split, (clips, _) in splits.items()
    }
    members = []
    for entry in manifest["members"]:
        member = keras.models.load_model(sub_dir / entry["file"], safe_mode=True)
        outputs = {
            split: clip_outputs(
                member_predictor(member),
                power[rows[split]] if len(rows[split]) else power[:0],
                arrays.normalizer,
                arrays.frames,
            )
            for split, (clips, power) in splits.items()
            if len(rows[split])
        }
        member_outputs = [array for pair in outputs.values() for array in pair]
        check_finite([member_outputs], [entry["seed"]], f"{sub_dir}: the clips' probabilities and embeddings")
        scored = {}
        for split in ("dev", "eval"):
            if split not in outputs:
                continue
            probabilities, embeddings = outputs[split]
            scored[split] = {"softmax": softmax_scores(probabilities, indices[split])}
            for method in SCORE_METHODS[1:]:
                scored[split][method] = embedding_scores(
                    method,
                    outputs["train"][1],
                    indices["train"],
                    embeddings,
                    indices[split],
                    recipe["score"],
                    seed=entry["seed"],
                )
        members.append({"seed": entry["seed"], "scores": scored, "dev_embeddings": outputs["dev"][1]})
        log(f"scored {sub_dir.name if types != '*' else 'integrated'} member seed {entry['seed']}")
    return rows, members


def evaluate_and_write(run_dir, recipe, data, arrays, groups, ground_truth, *, log=print) -> dict:
    """Score every model group, write the official CSVs of the set-up's own group, and scores.json."""
    max_fpr = recipe["score"]["max_fpr"]
    method = recipe["score"]["method"]
    dev_labels = np.array([clip.label for clip in data.dev_test])
    labels = {"dev": dev_labels, **({"eval": ground_truth} if ground_truth is not None else {})}
    split_clips = {"dev": data.dev_test, "eval": data.eval_test}
    result = {"method": method, "setup": recipe["train"]["setup"], "groups": {}}
    saved = {}
    for group, parts in groups.items():
        seeds = None
        # scores[split][method] = (members, clips) array, filled part by part
        scores = {split: {m: None for m in SCORE_METHODS} for split in ("dev", "eval") if split_clips[split]}
        embeddings = {}
        for types, sub_dir in parts:
            rows, members = _group_outputs(recipe, data, arrays, types, sub_dir, log)
            seeds = [member["seed"] for member in members]
            for split in scores:
                for m in SCORE_METHODS:
                    if scores[split][m] is None:
                        scores[split][m] = np.full((len(members), len(split_clips[split])), np.nan)
                    for k, member in enumerate(members):
                        if split in member["scores"]:  # a machine type may have no clips of a split
                            scores[split][m][k, rows[split]] = member["scores"][split][m]
            embeddings[types] = (rows["dev"], members[0]["dev_embeddings"])
        group_result = {"seeds": seeds}
        for split, by_method in scores.items():
            if split not in labels:
                continue
            group_result[split] = {
                m: {
                    "ensemble": evaluate_scores(split_clips[split], labels[split], values.mean(axis=0), max_fpr),
                    "members": [
                        _summary(evaluate_scores(split_clips[split], labels[split], row, max_fpr)) for row in values
                    ],
                }
                for m, values in by_method.items()
            }
        result["groups"][group] = group_result
        saved[group] = {"scores": scores, "embeddings": embeddings}
    final = {"integrated": "integrated", "per_machine": "per_machine", "finetune": "finetune"}[result["setup"]]
    result["final_group"] = final
    for split, by_method in saved[final]["scores"].items():
        ensemble = by_method[method].mean(axis=0)
        write_score_files(run_dir / split, split_clips[split], ensemble)
        if split in labels:
            write_result_csv(run_dir / split / "result.csv", result["groups"][final][split][method]["ensemble"])
    with files.atomic_path(run_dir / "test_scores.npz", suffix=".npz") as temporary:
        np.savez(
            temporary,
            **{
                f"{group}_{split}_{m}": values
                for group, item in saved.items()
                for split, by_method in item["scores"].items()
                for m, values in by_method.items()
            },
            **{
                f"{group}_embeddings_{types}": emb
                for group, item in saved.items()
                for types, (_, emb) in item["embeddings"].items()
            },
            **{
                f"{group}_embedding_rows_{types}": rows
                for group, item in saved.items()
                for types, (rows, _) in item["embeddings"].items()
            },
        )
    result["headline"] = headline(result, recipe)
    files.write_json(run_dir / "scores.json", result)
    log(f"official files: {run_dir / 'dev'}" + (f", {run_dir / 'eval'}" if data.eval_test else ""))
    return result


def headline(scores: dict, recipe: dict) -> str:
    """The run's result in a phrase (the command line's last line), beside the source's number for the same
    set-up and head on the same split."""
    group = scores["groups"][scores["final_group"]]
    split = next((split for split in ("eval", "dev") if split in group), None)
    if split is None:
        return "not scored (no labelled test clips)"
    method = scores["method"]
    result = group[split][method]
    words = {"eval": "evaluation", "dev": "development"}[split]
    text = (
        f"{words} AUC {100 * result['ensemble']['mean_auc']:.2f} / pAUC {100 * result['ensemble']['mean_pauc']:.2f} "
        f"({len(result['members'])}-member average, {method} score"
    )
    same_setup = [entry for entry in recipe["source"]["reported"] if entry["setup"] == scores["setup"]]
    same_head = [entry for entry in same_setup if recipe["model"]["head"] in entry["what"].lower()]
    source = (same_head or same_setup or [None])[0]
    if source is None:
        return text + ")"
    return (
        text
        + f"; source: {source['what']} {source[f'{split}_auc']:.2f} / {source[f'{split}_pauc']:.2f} on the real data)"
    )


def _summary(evaluation: dict) -> dict:
    return {key: evaluation[key] for key in ("mean_auc", "mean_pauc", "hmean_auc", "hmean_pauc")}


def write_score_files(folder: Path, clips: Sequence[Clip], scores: np.ndarray) -> list[Path]:
    """`anomaly_score_<type>_id_<ID>.csv` per machine type and ID: no header, `file name,score` rows."""
    written = []
    for machine_type, machine_id in sorted({(clip.machine_type, clip.machine_id) for clip in clips}):
        lines = [
            f"{clip.path.name},{score:.8f}"
            for clip, score in zip(clips, scores, strict=True)
            if clip.machine_type == machine_type and clip.machine_id == machine_id
        ]
        path = folder / f"anomaly_score_{machine_type}_id_{machine_id}.csv"
        written.append(files.write_text(path, "\n".join(lines) + "\n"))
    return written


def write_result_csv(path: Path, evaluation: dict) -> Path:
    """The official `result.csv`: per machine type its name, `id,AUC,pAUC`, one row per ID, `Average`, blank."""
    lines = []
    for machine_type, values in evaluation["types"].items():
        lines += [machine_type, "id,AUC,pAUC"]
        lines += [f"{machine_id},{item['auc']},{item['pauc']}" for machine_id, item in values["ids"].items()]
        lines += [f"Average,{values['auc']},{values['pauc']}", ""]
    return files.write_text(path, "\n".join(lines) + "\n")


def read_result_csv(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Parse a `result.csv` back: {machine type: {ID or "Average": (AUC, pAUC)}}; a malformed file is an error."""
    result: dict[str, dict[str, tuple[float, float]]] = {}
    current = None
    expect_header = False
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        cells = line.split(",")
        if not line:
            current = None
        elif current is None:
            if len(cells) != 1:
                raise DataError(f"{path}, line {number}: expected a machine type, found {line!r}")
            current, expect_header = cells[0], True
            result[current] = {}
        elif expect_header:
            if cells != ["id", "AUC", "pAUC"]:
                raise DataError(f"{path}, line {number}: expected the header id,AUC,pAUC, found {line!r}")
            expect_header = False
        else:
            if len(cells) != 3:
                raise DataError(f"{path}, line {number}: expected id,AUC,pAUC values, found {line!r}")
            result[current][cells[0]] = (float(cells[1]), float(cells[2]))
    return result


# --- report --------------------------------------------------------------------------------------

GROUP_TITLES = {
    "integrated": "one integrated model",
    "per_machine": "six individual models",
    "finetune": "integrated + per-machine fine-tuned classifier",
}


def results_table(run_dir: str | os.PathLike) -> str:
    """The README's results table: the source's reported numbers beside ours, each labelled."""
    run_dir = Path(run_dir)
    scores = files.read_json(run_dir / "scores.json")
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    rows = []
    baseline = recipe["source"]["baseline_dev"]
    rows.append(
        (
            "source: official baseline (autoencoder)",
            "real data, development",
            f"{np.mean([v[0] for v in baseline.values()]):.2f}",
            f"{np.mean([v[1] for v in baseline.values()]):.2f}",
        )
    )
    for entry in recipe["source"]["reported"]:
        rows.append(
            (
                f"source: {entry['what']}",
                "real data, development",
                f"{entry['dev_auc']:.2f}",
                f"{entry['dev_pauc']:.2f}",
            )
        )
        rows.append(
            (
                f"source: {entry['what']}",
                "real data, evaluation",
                f"{entry['eval_auc']:.2f}",
                f"{entry['eval_pauc']:.2f}",
            )
        )
    head = recipe["model"]["head"]
    shown = [scores["method"]] + (["softmax"] if scores["method"] != "softmax" else [])  # the source's score too
    for group, group_scores in scores["groups"].items():
        for split, method in ((split, method) for split in ("dev", "eval") for method in shown):
            if split not in group_scores:
                continue
            result = group_scores[split][method]
            where = f"our synthetic data, {'development' if split == 'dev' else 'evaluation'} test"
            label = f"ours: {GROUP_TITLES[group]} ({head}, {method} score)"
            members = result["members"]
            rows.append(
                (
                    f"{label}, single member",
                    where,
                    _mean_std_percent([m["mean_auc"] for m in members]),
                    _mean_std_percent([m["mean_pauc"] for m in members]),
                )
            )
            rows.append(
                (
                    f"{label}, {len(members)}-member average",
                    where,
                    f"{100 * result['ensemble']['mean_auc']:.2f}",
                    f"{100 * result['ensemble']['mean_pauc']:.2f}",
                )
            )
    seeds = len(scores["groups"][scores["final_group"]]["seeds"])
    seconds = recipe["data"]["clip_samples"] / recipe["data"]["sample_rate"]
    caption = (
        f"Mean over machine types of AUC and pAUC (p = {recipe['score']['max_fpr']}), in % (50 = chance). Ours: "
        f"profile `{recipe['run']['profile']}`, set-up `{recipe['train']['setup']}`, {seeds} "
        f"seeds × {recipe['train']['epochs']} epochs, {len(manifest['class_names'])} IDs, "
        f"{manifest['data']['train_clips']} training clips of {seconds:g} s; "
        f"{manifest['environment']['machine']}, {manifest['environment']['date'][:10]}, "
        f"commit {runner.short_commit(manifest['environment']['git'])}."
    )
    return report.markdown_table(("model", "data", "AUC", "pAUC"), rows) + "\n\n" + caption + "\n"


def _mean_std_percent(values: Sequence[float]) -> str:
    values = 100 * np.asarray(values, dtype=np.float64)
    return f"{values[0]:.2f}" if values.size == 1 else f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def write_report(run_dir: Path, recipe: dict, data: DcaseData, arrays: Arrays, groups: dict, scores: dict) -> Path:
    """report.md: results beside the source's, per-type and per-ID tables, ROC curves, embeddings, training."""
    manifest = files.read_json(run_dir / "manifest.json")
    final = scores["final_group"]
    method = scores["method"]
    saved = np.load(run_dir / "test_scores.npz")
    dev_labels = np.array([clip.label for clip in data.dev_test])
    dev_scores = saved[f"{final}_dev_{method}"].mean(axis=0)

    curves = {}
    for machine_type in data.machine_types:
        curves[machine_type] = {}
        for machine_id in sorted({c.machine_id for c in data.dev_test if c.machine_type == machine_type}):
            rows = np.array([c.machine_type == machine_type and c.machine_id == machine_id for c in data.dev_test])
            curves[machine_type][f"id_{machine_id}"] = (dev_labels[rows], dev_scores[rows])
    report.plot_roc_curves(curves, run_dir / "roc_dev.png", title=f"ROC, development test ({GROUP_TITLES[final]})")

    embedding_groups = {}
    for types, _ in groups[final]:
        rows = saved[f"{final}_embedding_rows_{types}"]
        embeddings = saved[f"{final}_embeddings_{types}"]
        for machine_type in data.machine_types if types == "*" else [types]:
            keep = np.array([data.dev_test[i].machine_type == machine_type for i in rows])
            clips = [data.dev_test[i] for i in rows[keep]]
            embedding_groups[machine_type] = (
                embeddings[keep],
                [f"id_{c.machine_id}" for c in clips],
                np.array([c.label for c in clips]),
            )
    report.plot_embeddings(embedding_groups, run_dir / "embeddings_dev.png", title="Development test embeddings (PCA)")

    histories = {}
    for _, sub_dir in groups[final]:
        sub_manifest = files.read_json(sub_dir / "manifest.json")
        for member in sub_manifest["members"]:
            label = f"{sub_dir.name if sub_dir != run_dir else 'integrated'} seed {member['seed']}"
            histories[label] = report.read_history(sub_dir / member["file"].replace(".keras", ".history.csv"))
    report.plot_training_curves(histories, run_dir / "training_curves.png")

    final_dev = scores["groups"][final]["dev"][method]["ensemble"]
    source_types = recipe["source"]["integrated_dev"]
    baseline = recipe["source"]["baseline_dev"]
    type_rows = [
        (
            machine_type,
            f"{100 * values['auc']:.2f}",
            f"{100 * values['pauc']:.2f}",
            *(f"{v:.2f}" for v in source_types.get(machine_type, ("-", "-"))),
            *(f"{v:.2f}" for v in baseline.get(machine_type, ("-", "-"))),
        )
        for machine_type, values in final_dev["types"].items()
    ]
    id_rows = [
        (machine_type, machine_id, item["clips"], f"{100 * item['auc']:.2f}", f"{100 * item['pauc']:.2f}")
        for machine_type, values in final_dev["types"].items()
        for machine_id, item in values["ids"].items()
    ]
    method_rows = []
    for group, group_scores in scores["groups"].items():
        for split in ("dev", "eval"):
            for m in SCORE_METHODS if split in group_scores else ():
                ensemble = group_scores[split][m]["ensemble"]
                method_rows.append(
                    (
                        GROUP_TITLES[group],
                        split,
                        m,
                        *(f"{100 * ensemble[k]:.2f}" for k in ("mean_auc", "mean_pauc", "hmean_auc", "hmean_pauc")),
                    )
                )
    member_rows = []
    for _, sub_dir in groups[final]:
        for member in files.read_json(sub_dir / "manifest.json")["members"]:
            member_rows.append(
                (
                    sub_dir.name if sub_dir != run_dir else "integrated",
                    member["seed"],
                    member.get("best_epoch", "-"),
                    f"{member.get('best', {}).get('dev_score', float('nan')):.3f}",
                    f"{member['train_seconds']:.0f}",
                    f"{member['samples_per_second']:.1f}",
                )
            )
    features = recipe["features"]
    ignored = manifest["data"]["ignored_files"]
    whole = manifest["input_shape"][1] == manifest["clip_frames"]
    input_note = "whole clip" if whole else "random crops in training, the mean over windows in testing"
    lines = [
        f"# DCASE 2020 Task 2 — run `{run_dir.name}`",
        "",
        f"Recipe `{recipe['name']}`, profile `{recipe['run']['profile']}`, set-up `{recipe['train']['setup']}`, "
        f"head `{recipe['model']['head']}`, anomaly score `{method}`; data `{manifest['data']['root']}`.",
        "The source's numbers are on the real DCASE 2020 Task 2 data; ours on the data named in each row.",
        "",
        "## Results",
        "",
        results_table(run_dir),
        "## Per machine type (development test, ensemble)",
        "",
        report.markdown_table(
            (
                "machine type",
                "ours AUC",
                "ours pAUC",
                "source integrated AUC",
                "source integrated pAUC",
                "official baseline AUC",
                "official baseline pAUC",
            ),
            type_rows,
        ),
        "",
        f"Mean AUC {100 * final_dev['mean_auc']:.2f}, pAUC {100 * final_dev['mean_pauc']:.2f}; harmonic mean AUC "
        f"{100 * final_dev['hmean_auc']:.2f}, pAUC {100 * final_dev['hmean_pauc']:.2f} "
        "(ours; source columns: real data).",
        "",
        "![ROC curves](roc_dev.png)",
        "",
        "![embeddings](embeddings_dev.png)",
        "",
        "## Per machine ID (development test, ensemble)",
        "",
        report.markdown_table(("machine type", "ID", "clips", "AUC", "pAUC"), id_rows),
        "",
        "## Every model group and anomaly score (ensemble, %)",
        "",
        report.markdown_table(
            ("models", "split", "score", "mean AUC", "mean pAUC", "hmean AUC", "hmean pAUC"), method_rows
        ),
        "",
        "## Members",
        "",
        report.markdown_table(
            ("models", "seed", "best epoch", "best Σ(AUC+pAUC)", "train s", "samples/s"), member_rows
        ),
        "",
        "![training curves](training_curves.png)",
        "",
        "## Features and data",
        "",
        f"- Log-mel: {recipe['data']['sample_rate']} Hz, n_fft {features['n_fft']}, hop {features['hop_length']}, "
        f"{features['n_mels']} mels ({features['mel_scale']} scale, filter norm {features['mel_norm']}, "
        f"`{features['pad_mode']}` padding); clips of {manifest['clip_frames']} frames, model input "
        f"{tuple(manifest['input_shape'])} ({input_note}).",
        f"- dB reference `{features['db_reference']}`, top_db {features['top_db']}; z-score from the training clips "
        f"(mean {manifest['normalization']['mean'][0]:.3f}, std {manifest['normalization']['std'][0]:.3f}).",
        f"- Clips: {manifest['data']['train_clips']} training, {manifest['data']['dev_test_clips']} development test, "
        f"{manifest['data']['eval_test_clips']} evaluation test (ground truth: "
        f"{'yes, synthetic' if manifest['data']['eval_ground_truth'] else 'none'}). Audio changed to be usable: "
        f"{report.audio_changes(manifest['data']['audio_changes'])}. Files ignored (not .wav): "
        f"{len(ignored)}{': ' + task.listing(ignored) if ignored else ''}.",
        "- Official files: `dev/anomaly_score_<type>_id_<ID>.csv`, `dev/result.csv`"
        + (", `eval/anomaly_score_<type>_id_<ID>.csv`" if manifest["data"]["eval_test_clips"] else "")
        + (", `eval/result.csv`" if manifest["data"]["eval_ground_truth"] else "")
        + ".",
        f"- Feature extraction (or cache read): {manifest['feature_seconds']} s. Peak resident memory: "
        f"{report.memory_line(manifest['feature_peak_memory_mb'])} after features.",
        f"- Environment: {report.environment_line(manifest['environment'])}.",
        "",
    ]
    return files.write_text(run_dir / "report.md", "\n".join(lines))


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return runner.command_line(
        argv,
        prog="python -m replicate.dcase",
        description="DCASE 2020 Task 2 machine-ID classifier (ResNet-50 + ArcFace): scores, official CSVs, report.",
        data_help="dev_data/<type>/{train,test}/ and optionally eval_data/<type>/{train,test}/",
        load_recipe=load_recipe,
        run=run,
    )


if __name__ == "__main__":
    sys.exit(main())
