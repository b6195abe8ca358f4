"""Registered losses: values against PyTorch, lookup by recipe name, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from replicate import losses

# Float64 on both sides; a handful of roundings per value (a 5-term log-sum-exp, a 6-term weighted mean), so
# agreement to half of float64's digits (√ε ≈ 1.5e-8) holds with room to spare and catches any change of formula.
TOLERANCE = float(np.sqrt(np.finfo(np.float64).eps))


def _batch():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.full(5, 0.3), size=6)
    labels = np.array([0, 1, 2, 3, 4, 0])
    class_weights = 1.0 / np.array([402.0, 165.0, 126.0, 33.0, 24.0])
    return probabilities, labels, class_weights


def test_double_softmax_crossentropy_is_pytorchs_cross_entropy_of_the_probabilities():
    probabilities, labels, class_weights = _batch()
    one_hot = np.eye(5)[labels]
    source = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(class_weights))
    expected = source(torch.from_numpy(probabilities), torch.from_numpy(labels)).item()
    weighted = losses.DoubleSoftmaxCrossentropy(reduction="mean_with_sample_weight", dtype="float64")
    value = float(weighted(one_hot, probabilities, sample_weight=class_weights[labels]))
    assert value == pytest.approx(expected, rel=TOLERANCE)
    unweighted = torch.nn.CrossEntropyLoss()(torch.from_numpy(probabilities), torch.from_numpy(labels)).item()
    value = float(losses.DoubleSoftmaxCrossentropy(dtype="float64")(one_hot, probabilities))
    assert value == pytest.approx(unweighted, rel=TOLERANCE)
    # Sure, right answers: the plain cross-entropy is 0; through a second softmax it is log(1 + 4/e).
    assert float(losses.DoubleSoftmaxCrossentropy(dtype="float64")(one_hot, one_hot)) == pytest.approx(
        np.log(1 + 4 / np.e), rel=TOLERANCE
    )
    plain = float(keras.losses.CategoricalCrossentropy(dtype="float64")(one_hot, one_hot))
    assert plain <= 2 * keras.config.epsilon()  # Keras clips probabilities to [ε, 1 − ε]: −log(1 − ε) ≈ ε


def test_get_finds_this_packages_losses_and_keras_builtins():
    loss = losses.get("DoubleSoftmaxCrossentropy", {"reduction": "mean_with_sample_weight"})
    assert isinstance(loss, losses.DoubleSoftmaxCrossentropy) and loss.reduction == "mean_with_sample_weight"
    builtin = losses.get("CategoricalCrossentropy", {"from_logits": True})
    assert isinstance(builtin, keras.losses.CategoricalCrossentropy) and builtin.get_config()["from_logits"]
    with pytest.raises(ValueError):
        losses.get("NoSuchLoss")


def test_config_round_trips_and_a_compiled_model_saves_with_it(tmp_path):
    loss = losses.DoubleSoftmaxCrossentropy(reduction="mean_with_sample_weight", name="source_loss")
    config = keras.losses.serialize(loss)
    assert config["registered_name"] == "replicate>DoubleSoftmaxCrossentropy"
    restored = keras.losses.deserialize(config)
    assert type(restored) is losses.DoubleSoftmaxCrossentropy and restored.get_config() == loss.get_config()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="softmax")])
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)  # this module is imported
    assert isinstance(loaded.loss, losses.DoubleSoftmaxCrossentropy) and loaded.loss.name == "source_loss"
