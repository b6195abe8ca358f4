"""The MAIC mini-ResNet: two inputs, the source's structure, and loading in a fresh process."""

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
    assert layers["stage1_block2_conv2"].filters == 192 and layers["stage2_block2_conv2"].filters == 256
    assert sum(layer.__class__.__name__ == "Add" for layer in model.layers) == 4  # 2 stages × 2 blocks
    dropouts = [layer for layer in model.layers if layer.__class__.__name__ == "Dropout"]
    assert [layer.rate for layer in dropouts] == [0.2, 0.2]
    assert layers["fc1"].units == 64 and layers["fc2"].units == 32
    assert layers["concat_aux"].output.shape == (None, 66)  # FC 64 + [sex, age]


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
