"""The training list's split into training and validation persons, one per n_mfcc variant as the source's
notebooks drew them, and the class weights (1 / count) of each variant's training persons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from replicate.aicup.data import CLASS_NAMES, Split
from replicate.task import DataError, stratified_fold_rows


@dataclass(frozen=True)
class Fold:
    """One variant's split of the training list: its seed, training rows and validation rows."""

    seed: int
    train_rows: np.ndarray
    validation_rows: np.ndarray


def class_weights(labels: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """1 / count of each class 1..num_classes in `labels` (the source's CrossEntropyLoss weights)."""
    counts = np.bincount(np.asarray(labels) - 1, minlength=num_classes)
    if (counts == 0).any():
        absent = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else str(i + 1) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"the training split has no person of class {', '.join(absent)}: cannot weight it 1/count")
    return 1.0 / counts


def variant_folds(labels: np.ndarray, data_recipe: Mapping, variants: Sequence[int]) -> dict[int, Fold]:
    """Each n_mfcc variant's training and validation rows: fold `data.validation_fold` of a stratified
    `data.folds`-fold split.

    The source trained each variant in its own notebook, and each notebook drew its own
    `StratifiedKFold(n_splits=4, shuffle=True)` split (no random_state) and validated on its fold 0. With
    `data.split_per_variant` (the default) variant k's split is seeded `data.split_seed + k`, so the variants
    see different persons as the source's did, and a variant's split does not depend on which other variants
    are trained; without it every variant gets the one split seeded `data.split_seed` (comparable variants,
    and an ensemble score on the validation fold).
    """
    folds = {}
    for n_mfcc in variants:
        seed = data_recipe["split_seed"] + (n_mfcc if data_recipe["split_per_variant"] else 0)
        rows = stratified_fold_rows(labels, data_recipe["folds"], data_recipe["validation_fold"], seed)
        folds[n_mfcc] = Fold(seed, *rows)
    return folds


def check_training_classes(split: Split, folds: Mapping[int, Fold], data_recipe: Mapping) -> None:
    """Every class must have training persons in every variant's split: the loss weighs a class by 1 / its
    count (the source's), and a class the model never sees cannot be learned.

    Raises:
        DataError: naming the table, the variant, the absent classes and how many persons of each the table has.
    """
    in_table = np.bincount(split.labels - 1, minlength=len(CLASS_NAMES))
    for n_mfcc, fold in folds.items():
        absent = np.flatnonzero(np.bincount(split.labels[fold.train_rows] - 1, minlength=len(CLASS_NAMES)) == 0)
        if len(absent):
            classes = ", ".join(
                f"{index + 1} {CLASS_NAMES[index]} ({in_table[index]} in the table)" for index in absent
            )
            raise DataError(
                f"{split.table}: the training persons of n_mfcc {n_mfcc} (all but validation fold "
                f"{data_recipe['validation_fold']} of {data_recipe['folds']}, split seed {fold.seed}) have no person "
                f"of class {classes}; every class needs training persons"
            )


def split_summary(labels: np.ndarray, data_recipe: Mapping, folds: Mapping[int, Fold]) -> dict:
    """The manifest's record of the splits: how they were drawn, and per variant its seed, persons, class
    counts and class weights (1/count of its training rows)."""

    def counts(rows: np.ndarray) -> list[int]:
        return np.bincount(labels[rows] - 1, minlength=len(CLASS_NAMES)).tolist()

    return {
        "per_variant": data_recipe["split_per_variant"],
        "folds": data_recipe["folds"],
        "validation_fold": data_recipe["validation_fold"],
        "variants": {
            str(n_mfcc): {
                "seed": fold.seed,
                "train_persons": len(fold.train_rows),
                "validation_persons": len(fold.validation_rows),
                "class_counts": {"train": counts(fold.train_rows), "validation": counts(fold.validation_rows)},
                "class_weights": class_weights(labels[fold.train_rows]).tolist(),
            }
            for n_mfcc, fold in folds.items()
        },
    }
