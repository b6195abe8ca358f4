"""The DCASE recipe's custom pieces: the ArcFace/CosFace margin layer, the warm-restart schedule, mixup."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from replicate import pipeline
from replicate.layers import CosineMarginClassifier, WarmupCosineRestarts


def _numpy_margin_logits(embeddings, kernel, labels, margin_type, scale, margin):
    """ArcFace / CosFace logits written out directly: s · (cos θ + y · (ψ(θ) − cos θ))."""
    unit_embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit_kernel = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cosine = np.clip(unit_embeddings @ unit_kernel, -1 + 1e-7, 1 - 1e-7)
    if margin_type == "arcface":
        target = np.cos(np.minimum(np.arccos(cosine) + margin, np.pi))
    else:
        target = cosine - margin
    return scale * (cosine + labels * (target - cosine))


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
@pytest.mark.parametrize("mixed", [False, True])
def test_margin_logits_equal_a_direct_numpy_computation(margin_type, mixed):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(6, 16)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
    if mixed:  # mixup labels: λ on one class, 1 − λ on another
        weights = rng.uniform(size=(6, 1)).astype(np.float32)
        labels = weights * labels + (1 - weights) * np.roll(labels, 1, axis=1)
    layer = CosineMarginClassifier(5, margin_type, scale=30.0, margin=0.5)
    logits = keras.ops.convert_to_numpy(layer([embeddings, labels]))
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    expected = _numpy_margin_logits(embeddings, kernel, labels, margin_type, 30.0, 0.5)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    plain = keras.ops.convert_to_numpy(layer(embeddings))
    np.testing.assert_allclose(
        plain, _numpy_margin_logits(embeddings, kernel, 0 * labels, margin_type, 30, 0.5), atol=1e-4
    )
    # the margin lowers exactly the labelled logits
    assert (logits[labels == 1] < plain[labels == 1]).all()
    np.testing.assert_allclose(logits[labels == 0], plain[labels == 0], atol=1e-5)


def test_margin_is_finite_at_cos_one_and_float32_under_mixed_precision():
    layer = CosineMarginClassifier(3, "arcface")
    layer.build((None, 4))
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    embeddings = tf.constant(kernel.T.copy())  # each embedding equals its class's weight: cos θ = 1
    labels = tf.constant(np.eye(3, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        logits = layer([embeddings, labels])
    gradient = tape.gradient(logits, embeddings)
    assert np.isfinite(logits.numpy()).all() and np.isfinite(gradient.numpy()).all()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = CosineMarginClassifier(3, "cosface")
        half = keras.ops.cast(np.random.default_rng(1).normal(size=(2, 4)), "float16")
        assert mixed([half, np.eye(3, dtype=np.float32)[:2]]).dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


def test_margin_layer_config_round_trip_and_bad_arguments():
    layer = CosineMarginClassifier(7, "cosface", scale=20.0, margin=0.3, epsilon=1e-6, name="classifier")
    config = layer.get_config()
    assert {key: config[key] for key in ("num_classes", "margin_type", "scale", "margin", "epsilon")} == {
        "num_classes": 7,
        "margin_type": "cosface",
        "scale": 20.0,
        "margin": 0.3,
        "epsilon": 1e-6,
    }
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, CosineMarginClassifier) and restored.get_config() == config
    for arguments in ({"margin_type": "sphereface"}, {"scale": 0}, {"margin": -1.0}):
        with pytest.raises(ValueError):
            CosineMarginClassifier(3, **arguments)


def _numpy_schedule(step, steps_per_epoch, max_lr, first, mult, warmup, min_lr=0.0):
    """The intended schedule, cycle by cycle: linear warm-up, then half a cosine; cycles T_0 · T_mult^i."""
    epoch = step / steps_per_epoch
    start, length = 0.0, first
    while epoch >= start + length:
        start, length = start + length, length * mult
    in_cycle = epoch - start
    if in_cycle < warmup:
        return min_lr + (max_lr - min_lr) * in_cycle / warmup
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + np.cos(np.pi * (in_cycle - warmup) / (length - warmup)))


@pytest.mark.parametrize(("mult", "min_lr"), [(2, 0.0), (1, 1e-5)])
def test_schedule_shape_equals_a_direct_computation(mult, min_lr):
    steps_per_epoch = 5
    schedule = WarmupCosineRestarts(
        2e-4, steps_per_epoch, first_cycle_epochs=10, cycle_mult=mult, warmup_epochs=2, min_lr=min_lr
    )
    steps = np.arange(75 * steps_per_epoch)
    values = keras.ops.convert_to_numpy(schedule(steps))
    expected = np.array([_numpy_schedule(s, steps_per_epoch, 2e-4, 10, mult, 2, min_lr) for s in steps])
    # float32: epoch = step / 5 (≤ 75) carries ≤ 75·u absolute (u = 2⁻²⁴), kept absolute by subtracting the
    # cycle's start and divided by its length (≥ 8 epochs); cos (slope ≤ π) and half the peak scale it, so
    # |error| ≤ 2e-4 · ½ · π · (2 · 75 u / 8 + 2 u) + 2e-4 · 4 u ≈ 2e-4 · 40 u; 100 u leaves cos's own ulps room.
    np.testing.assert_allclose(values, expected, rtol=0, atol=2e-4 * 100 * np.finfo(np.float32).eps / 2)
    restarts = [0, 10, 30, 70] if mult == 2 else [0, 10, 20, 30]
    for epoch in restarts:  # every cycle starts at the floor, peaks after T_up epochs
        assert values[epoch * steps_per_epoch] == pytest.approx(min_lr, abs=1e-9)
        assert values[(epoch + 2) * steps_per_epoch] == pytest.approx(2e-4, rel=1e-4)
    assert values.max() == pytest.approx(2e-4, rel=1e-5)


def test_schedule_serialises_inside_an_optimizer():
    schedule = WarmupCosineRestarts(1e-3, 12, first_cycle_epochs=4, warmup_epochs=1)
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored._learning_rate, WarmupCosineRestarts)  # Keras keeps the schedule object here
    assert restored._learning_rate.get_config() == schedule.get_config()
    for arguments in (
        {"steps_per_epoch": 0},
        {"steps_per_epoch": 3, "warmup_epochs": 10},
        {"steps_per_epoch": 3, "cycle_mult": 1.5},
    ):
        with pytest.raises(ValueError):
            WarmupCosineRestarts(1e-3, **arguments)


def test_mixup_weights_follow_beta_one_one_and_label_smoothing_applies_to_mixed_targets():
    size = 64
    targets = np.eye(size, dtype=np.float32)  # row i is class i, so its mixed row shows λ_i directly
    features = np.arange(size, dtype=np.float32)[:, None]
    weights = []
    for epoch in range(20):  # a new draw each epoch
        dataset = pipeline.mixup(pipeline.from_arrays(features, targets, batch_size=size), 1.0, seed=3, epoch=epoch)
        for _, mixed in dataset:
            mixed = mixed.numpy()
            np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
            diagonal = np.diag(mixed)
            weights.extend(diagonal[diagonal < 1.0 - 1e-6])  # rows mixed with another row
    assert len(weights) > 1000
    assert stats.kstest(weights, "uniform").pvalue > 0.001  # Beta(1, 1) is the uniform distribution
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.05)
    logits = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    labels = np.array([[0.3, 0.7, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0, 0.1, 0.9]], np.float32)
    smoothed = labels * 0.95 + 0.05 / 5
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(smoothed * log_probabilities).sum(axis=1).mean()
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
