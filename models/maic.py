"""The MAIC 2021 voice-pathology "mini-ResNet" (1st place), a two-input Keras functional model.

Main input: a token's mel spectrogram (128 mel bands × 64 frames × 1), resized to 256 bands inside the
model (the source's input was [mel=256, time=64] although its CSVs have 128 rows); auxiliary input:
[sex, normalised age]. Facts: shared/spec/maic.md, "Model".
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers


def residual_block(x, filters: int, *, stride: int = 1, name: str):
    """A ResNet basic block: conv3×3-BN-ReLU-conv3×3-BN plus the shortcut (a 1×1 convolution and BN where
    the channel count or the stride changes), then ReLU."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_projection")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_projection_bn")(shortcut)
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = layers.Activation("relu", name=f"{name}_relu1")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(x)


def build_maic_model(
    mel_bins: int = 128,
    frames: int = 64,
    resized_mel_bins: int = 256,
    aux_features: int = 2,
    num_classes: int = 21,
    stem_filters: int = 128,
    stage_filters: Sequence[int] = (192, 256),
    blocks_per_stage: int = 2,
    stage_strides: Sequence[int] = (1, 2),
    dropout: float = 0.2,
    dense_units: Sequence[int] = (64, 32),
) -> keras.Model:
    """The mini-ResNet of the MAIC 2021 1st-place solution.

    Conv 7×7 (`stem_filters`, stride 2) + BN + ReLU → 2×2 max-pool → for each stage `blocks_per_stage`
    residual blocks of `stage_filters[i]` channels (the first with `stage_strides[i]`) and dropout →
    global average pooling → Dense(`dense_units[0]`, ReLU) → concatenate the auxiliary input →
    Dense(`dense_units[1]`, ReLU) → Dense(`num_classes`, softmax).

    Args:
        mel_bins: mel bands of the input (the CSV's 128 rows).
        frames: frames per token (64).
        resized_mel_bins: height after a bilinear `Resizing` inside the model (256, the source's input);
            equal to `mel_bins` for no resizing.
        aux_features: length of the auxiliary input ([sex, normalised age]).
        num_classes: sub-classes (21: diagnosis × sex × age band combinations found in the data).
        stem_filters: channels of the 7×7 stem convolution (128).
        stage_filters: channels of the residual stages (192, 256).
        blocks_per_stage: residual blocks per stage (2).
        stage_strides: stride of each stage's first block (our choice: (1, 2), ResNet's halving at the
            second stage; the source does not say).
        dropout: dropout rate after each stage (0.2).
        dense_units: the two fully connected layers around the concatenation (64, 32).

    Returns:
        A `keras.Model` named "maic_mini_resnet" with inputs {"mel": (batch, mel_bins, frames, 1),
        "aux": (batch, aux_features)} and a (batch, num_classes) softmax output.

    Example:
        >>> model = build_maic_model()
        >>> model.output_shape
        (None, 21)
    """
    for name, value in (
        ("mel_bins", mel_bins),
        ("frames", frames),
        ("resized_mel_bins", resized_mel_bins),
        ("aux_features", aux_features),
        ("stem_filters", stem_filters),
        ("blocks_per_stage", blocks_per_stage),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(stage_filters) != len(stage_strides) or not stage_filters:
        raise ValueError(
            f"stage_filters {list(stage_filters)} and stage_strides {list(stage_strides)} need one value per stage"
        )
    if len(dense_units) != 2:
        raise ValueError(f"dense_units needs two values (before and after the concatenation), got {dense_units}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    mel = keras.Input((mel_bins, frames, 1), name="mel")
    aux = keras.Input((aux_features,), name="aux")
    x = mel
    if resized_mel_bins != mel_bins:
        x = layers.Resizing(resized_mel_bins, frames, interpolation="bilinear", name="mel_resize")(x)
    x = layers.Conv2D(stem_filters, 7, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for stage, (filters, stride) in enumerate(zip(stage_filters, stage_strides, strict=True), start=1):
        for block in range(1, blocks_per_stage + 1):
            x = residual_block(x, filters, stride=stride if block == 1 else 1, name=f"stage{stage}_block{block}")
        x = layers.Dropout(dropout, name=f"stage{stage}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(dense_units[0], activation="relu", name="fc1")(x)
    x = layers.Concatenate(name="concat_aux")([x, aux])
    x = layers.Dense(dense_units[1], activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="subclass")(x)
    return keras.Model({"mel": mel, "aux": aux}, outputs, name="maic_mini_resnet")
