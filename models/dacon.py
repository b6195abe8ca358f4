"""The DACON overlapping-speech 3rd-place model: a residual CNN with mish activations.

Architecture from the 3rd-place blog post's Keras 2 code (`build_fn`), layer for layer: the same layers in
the same order, so the weights of one copy into the other (tests/test_models_dacon.py ports `build_fn` and
checks that). With the source's input (64 mels, 101 frames, 4 resolutions) it has 1,914,686 parameters.
"""

from __future__ import annotations

import keras
from keras import layers


def _conv_bn(x, filters: int, kernel_size: int, name: str):
    """Conv2D followed by BatchNormalization (the source's "CB" pair)."""
    x = layers.Conv2D(filters, kernel_size, padding="same", kernel_initializer="he_normal", name=f"{name}_conv")(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def _bottleneck(x, mid_filters: int, out_filters: int, name: str):
    """Conv1x1(m) → Conv3x3(m) → Conv1x1(f) → BN, with no activation in between (as in the source)."""
    for index, (filters, kernel_size) in enumerate(((mid_filters, 1), (mid_filters, 3), (out_filters, 1))):
        x = layers.Conv2D(
            filters, kernel_size, padding="same", kernel_initializer="he_normal", name=f"{name}_conv{index}"
        )(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def _residual_stage(x, unit, dropout: float, name: str):
    """unit → keep r → mish → unit → mish → unit → add r → mish → AveragePooling(2) → Dropout."""
    x = unit(x, f"{name}_unit0")
    residual = x
    x = layers.Activation("mish", name=f"{name}_act0")(x)
    x = unit(x, f"{name}_unit1")
    x = layers.Activation("mish", name=f"{name}_act1")(x)
    x = unit(x, f"{name}_unit2")
    x = layers.Add(name=f"{name}_add")([x, residual])
    x = layers.Activation("mish", name=f"{name}_act2")(x)
    x = layers.AveragePooling2D(2, name=f"{name}_pool")(x)
    return layers.Dropout(dropout, name=f"{name}_dropout")(x)


def build_dacon_model(
    input_shape: tuple[int, int, int] = (64, 101, 4),
    num_classes: int = 30,
    plain_filters: tuple[int, ...] = (32, 64, 128),
    bottleneck_filters: tuple[tuple[int, int], ...] = ((64, 256), (128, 512)),
    dense_units: int = 128,
    dropout: float = 0.5,
) -> keras.Model:
    """Build the DACON residual mish CNN.

    Args:
        input_shape: (mels, frames, resolutions) of the stacked log-mel input.
        num_classes: size of the vocabulary; the output is a softmax distribution over it.
        plain_filters: filters of the three plain residual stages (3×3 Conv-BN units).
        bottleneck_filters: (inner, outer) filters of the two bottleneck stages.
        dense_units: width of the two dense layers of the residual head.
        dropout: dropout rate, used after every stage and in the head.

    Returns:
        A `keras.Model` named "dacon_mish_resnet".

    Example:
        >>> model = build_dacon_model()
        >>> model.output_shape
        (None, 30)
        >>> model.count_params()
        1914686
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (mels, frames, channels) of positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    inputs = keras.Input(shape=input_shape, name="log_mel")
    x = inputs
    for index, filters in enumerate(plain_filters):
        x = _residual_stage(x, lambda y, name, f=filters: _conv_bn(y, f, 3, name), dropout, name=f"stage{index + 1}")
    for index, (mid_filters, out_filters) in enumerate(bottleneck_filters, start=len(plain_filters) + 1):
        x = _residual_stage(
            x, lambda y, name, m=mid_filters, f=out_filters: _bottleneck(y, m, f, name), dropout, f"stage{index}"
        )

    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, kernel_initializer="he_normal", name="head_dense0")(x)
    x = layers.BatchNormalization(name="head_bn0")(x)
    residual = x
    x = layers.Activation("mish", name="head_act0")(x)
    x = layers.Dropout(dropout, name="head_dropout0")(x)
    x = layers.Dense(dense_units, kernel_initializer="he_normal", name="head_dense1")(x)
    x = layers.BatchNormalization(name="head_bn1")(x)
    x = layers.Add(name="head_add")([x, residual])
    x = layers.Activation("mish", name="head_act1")(x)
    x = layers.Dropout(dropout, name="head_dropout1")(x)
    # The output in the variables' dtype (float32 under the mixed policies), so the KL loss stays exact.
    output_dtype = keras.config.dtype_policy().variable_dtype
    outputs = layers.Dense(num_classes, activation="softmax", dtype=output_dtype, name="probabilities")(x)
    return keras.Model(inputs, outputs, name="dacon_mish_resnet")
