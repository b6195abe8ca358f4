"""The source's vote over the five variants and the scores of a run: UAR (the competition metric), macro F1,
per-class recall and the confusion matrix, for each member, each variant's seed ensemble and the ensemble."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from replicate import metrics
from replicate.aicup.data import CLASS_NAMES

LABELS = list(range(1, len(CLASS_NAMES) + 1))


def vote(member_probabilities: np.ndarray) -> np.ndarray:
    """The source's ensemble: sum the members' probabilities, argmax, labels 1-5."""
    return np.asarray(member_probabilities).sum(axis=0).argmax(axis=1) + 1


def classification_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """The persons, then `metrics.classification_scores` over the classes 1-5."""
    return {"persons": len(labels), **metrics.classification_scores(labels, predicted, LABELS)}


def validation_scorer(inputs: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int) -> Callable:
    """`BestEpoch`'s score of a member: its validation UAR (the competition metric) and macro F1."""

    def score(model) -> dict[str, float]:
        predicted = model.predict(dict(inputs), batch_size=batch_size, verbose=0).argmax(axis=1) + 1
        return {
            "val_uar": metrics.unweighted_average_recall(labels, predicted),
            "val_macro_f1": metrics.macro_f1(labels, predicted, labels=LABELS),
        }

    return score


def list_scores(labels: np.ndarray, rows: Mapping[int, np.ndarray], probabilities: Mapping[int, np.ndarray]) -> dict:
    """The scores of one list of persons.

    Args:
        labels: the list's labels 1-5.
        rows: n_mfcc → the rows its members predicted (its own validation fold, or the whole test list).
        probabilities: n_mfcc → its members' probabilities on those rows, (seeds, rows, 5).

    Returns:
        Persons per variant, each member's UAR and each variant's seed ensemble's; and where every variant
        has the same rows, the ensemble's (the vote of every member): `classification_scores`.
    """
    variants = list(probabilities)
    scores = {
        "persons": {str(k): len(rows[k]) for k in variants},
        "member_uar": [
            metrics.unweighted_average_recall(labels[rows[k]], vote(member[np.newaxis]))
            for k in variants
            for member in probabilities[k]
        ],
        "variant_uar": {
            str(k): metrics.unweighted_average_recall(labels[rows[k]], vote(probabilities[k])) for k in variants
        },
    }
    if shared_rows(rows):
        every_member = np.concatenate([probabilities[k] for k in variants])
        scores["ensemble"] = classification_scores(labels[rows[variants[0]]], vote(every_member))
    return scores


def shared_rows(rows: Mapping[int, np.ndarray]) -> bool:
    """Whether every variant predicted the same persons (a test list, or one split shared by the variants)."""
    first = next(iter(rows.values()))
    return all(np.array_equal(variant_rows, first) for variant_rows in rows.values())


def majority_uar(train_labels: np.ndarray, held_out: Mapping[str, np.ndarray]) -> dict:
    """The baseline of always predicting the training list's most frequent class, on each held-out list
    (its UAR is 1 / the classes present: the same on every variant's stratified fold)."""
    majority = int(np.bincount(train_labels).argmax())
    return {
        "majority_class": majority,
        "majority_uar": {
            name: metrics.unweighted_average_recall(labels, np.full(len(labels), majority))
            for name, labels in held_out.items()
        },
    }
