"""Keras2Nadam: the Keras 2 Nadam update (a numpy port of it), its serialisation, and an exact resume."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from replicate.optimizers import Keras2Nadam
from tests.conftest import run_python

STEPS = 300
# Keras keeps the learning rate in a float32 variable, so the update uses float32(0.002) in any dtype.
LEARNING_RATE = float(np.float32(0.002))


def keras2_nadam(weights, gradients, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7, schedule_decay=0.004):
    """Keras 2's Nadam in numpy, written from tf.keras 2.x (`optimizer_v2/nadam.py`: `_prepare_local` and
    `_resource_apply_dense`; standalone Keras 2.3's `Nadam.get_updates` is the same arithmetic).

    Args:
        weights: the starting weights, a list of arrays.
        gradients: one list of gradients (one per weight) per step.

    Returns:
        The weights after every step.
    """
    weights = [np.array(w, dtype=np.float64) for w in weights]
    first = [np.zeros_like(w) for w in weights]
    second = [np.zeros_like(w) for w in weights]
    momentum_cache = 1.0  # tf.keras's `_m_cache`, the product of the momenta so far
    for local_step, step_gradients in enumerate(gradients, start=1):
        m_t = beta_1 * (1.0 - 0.5 * 0.96 ** (schedule_decay * local_step))
        m_t_1 = beta_1 * (1.0 - 0.5 * 0.96 ** (schedule_decay * (local_step + 1)))
        m_schedule_new = momentum_cache * m_t
        momentum_cache = m_schedule_new
        m_schedule_next = m_schedule_new * m_t_1
        for i, grad in enumerate(step_gradients):
            g_prime = grad / (1.0 - m_schedule_new)
            first[i] = beta_1 * first[i] + (1.0 - beta_1) * grad
            m_t_prime = first[i] / (1.0 - m_schedule_next)
            second[i] = beta_2 * second[i] + (1.0 - beta_2) * np.square(grad)
            v_t_prime = second[i] / (1.0 - beta_2**local_step)
            m_t_bar = (1.0 - m_t) * g_prime + m_t_1 * m_t_prime
            weights[i] = weights[i] - learning_rate * m_t_bar / (np.sqrt(v_t_prime) + epsilon)
    return weights


def _apply(optimizer, weights, gradients):
    variables = [keras.Variable(w) for w in weights]
    for step_gradients in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_gradients], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


@pytest.fixture(scope="module")
def problem():
    """Float64 weights and a fixed sequence of gradients whose scale and sign change over the steps."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    scales = np.exp(rng.normal(0, 1, size=STEPS))
    gradients = [[scale * rng.normal(size=w.shape) for w in weights] for scale in scales]
    return weights, gradients


def test_update_equals_keras_2s_over_hundreds_of_steps(problem):
    weights, gradients = problem
    expected = keras2_nadam(weights, gradients, LEARNING_RATE)
    ours = _apply(Keras2Nadam(learning_rate=0.002), weights, gradients)
    # Float64, the same operations in the same order as the port: every one is IEEE-rounded (2^-53 relative)
    # but the powers, within an ulp in both. The largest amplification is 1 / (1 - beta_2^t) <= 1000 (t = 1)
    # on beta_2^t's last bit; with about 40 roundings per step, an update is off by at most
    # 1000 * 40 * 2^-53 = 4.4e-12 of itself, and an update is at most lr * |m| / sqrt(v) <= 0.002 * 40. Over 300
    # steps that is 300 * 0.08 * 4.4e-12 = 1.1e-10, plus 300 roundings of the weights (300 * 2^-53 * 4): 1e-9.
    for ours_weight, expected_weight in zip(ours, expected, strict=True):
        assert ours_weight.dtype == np.float64
        np.testing.assert_allclose(ours_weight, expected_weight, rtol=0, atol=1e-9)
    # Keras 3's Nadam (the momentum warm-up 0.96^t instead of 0.96^(0.004 t)) is far from it within 50 steps.
    keras3 = _apply(keras.optimizers.Nadam(learning_rate=0.002), weights, gradients[:50])
    expected = keras2_nadam(weights, gradients[:50], LEARNING_RATE)
    assert max(np.abs(k - e).max() for k, e in zip(keras3, expected, strict=True)) > 1e-3


def test_momentum_after_one_epoch_of_the_source():
    # 100,000 clips / batch 16 = 6,250 steps: Keras 2 is still warming up; Keras 3 reached beta_1 long before.
    momentum = Keras2Nadam().momentum_at(6250, "float64")
    assert float(momentum) == pytest.approx(0.9 * (1 - 0.5 * 0.96**25), rel=1e-12)
    assert round(float(momentum), 3) == 0.738 and round(0.9 * (1 - 0.5 * 0.96**6250), 3) == 0.9


def test_config_is_complete_and_bad_arguments_are_refused():
    optimizer = Keras2Nadam(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-6, schedule_decay=0.01)
    config = optimizer.get_config()
    assert Keras2Nadam.from_config(config).get_config() == config
    assert (config["beta_1"], config["beta_2"], config["epsilon"], config["schedule_decay"]) == (0.8, 0.99, 1e-6, 0.01)
    defaults = Keras2Nadam().get_config()
    assert (defaults["beta_1"], defaults["beta_2"], defaults["epsilon"], defaults["schedule_decay"]) == (
        0.9,
        0.999,
        1e-7,
        0.004,
    )
    for arguments in ({"beta_1": 1.0}, {"beta_2": -0.1}, {"epsilon": 0.0}, {"schedule_decay": -1.0}):
        with pytest.raises(ValueError):
            Keras2Nadam(**arguments)


def _model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="mish")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


def test_a_saved_model_resumes_with_the_same_updates_and_loads_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(32, 6)).astype(np.float32)
    targets = rng.dirichlet(np.ones(3), size=32).astype(np.float32)

    def fit(model, epochs):
        model.fit(features, targets, batch_size=8, epochs=epochs, shuffle=False, verbose=0)

    keras.utils.set_random_seed(0)
    straight = _model()
    straight.compile(optimizer=Keras2Nadam(), loss="kl_divergence")
    initial = straight.get_weights()
    fit(straight, 2)

    interrupted = _model()
    interrupted.set_weights(initial)
    interrupted.compile(optimizer=Keras2Nadam(), loss="kl_divergence")
    fit(interrupted, 1)
    interrupted.save(tmp_path / "model.keras")
    resumed = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(resumed.optimizer, Keras2Nadam) and int(resumed.optimizer.iterations) == 4
    fit(resumed, 1)  # continues from the saved momentum schedule and moments
    for after, expected in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(after, expected)

    saved = [keras.ops.convert_to_numpy(v) for v in interrupted.optimizer.variables]
    np.savez(tmp_path / "saved.npz", *saved)  # plain arrays: nothing pickled
    run_python(  # the documented import: the module that registers the class
        "import numpy as np, keras, replicate.optimizers\n"
        f"model = keras.models.load_model({str(tmp_path / 'model.keras')!r}, safe_mode=True)\n"
        "assert type(model.optimizer).__name__ == 'Keras2Nadam', model.optimizer\n"
        f"archive = np.load({str(tmp_path / 'saved.npz')!r})\n"
        "saved = [archive[f'arr_{i}'] for i in range(len(archive.files))]\n"
        "loaded = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]\n"
        "assert len(loaded) == len(saved) and all(np.array_equal(a, b) for a, b in zip(loaded, saved))\n"
    )
