"""The AI CUP 2023 MFCC CNN against a port of the source's PyTorch network (outputs, loss, one SGD step,
parameter count), its PyTorch layer semantics, and fresh-process loading."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.aicup import build_aicup_model
from tests import aicup_reference
from tests.conftest import run_python


def _trainable(model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


def test_parameter_count_is_that_of_the_source_networks_forward():
    # The source's Network also builds conv4-7, bn4-7 and two BatchNorm1d that its forward() never calls.
    source_used, source_unused = aicup_reference.used_parameter_count(aicup_reference.SourceNetwork())
    assert source_unused == set(aicup_reference.UNUSED_LAYERS)
    assert _trainable(build_aicup_model(n_mfcc=13)) == source_used == 444_261
    # The CNN ends in global average pooling, so the count does not depend on n_mfcc.
    assert _trainable(build_aicup_model(n_mfcc=50)) == source_used
    clinical_branch = 44 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 128 + 128 + 128 * 128  # and its part of fc1
    assert _trainable(build_aicup_model(n_mfcc=13, clinical=False)) == source_used - clinical_branch


def test_outputs_loss_and_one_sgd_step_match_the_source_network():
    """The model with the recipe's loss and optimizer against the port of the notebooks' Network,
    CrossEntropyLoss(weight=1/count) on its softmax output, and SGD step (this process: TensorFlow; the other
    backends in tests/test_backends.py)."""
    aicup_reference.assert_matches_source(aicup_reference.compare_with_source())


def test_inputs_outputs_and_shapes_as_pytorch_computes_them():
    model = build_aicup_model(n_mfcc=13)
    assert model.name == "aicup_mfcc_cnn"
    assert sorted(tensor.name for tensor in model.inputs) == ["clinical", "mfcc_13"]
    assert model.output_shape == (None, 5)
    # padding 1 on every conv, (3,10) kernels shrink time by 7, MaxPool2d(2, padding=1) gives floor(n/2) + 1
    assert model.get_layer("block1_pool").output.shape[1:3] == (7, 64)
    assert model.get_layer("block2_pool").output.shape[1:3] == (4, 29)
    assert model.get_layer("block3_pool").output.shape[1:3] == (3, 12)
    assert model.get_layer("concat").output.shape[-1] == 64 + 128
    audio_only = build_aicup_model(n_mfcc=21, clinical=False)
    assert [tensor.name for tensor in audio_only.inputs] == ["mfcc_21"]
    assert audio_only.name == "aicup_mfcc_cnn_audio_only"
    probabilities = audio_only.predict({"mfcc_21": np.random.default_rng(0).normal(size=(3, 21, 126, 1))}, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_celu_activations_and_batchnorm_as_pytorch():
    model = build_aicup_model()
    activations = {
        layer.get_config()["activation"] for layer in model.layers if isinstance(layer, keras.layers.Activation)
    }
    assert activations == {"celu"}
    dense = {
        layer.name: layer.get_config()["activation"] for layer in model.layers if isinstance(layer, keras.layers.Dense)
    }
    assert dense == {
        "clinical_dense1": "celu",
        "clinical_dense2": "celu",
        "clinical_dense3": "celu",
        "head_dense": "celu",
        "probabilities": "softmax",
    }
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert (layer.momentum, layer.epsilon) == (0.9, 1e-5)  # PyTorch momentum 0.1, eps 1e-5


def _torch_max_pool(x: np.ndarray) -> np.ndarray:
    """nn.MaxPool2d(2, padding=1) on (batch, h, w, c): −∞ padding, 2×2 windows, stride 2."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    height, width = x.shape[1] // 2 + 1, x.shape[2] // 2 + 1
    out = np.empty((x.shape[0], height, width, x.shape[3]), x.dtype)
    for i in range(height):
        for j in range(width):
            out[:, i, j] = padded[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max(axis=(1, 2))
    return out


def test_frame_standardisation_and_padded_max_pooling_are_the_sources():
    model = build_aicup_model(n_mfcc=13, clinical=False)
    mfcc = np.random.default_rng(1).normal(-20.0, 80.0, size=(2, 13, 126, 1)).astype(np.float32)
    names = ["frame_standardization", "block1_bn", "block1_pool", "block2_bn", "block2_pool"]
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in names])
    standardized, bn1, pool1, bn2, pool2 = probe.predict({"mfcc_13": mfcc}, verbose=0)
    # the notebooks' standardization(): mean and std over axis 0 of the (n_mfcc, frames) matrix
    expected = (mfcc - mfcc.mean(axis=1, keepdims=True)) / mfcc.std(axis=1, keepdims=True)
    np.testing.assert_allclose(standardized, expected, rtol=1e-4, atol=1e-4)
    assert (bn1 < 0).any()  # negative values at the border: zero padding would have changed the max
    np.testing.assert_array_equal(pool1, _torch_max_pool(bn1))
    np.testing.assert_array_equal(pool2, _torch_max_pool(bn2))


def test_pytorch_default_initialisation_bounds():
    model = build_aicup_model(n_mfcc=13)
    for name, fan_in in (("block2_conv", 16 * 3 * 10), ("clinical_dense1", 44), ("head_dense", 192)):
        kernel, bias = (np.asarray(w) for w in model.get_layer(name).weights)
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound  # uniform over the whole range, not a narrower one


@pytest.mark.parametrize(
    "arguments", [{"n_mfcc": 1}, {"num_classes": 1}, {"num_clinical": 0}, {"conv_filters": (8, 8)}]
)
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError):
        build_aicup_model(**arguments)


def test_saved_model_loads_in_a_fresh_process_in_safe_mode(tmp_path):
    model = build_aicup_model(n_mfcc=17)
    rng = np.random.default_rng(2)
    inputs = {
        "mfcc_17": rng.normal(size=(2, 17, 126, 1)).astype(np.float32),
        "clinical": rng.random((2, 44)).astype(np.float32),
    }
    expected = model.predict(inputs, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "inputs.npz", **inputs)
    run_python(
        "import numpy as np, keras\n"
        f"model = keras.models.load_model({str(tmp_path / 'model.keras')!r}, safe_mode=True)\n"
        f"inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, model.predict(inputs, verbose=0))\n",
        cwd=tmp_path,  # outside the repository: nothing of the package can be imported
    )
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6, atol=1e-7)
