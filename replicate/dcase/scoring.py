"""Anomaly scores, their AUC and pAUC, and the official files.

A clip's score comes from its member's outputs for it and the clip's own machine ID: the source's
`softmax` (1 − the probability of that ID), or a model of the ID's normal training embeddings that the
source planned (`centroid`, `gmm`, `lof`). What such a model keeps of the training embeddings (its
*reference*, `fit_reference`) is saved with the run (`save_reference`), so that new clips are scored
(`reference_scores`) without the training data, with the numbers the run's evaluation computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from replicate import files, metrics
from replicate.dcase.data import Clip
from replicate.task import DataError

SCORE_METHODS = ("softmax", "centroid", "gmm", "lof")
REFERENCE_FILE = "score_reference.npz"  # in each group folder of the run's ensemble
NORM_FLOOR = 1e-12  # the smallest norm a unit vector is divided by
AREAS = ("auc", "pauc")  # the areas under the ROC curve each machine ID and type is scored by


def softmax_scores(probabilities: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """The source's anomaly score: 1 − the probability of the clip's own machine ID."""
    return 1.0 - probabilities[np.arange(len(class_indices)), class_indices]


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), NORM_FLOOR)


def fit_reference(
    method: str, embeddings: np.ndarray, class_indices: np.ndarray, score_recipe: Mapping, seed: int = 0
) -> dict[int, dict[str, np.ndarray]]:
    """What `method` keeps of the training clips' embeddings, per class (machine ID): nothing ("softmax"), the
    normalised mean of the unit embeddings ("centroid"), a diagonal GaussianMixture's fitted arrays ("gmm",
    `score_recipe["gmm_components"]` components, random_state `seed`) or the embeddings themselves and the
    neighbour count that LocalOutlierFactor compares new ones with ("lof"; `DataError` for a class of fewer
    than two clips)."""
    from sklearn.mixture import GaussianMixture

    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; known: {', '.join(SCORE_METHODS)}")
    references = {}
    for class_index in np.unique(class_indices) if method != "softmax" else ():
        normal = embeddings[class_indices == class_index]
        if method == "centroid":
            centroid = _unit(normal).mean(axis=0)
            references[int(class_index)] = {"centroid": centroid / max(np.linalg.norm(centroid), NORM_FLOOR)}
        elif method == "gmm":
            components = min(score_recipe["gmm_components"], len(normal))
            mixture = GaussianMixture(components, covariance_type="diag", reg_covar=1e-4, random_state=seed)
            mixture.fit(normal)
            names = ("weights_", "means_", "covariances_", "precisions_cholesky_")
            references[int(class_index)] = {name.rstrip("_"): getattr(mixture, name) for name in names}
        else:
            neighbors = min(score_recipe["lof_neighbors"], len(normal) - 1)
            if neighbors < 1:
                raise DataError(f"LOF needs at least two training clips of class {class_index}")
            references[int(class_index)] = {"embeddings": normal, "neighbors": np.array(neighbors)}
    return references


def reference_scores(
    method: str, references: Mapping[int, Mapping[str, np.ndarray]], embeddings: np.ndarray, class_indices: np.ndarray
) -> np.ndarray:
    """Anomaly scores of embeddings against their class's reference (`fit_reference`): the cosine distance
    to the centroid, the negative log-likelihood under the mixture, or the negative LOF score."""
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import LocalOutlierFactor

    scores = np.zeros(len(class_indices))
    for class_index in np.unique(class_indices):
        rows = class_indices == class_index
        reference = references[int(class_index)]
        if method == "centroid":
            scores[rows] = 1.0 - _unit(embeddings[rows]) @ reference["centroid"]
        elif method == "gmm":
            mixture = GaussianMixture(len(reference["weights"]), covariance_type="diag")
            for name, value in reference.items():  # the fitted state, as `fit` leaves it
                setattr(mixture, f"{name}_", value)
            scores[rows] = -mixture.score_samples(embeddings[rows])
        else:
            lof = LocalOutlierFactor(n_neighbors=int(reference["neighbors"]), novelty=True)
            scores[rows] = -lof.fit(reference["embeddings"]).score_samples(embeddings[rows])
    return scores


def save_reference(
    path: Path, method: str, references: Mapping[int, Mapping[int, dict]], class_names: Sequence[str]
) -> Path:
    """Every member's reference ({seed: `fit_reference`'s}) in one .npz, keyed "seed-XX/<class>/<name>"."""
    arrays = {"method": np.array(method)}
    for seed, by_class in references.items():
        for index, reference in by_class.items():
            arrays.update({f"seed-{seed:02d}/{class_names[index]}/{name}": v for name, v in reference.items()})
    return files.write_npz(path, **arrays)


def load_reference(path: Path, method: str, seeds: Sequence[int], class_names: Sequence[str]) -> dict:
    """The references `save_reference` wrote: {seed: {class index: {name: array}}}.

    Raises:
        DataError: the file is missing (the run was not evaluated), of another method, or lacks a member.
    """
    if not path.is_file():
        raise DataError(f"{path}: not found; the run writes it when it scores its test clips (run it again)")
    with np.load(path) as saved:
        if str(saved["method"]) != method:
            raise DataError(f"{path}: holds the {saved['method']} score's reference, not the run's {method}")
        references = {}
        for seed in seeds:
            prefix = f"seed-{seed:02d}/"
            if method != "softmax" and not any(key.startswith(prefix) for key in saved.files):
                raise DataError(f"{path}: no reference of the member of seed {seed}")
            references[seed] = {
                index: {key.rpartition("/")[2]: saved[key] for key in saved.files if key.startswith(f"{prefix}{name}/")}
                for index, name in enumerate(class_names)
            }
    return references


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
        means = {key: float(np.mean([value[key] for value in ids.values()])) for key in AREAS}
        by_type[machine_type] = {"ids": ids, **means}
    by_area = {key: [value[key] for value in by_type.values()] for key in AREAS}
    means = {f"mean_{key}": float(np.mean(values)) for key, values in by_area.items()}
    hmeans = {f"hmean_{key}": metrics.harmonic_mean(np.maximum(values, 1e-9)) for key, values in by_area.items()}
    return {"types": by_type, **means, **hmeans}


def summary(clips: Sequence[Clip], labels: np.ndarray, member_scores: np.ndarray, max_fpr: float) -> dict:
    """The scores of an ensemble (the mean of its members' scores: `evaluate_scores`) and each member's
    means over machine types, from (members, clips) scores."""
    keys = ("mean_auc", "mean_pauc", "hmean_auc", "hmean_pauc")
    return {
        "ensemble": evaluate_scores(clips, labels, member_scores.mean(axis=0), max_fpr),
        "members": [
            {key: value for key, value in evaluate_scores(clips, labels, row, max_fpr).items() if key in keys}
            for row in member_scores
        ],
    }


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
