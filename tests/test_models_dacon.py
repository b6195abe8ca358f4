"""The DACON residual mish CNN: the source's parameter count, shapes, and loading in a fresh process."""

from __future__ import annotations

import numpy as np
import pytest

from models.dacon import build_dacon_model
from tests.conftest import run_python


def test_parameter_count_matches_the_source():
    assert build_dacon_model().count_params() == 1_914_686


def test_output_is_a_distribution_over_the_vocabulary():
    model = build_dacon_model(input_shape=(64, 101, 4), num_classes=30)
    assert model.name == "dacon_mish_resnet"
    assert model.output_shape == (None, 30)
    probabilities = model.predict(np.random.default_rng(0).normal(size=(3, 64, 101, 4)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_mish_activations_and_source_structure():
    model = build_dacon_model()
    activations = {
        layer.get_config()["activation"] for layer in model.layers if layer.__class__.__name__ == "Activation"
    }
    assert activations == {"mish"}
    assert sum(layer.__class__.__name__ == "Add" for layer in model.layers) == 6  # 5 stages + head
    assert sum(layer.__class__.__name__ == "Dropout" for layer in model.layers) == 7
    assert all(layer.rate == 0.5 for layer in model.layers if layer.__class__.__name__ == "Dropout")


@pytest.mark.parametrize("arguments", [{"input_shape": (64, 101)}, {"num_classes": 1}, {"dropout": 1.0}])
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError):
        build_dacon_model(**arguments)


def test_saved_model_loads_in_a_fresh_process_in_safe_mode(tmp_path):
    model = build_dacon_model()
    inputs = np.random.default_rng(1).normal(size=(2, 64, 101, 4)).astype(np.float32)
    expected = model.predict(inputs, verbose=0)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "inputs.npy", inputs)
    run_python(
        "import numpy as np, keras\n"
        f"model = keras.models.load_model({str(tmp_path / 'model.keras')!r}, safe_mode=True)\n"
        f"inputs = np.load({str(tmp_path / 'inputs.npy')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, model.predict(inputs, verbose=0))\n",
        cwd=tmp_path,  # outside the repository: nothing of the package can be imported
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
