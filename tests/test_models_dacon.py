"""The DACON residual mish CNN: the source's own model code, its parameter count, and loading in a fresh process."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from keras.layers import Activation, Add, AveragePooling2D, BatchNormalization, Dense, Dropout, Flatten, Input
from keras.layers import Conv2D as Convolution2D
from keras.models import Model

from models.dacon import build_dacon_model
from tests.conftest import run_python


def mish(x):
    return x * ops.tanh(ops.softplus(x))


def source_build_fn(input_shape=(64, 101, 4)):
    """The blog's `build_fn`, line for line, in Keras 3: its `K.tanh`/`K.softplus` are `keras.ops` here, its
    `AveragePooling2D()` spells out Keras 2's default pool size (2, 2), which Keras 3 requires, its
    `Xtrain_dbmel.shape[1:]` is `input_shape`, and the compile call is left out."""
    dropout_rate = 0.5

    model_in = Input(shape=(input_shape))
    x = Convolution2D(32, 3, padding="same", kernel_initializer="he_normal")(model_in)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Convolution2D(32, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Activation(mish)(x)
    x = Convolution2D(32, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x, x_res])
    x = Activation(mish)(x)
    x = AveragePooling2D((2, 2))(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Activation(mish)(x)
    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x, x_res])
    x = Activation(mish)(x)
    x = AveragePooling2D((2, 2))(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Activation(mish)(x)
    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x, x_res])
    x = Activation(mish)(x)
    x = AveragePooling2D((2, 2))(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Convolution2D(64, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(256, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Convolution2D(64, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(256, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Activation(mish)(x)
    x = Convolution2D(64, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(64, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(256, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x, x_res])
    x = Activation(mish)(x)
    x = AveragePooling2D((2, 2))(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Convolution2D(128, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(512, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Convolution2D(128, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(512, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Activation(mish)(x)
    x = Convolution2D(128, 1, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(128, 3, padding="same", kernel_initializer="he_normal")(x)
    x = Convolution2D(512, 1, padding="same", kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x, x_res])
    x = Activation(mish)(x)
    x = AveragePooling2D((2, 2))(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Flatten()(x)

    x = Dense(units=128, kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x_res = x
    x = Activation(mish)(x)
    x = Dropout(rate=dropout_rate)(x)

    x = Dense(units=128, kernel_initializer="he_normal")(x)
    x = BatchNormalization()(x)
    x = Add()([x_res, x])
    x = Activation(mish)(x)
    x = Dropout(rate=dropout_rate)(x)

    model_out = Dense(units=30, activation="softmax")(x)
    model = Model(model_in, model_out)
    return model


def _with_weights(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer.weights]


def test_builder_equals_the_sources_model_code():
    """The blog's model and ours, given the same weights, give the same bits on the same inputs."""
    keras.utils.set_random_seed(0)
    ours = build_dacon_model()
    source = source_build_fn()
    assert ours.count_params() == source.count_params() == 1_914_686
    rng = np.random.default_rng(0)
    for layer in _with_weights(ours):  # non-trivial BatchNormalization: random scale, shift and statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape  # gamma, beta, moving mean, moving variance
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, shape),
                    rng.normal(0, 0.2, shape),
                    rng.normal(0, 0.2, shape),
                    rng.uniform(0.5, 2, shape),
                ]
            )
    pairs = list(zip(_with_weights(ours), _with_weights(source), strict=True))
    for our_layer, source_layer in pairs:  # the same layers with weights, in the same order and shapes
        assert type(our_layer) is type(source_layer)
        source_layer.set_weights(our_layer.get_weights())
    inputs = rng.normal(size=(4, 64, 101, 4)).astype(np.float32)
    # The same operations on the same numbers in the same order (a + b = b + a exactly, for the head's Add
    # whose inputs the blog lists the other way round): the outputs are equal bit for bit.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ours(inputs, training=False)), ops.convert_to_numpy(source(inputs, training=False))
    )


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
