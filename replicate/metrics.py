"""The competitions' metrics, as plain numpy functions on predictions (sklearn where it has them)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

# Keras's KLDivergence clips both distributions to [1e-7, 1]; the DACON source scored with it.
KERAS_EPSILON = 1e-7


def kl_divergence(y_true: np.ndarray, y_pred: np.ndarray, epsilon: float = KERAS_EPSILON) -> float:
    """Mean over rows of KL(true ‖ predicted) = Σ p log(p / q), both clipped to [epsilon, 1] as in Keras.

    Args:
        y_true: (rows, classes) target distributions.
        y_pred: (rows, classes) predicted distributions.
        epsilon: clipping floor; Keras's value by default, as the DACON source's `eval_kldiv` used.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"expected two (rows, classes) arrays of one shape, got {y_true.shape} and {y_pred.shape}")
    p = np.clip(y_true, epsilon, 1.0)
    q = np.clip(y_pred, epsilon, 1.0)
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Unweighted mean of the per-class F1 scores (classes absent from both sides count as 0 F1 only if listed)."""
    return float(sk_metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def unweighted_average_recall(y_true, y_pred) -> float:
    """UAR: the mean of per-class recalls (scikit-learn's balanced accuracy)."""
    return float(sk_metrics.balanced_accuracy_score(y_true, y_pred))


def classification_scores(y_true, y_pred, labels) -> dict:
    """A classifier's scores over the classes `labels`, in that order: UAR, macro F1, each class's recall
    (0 for a class absent from `y_true`) and the confusion matrix (rows true, columns predicted), as plain lists."""
    return {
        "uar": unweighted_average_recall(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, labels=labels),
        "recall": sk_metrics.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0).tolist(),
        "confusion": sk_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def auc(y_true, scores) -> float:
    """Area under the ROC curve; `y_true` is 1 for anomalous, `scores` higher for more anomalous."""
    return float(sk_metrics.roc_auc_score(y_true, scores))


def partial_auc(y_true, scores, max_fpr: float = 0.1) -> float:
    """pAUC over false-positive rates [0, max_fpr], as the DCASE 2020 Task 2 evaluator computes it
    (scikit-learn's `roc_auc_score(max_fpr=...)`, McClish-standardised)."""
    return float(sk_metrics.roc_auc_score(y_true, scores, max_fpr=max_fpr))


def harmonic_mean(values) -> float:
    """Harmonic mean of positive values (DCASE's summary over machine IDs and types)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or (values <= 0).any():
        raise ValueError(f"harmonic mean needs positive values, got {values.tolist()}")
    return float(stats.hmean(values))
