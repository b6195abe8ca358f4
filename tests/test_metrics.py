"""Each metric against an independent computation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from scipy import special, stats

from replicate import metrics

RNG = np.random.default_rng(0)


def test_kl_divergence_matches_scipy_and_keras():
    truth = RNG.dirichlet(np.full(30, 0.2), size=50)
    truth[truth < 1e-3] = 0  # real labels have exact zeros
    truth /= truth.sum(axis=1, keepdims=True)
    predicted = RNG.dirichlet(np.ones(30), size=50)
    ours = metrics.kl_divergence(truth, predicted)
    clipped_p, clipped_q = np.clip(truth, 1e-7, 1), np.clip(predicted, 1e-7, 1)
    assert ours == pytest.approx(special.rel_entr(clipped_p, clipped_q).sum(axis=1).mean(), rel=1e-10)
    keras_value = float(keras.losses.KLDivergence()(truth.astype("float32"), predicted.astype("float32")))
    assert ours == pytest.approx(keras_value, rel=1e-4)
    assert metrics.kl_divergence(truth, truth) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        metrics.kl_divergence(truth, predicted[:, :29])


def test_macro_f1_against_a_confusion_matrix():
    truth = RNG.integers(0, 4, 200)
    predicted = np.where(RNG.random(200) < 0.6, truth, RNG.integers(0, 4, 200))
    f1_scores = []
    for label in range(4):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        f1_scores.append(2 * tp / (2 * tp + fp + fn))
    assert metrics.macro_f1(truth, predicted) == pytest.approx(np.mean(f1_scores))


def test_uar_is_the_mean_of_per_class_recalls():
    truth = np.array([0] * 90 + [1] * 10)
    predicted = np.array([0] * 90 + [0] * 5 + [1] * 5)
    assert metrics.unweighted_average_recall(truth, predicted) == pytest.approx((1.0 + 0.5) / 2)


def test_auc_equals_the_mann_whitney_statistic():
    labels = np.array([0] * 60 + [1] * 40)
    scores = np.concatenate([RNG.normal(0, 1, 60), RNG.normal(1, 1, 40)])
    u_statistic = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert metrics.auc(labels, scores) == pytest.approx(u_statistic / (40 * 60))


def test_partial_auc_is_the_mcclish_standardised_area_up_to_max_fpr():
    labels = np.array([0] * 300 + [1] * 100)
    scores = np.concatenate([RNG.normal(0, 1, 300), RNG.normal(1.5, 1, 100)])
    # Direct computation: ROC points from every threshold, area under it for FPR in [0, 0.1].
    thresholds = np.sort(np.unique(scores))[::-1]
    tpr = np.array([0.0] + [np.mean(scores[labels == 1] >= t) for t in thresholds])
    fpr = np.array([0.0] + [np.mean(scores[labels == 0] >= t) for t in thresholds])
    stop = np.searchsorted(fpr, 0.1, side="right")
    tpr_at = np.interp(0.1, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    area = np.trapezoid(np.append(tpr[:stop], tpr_at), np.append(fpr[:stop], 0.1))
    minimum, maximum = 0.1**2 / 2, 0.1
    expected = 0.5 * (1 + (area - minimum) / (maximum - minimum))
    assert metrics.partial_auc(labels, scores, max_fpr=0.1) == pytest.approx(expected, rel=1e-9)


def test_harmonic_mean():
    assert metrics.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / (1 / 0.5 + 1 / 1.0))
    with pytest.raises(ValueError, match="positive"):
        metrics.harmonic_mean([0.5, 0.0])


def test_classification_scores_follow_the_given_classes_and_count_absent_ones():
    scores = metrics.classification_scores([1, 1, 2, 3], [1, 2, 2, 2], labels=[1, 2, 3, 4])
    assert scores["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert scores["recall"] == [0.5, 1.0, 0.0, 0.0]
    assert scores["uar"] == pytest.approx(0.5) and scores["macro_f1"] == metrics.macro_f1(
        [1, 1, 2, 3], [1, 2, 2, 2], [1, 2, 3, 4]
    )
