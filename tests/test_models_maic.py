"""The MAIC mini-ResNet: two inputs, the write-up's model diagram (ported to PyTorch and compared bit for bit),
the BatchNormalization and stride options, and loading in a fresh process."""

from __future__ import annotations

import numpy as np
import pytest

from models.maic import build_maic_model
from tests.conftest import run_python

SMALL = {"stem_filters": 8, "stage_filters": (8, 16), "dense_units": (16, 8)}


def _inputs(batch=3, mel_bins=128, frames=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "mel": rng.normal(size=(batch, mel_bins, frames, 1)).astype(np.float32),
        "aux": rng.uniform(size=(batch, 2)).astype(np.float32),
    }


def test_two_inputs_and_a_distribution_over_the_sub_classes():
    model = build_maic_model(**SMALL)
    assert model.name == "maic_mini_resnet"
    assert [tensor.shape for tensor in model.inputs] in (
        [(None, 128, 64, 1), (None, 2)],
        [(None, 2), (None, 128, 64, 1)],
    )
    assert model.output_shape == (None, 21)
    probabilities = model.predict(_inputs(), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_source_structure_resize_stages_dropout_and_head():
    model = build_maic_model()
    layers = {layer.name: layer for layer in model.layers}
    assert layers["mel_resize"].get_config()["height"] == 256  # 128 CSV rows → the source's 256
    assert layers["stem_conv"].kernel_size == (7, 7) and layers["stem_conv"].strides == (2, 2)
    assert layers["stem_conv"].filters == 128
    assert layers["stem_conv_pad"].padding == ((3, 3), (3, 3))  # PyTorch's padding=3, not Keras's "same" (2, 3)
    assert layers["stage1_block2_conv2"].filters == 192 and layers["stage2_block2_conv2"].filters == 256
    residual_convolutions = [layer for name, layer in layers.items() if name.startswith("stage") and "conv" in name]
    assert len(residual_convolutions) == 8 and all(layer.strides == (1, 1) for layer in residual_convolutions)
    assert sum(layer.__class__.__name__ == "Add" for layer in model.layers) == 4  # 2 stages × 2 blocks
    dropouts = [layer for layer in model.layers if layer.__class__.__name__ == "Dropout"]
    assert [layer.rate for layer in dropouts] == [0.2, 0.2]
    assert layers["fc1"].units == 64 and layers["fc2"].units == 32
    assert layers["concat_aux"].output.shape == (None, 66)  # FC 64 + [sex, age]


def test_batch_norm_option_is_resnets_layout():
    """Off (the diagram): every convolution has a bias and nothing normalises. On: a BatchNormalization after
    each convolution, which loses its bias."""
    import keras

    plain, normalised = build_maic_model(**SMALL), build_maic_model(batch_norm=True, **SMALL)

    def convolutions(model):
        return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    def batch_norms(model):
        return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]

    assert all(layer.use_bias for layer in convolutions(plain)) and not batch_norms(plain)
    assert not any(layer.use_bias for layer in convolutions(normalised))
    # Each convolution (stem, 8 in the blocks, the projections) feeds its own BatchNormalization.
    assert {id(layer.output) for layer in convolutions(normalised)} == {
        id(layer.input) for layer in batch_norms(normalised)
    }
    assert len(batch_norms(normalised)) == len(convolutions(plain))
    # Per channel a BatchNormalization adds 4 weights (γ, β, mean, variance) where the bias was 1.
    channels = sum(layer.filters for layer in convolutions(plain))
    assert normalised.count_params() - plain.count_params() == 3 * channels


def test_stage_strides_option_halves_the_second_stage():
    default = build_maic_model(**SMALL)
    halved = build_maic_model(stage_strides=(1, 2), **SMALL)
    assert default.get_layer("stage2_block2_out").output.shape[1:3] == (64, 16)
    assert halved.get_layer("stage2_block2_out").output.shape[1:3] == (32, 8)
    assert halved.get_layer("stage2_block1_projection").strides == (2, 2)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_strided_convolutions_pad_as_pytorch(kernel_size):
    """`conv2d` at stride 2 equals PyTorch's Conv2d(padding=kernel_size // 2), bit for bit: small integer
    inputs and weights of ±1/2 make every sum exact in float32."""
    torch = pytest.importorskip("torch")
    import keras

    from models.maic import conv2d

    inputs = keras.Input((8, 6, 2))
    model = keras.Model(inputs, conv2d(inputs, 3, kernel_size, strides=2, name="conv"))
    rng = np.random.default_rng(kernel_size)
    layer = model.get_layer("conv")
    layer.kernel.assign(rng.integers(-1, 2, layer.kernel.shape) / 2)
    layer.bias.assign(rng.integers(-2, 3, 3) / 4)
    x = rng.integers(-4, 5, (2, 8, 6, 2)).astype(np.float32)
    reference = torch.nn.Conv2d(2, 3, kernel_size, stride=2, padding=kernel_size // 2)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(np.asarray(layer.kernel).transpose(3, 2, 0, 1)))
        reference.bias.copy_(torch.from_numpy(np.asarray(layer.bias)))
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


def test_the_auxiliary_input_changes_the_output():
    model = build_maic_model(**SMALL)
    inputs = _inputs()
    changed = {**inputs, "aux": inputs["aux"] + 1.0}
    assert not np.allclose(model.predict(inputs, verbose=0), model.predict(changed, verbose=0))


def test_no_resizing_when_the_heights_match():
    model = build_maic_model(resized_mel_bins=128, **SMALL)
    assert "mel_resize" not in {layer.name for layer in model.layers}


@pytest.mark.parametrize(
    "arguments",
    [{"num_classes": 1}, {"dropout": 1.0}, {"stage_filters": (8,), "stage_strides": (1, 2)}, {"dense_units": (8,)}],
)
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError):
        build_maic_model(**arguments)


def test_saved_model_loads_in_a_fresh_process_in_safe_mode(tmp_path):
    model = build_maic_model(**SMALL)
    inputs = _inputs(seed=1)
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
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


# --- the write-up's model diagram, ported layer by layer --------------------------------------------


def _diagram_reference(torch):
    """The mini-ResNet as the write-up's model diagram draws it, in PyTorch (the source's framework), written
    from the diagram alone: what is drawn, with PyTorch's defaults (biases) for what is not."""
    from torch import nn

    class ResidualBlock(nn.Module):
        """Two 3×3 convolutions, stride 1 ("/1"), a ReLU between; the sum with the input, then ReLU. The
        diagram draws the shortcut as a line; where the channels change it has to be a 1×1 projection."""

        def __init__(self, in_channels, channels):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1)
            self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
            self.projection = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else nn.Identity()

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.projection(x))

    class DiagramMiniResNet(nn.Module):
        def __init__(self, classes=21):
            super().__init__()
            self.stem = nn.Conv2d(1, 128, 7, stride=2, padding=3)  # "7x7 Conv 2d, 128, /2", ReLU
            self.pool = nn.MaxPool2d(2, stride=2)  # "2x2 Maxpool 2d, /2"
            self.stage192 = nn.Sequential(ResidualBlock(128, 192), ResidualBlock(192, 192), nn.Dropout(0.2))
            self.stage256 = nn.Sequential(ResidualBlock(192, 256), ResidualBlock(256, 256), nn.Dropout(0.2))
            self.fc64 = nn.Linear(256, 64)  # "64 FC": no ReLU drawn
            self.fc32 = nn.Linear(64 + 2, 32)  # [sex, normalized age] joined before it; ReLU after
            self.output = nn.Linear(32, classes)  # "21 Final Output"

        def forward(self, mel, aux):
            """Logits for a batch of (batch, 1, 256, 64) spectrograms and (batch, 2) [sex, age]."""
            x = self.pool(torch.relu(self.stem(mel)))
            self.feature_map = self.stage256(self.stage192(x))
            x = self.feature_map.mean((2, 3))  # "Averpool 2d" over the whole map
            x = torch.cat([self.fc64(x), aux], 1)
            return self.output(torch.relu(self.fc32(x)))

    return DiagramMiniResNet()


def _copy_weights(model, reference, torch) -> int:
    """The Keras model's weights into the reference, layer by layer; returns how many tensors were copied."""
    modules = {"stem_conv": reference.stem, "fc1": reference.fc64, "fc2": reference.fc32}
    modules["subclass"] = reference.output
    for stage, sequence in ((1, reference.stage192), (2, reference.stage256)):
        for block in (1, 2):
            name, module = f"stage{stage}_block{block}", sequence[block - 1]
            modules[f"{name}_conv1"], modules[f"{name}_conv2"] = module.conv1, module.conv2
            if isinstance(module.projection, torch.nn.Conv2d):
                modules[f"{name}_projection"] = module.projection
    with torch.no_grad():
        for name, module in modules.items():
            kernel, bias = (np.asarray(weight) for weight in model.get_layer(name).weights)
            # Keras: (height, width, in, out) and (in, out); PyTorch: (out, in, height, width) and (out, in).
            module.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T))
            module.bias.copy_(torch.from_numpy(bias))
    return 2 * len(modules)


def _set_exact_weights(model, rng) -> None:
    """Weights with which float64 computes every layer exactly: each unit sums 8 of its inputs with weights
    ±1/2 (the rest 0) and a bias in {-1/4, -3/16, ..., 1/4}.

    With integer inputs in [-4, 4] every value is then a multiple of 2^-25 (the resize's lerps 2^-2, the
    biases 2^-4, then 1/2 per weighted layer and 1/1024 for the mean) and smaller than 2^27 (8 terms of 1/2
    at most quadruple a bound and the bias adds 1/4, a residual sum adds its two bounds: < 2^21 after the
    last block, < 2^31 for the mean's sum on a 2^-12 grid, < 2^27 for the logits on a 2^-25 grid). Every
    partial sum so fits float64's 53 bits whatever the summation order: both frameworks compute exactly.
    """
    for layer in model.layers:
        if not hasattr(layer, "kernel"):
            continue
        kernel = np.zeros(layer.kernel.shape).reshape(-1, layer.kernel.shape[-1])
        for unit in range(kernel.shape[1]):
            kernel[rng.choice(kernel.shape[0], 8, replace=False), unit] = rng.choice([-0.5, 0.5], 8)
        layer.kernel.assign(kernel.reshape(layer.kernel.shape))
        layer.bias.assign(rng.integers(-4, 5, layer.bias.shape) / 16)


@pytest.fixture
def float64_layers():
    """Keras layers built in float64 for the duration of a test (the global dtype policy restored after)."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def test_under_mixed_bfloat16_the_layers_compute_in_bfloat16_and_the_probabilities_are_float32():
    import keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_maic_model(**SMALL)
    finally:
        keras.config.set_dtype_policy(policy)
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    probabilities = model.predict(_inputs(), verbose=0)
    assert probabilities.dtype == np.float32
    # The output layer computes in float32 (its bfloat16 inputs are exact in float32): 21 probabilities, each
    # rounded to float32 and summed in float32, are within 21 float32 epsilons of 1.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=21 * np.finfo(np.float32).eps)


def test_the_builder_computes_the_write_ups_model_diagram(float64_layers):
    """The package's defaults against an independent PyTorch port of the diagram: the same parameters, the
    same 64 × 16 map after the last residual block, and the same logits, bit for bit, on the same inputs and
    weights: with `_set_exact_weights` nothing is rounded (the resize's 1/4 and 3/4 lerps of integers are
    exact even in the float32 TensorFlow resizes in). The softmax is then all that differs: its own roundings
    move p by at most (|z - max z| + C + 8)·u relative (the shift, exp, a sum of C = 21 terms, the division;
    u = 2^-53), in each framework.
    """
    torch = pytest.importorskip("torch")
    import keras

    model = build_maic_model()
    assert model.get_layer("stage2_block2_out").output.shape == (None, 64, 16, 256)  # 256 × 64 → /2 → /2
    assert model.get_layer("fc1").activation is keras.activations.linear
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    rng = np.random.default_rng(3)
    _set_exact_weights(model, rng)
    reference = _diagram_reference(torch).double().eval()
    assert _copy_weights(model, reference, torch) == len(model.weights)
    assert sum(parameter.numel() for parameter in reference.parameters()) == model.count_params() == 3_530_005

    mel = rng.integers(-4, 5, size=(2, 128, 64, 1)).astype(np.float64)
    aux = np.array([[1.0, 0.625], [0.0, 0.375]])  # [sex, age / 100]
    features_and_output = keras.Model(model.inputs, [model.get_layer("fc2").output, model.output])
    with keras.device("cpu:0"):  # a GPU may convolve by FFT, which is not exact
        features, probabilities = (np.asarray(x) for x in features_and_output({"mel": mel, "aux": aux}))
    kernel, bias = (np.asarray(weight) for weight in model.get_layer("subclass").weights)
    logits = features @ kernel + bias  # the output layer's sum, exact as well
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(mel.transpose(0, 3, 1, 2)), size=(256, 64), mode="bilinear", align_corners=False
        )  # the CSV's 128 rows to the diagram's 256, as the package reads the input
        expected = reference(resized, torch.from_numpy(aux)).numpy()
    assert tuple(reference.feature_map.shape[2:]) == (64, 16)
    np.testing.assert_array_equal(logits, expected)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # the inputs reach the logits: the check has teeth
    expected_probabilities = torch.softmax(torch.from_numpy(expected), 1).numpy()
    shift = expected.max(axis=1, keepdims=True) - expected
    tolerance = 2 * (shift + expected.shape[1] + 8) * 2.0**-53 * expected_probabilities  # both softmaxes
    assert (np.abs(probabilities - expected_probabilities) <= tolerance).all()
