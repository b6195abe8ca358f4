"""The MAIC 2021 voice-pathology "mini-ResNet" (1st place), a two-input Keras functional model.

Main input: a token's mel spectrogram (128 mel bands × 64 frames × 1), resized to 256 bands inside the
model (the write-up's input is [mel=256, time=64] although its CSVs have 128 rows); auxiliary input:
[sex, normalised age]. The layers are those of the write-up's model diagram: every convolution is drawn
without BatchNormalization and every residual convolution with stride 1 ("/1"); BatchNormalization and a
second-stage stride are options.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers


def conv2d(x, filters: int, kernel_size: int, *, strides: int = 1, use_bias: bool = True, name: str):
    """A convolution padded as PyTorch's `Conv2d(padding=kernel_size // 2)` pads it: symmetrically.

    At stride 1 that is Keras's "same". At stride 2 on an even size Keras's "same" pads one row and column
    less before than after (7×7: 2 and 3 instead of 3 and 3), which shifts every output by one pixel, so
    there the padding is explicit (a `ZeroPadding2D` named `<name>_pad`).

    Args:
        x: the input tensor (batch, height, width, channels).
        filters: output channels.
        kernel_size: an odd square kernel's side.
        strides: the stride along both axes.
        use_bias: whether the convolution adds a bias.
        name: the convolution's layer name.
    """
    if strides == 1 or kernel_size == 1:
        return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=use_bias, name=name)(x)
    x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return layers.Conv2D(filters, kernel_size, strides=strides, use_bias=use_bias, name=name)(x)


def residual_block(x, filters: int, *, stride: int = 1, batch_norm: bool = False, name: str):
    """A ResNet basic block: conv3×3-ReLU-conv3×3 plus the shortcut, then ReLU; with `batch_norm`, a
    BatchNormalization after each convolution (and the convolutions lose their now redundant biases).

    The shortcut is the identity, or a 1×1 convolution (and BatchNormalization) where the channel count or
    the stride changes: the diagram draws the shortcut as a line, but a sum of 128 and 192 channels needs one.
    """

    def normalised(y, suffix):
        return layers.BatchNormalization(name=f"{name}_{suffix}")(y) if batch_norm else y

    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv2d(x, filters, 1, strides=stride, use_bias=not batch_norm, name=f"{name}_projection")
        shortcut = normalised(shortcut, "projection_bn")
    x = conv2d(x, filters, 3, strides=stride, use_bias=not batch_norm, name=f"{name}_conv1")
    x = layers.Activation("relu", name=f"{name}_relu1")(normalised(x, "bn1"))
    x = conv2d(x, filters, 3, use_bias=not batch_norm, name=f"{name}_conv2")
    x = layers.Add(name=f"{name}_add")([normalised(x, "bn2"), shortcut])
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
    stage_strides: Sequence[int] = (1, 1),
    batch_norm: bool = False,
    dropout: float = 0.2,
    dense_units: Sequence[int] = (64, 32),
) -> keras.Model:
    """The mini-ResNet of the MAIC 2021 1st-place solution, as the write-up's model diagram draws it.

    Conv 7×7 (`stem_filters`, stride 2, padding 3) + ReLU → 2×2 max-pool (stride 2) → for each stage
    `blocks_per_stage` residual blocks of `stage_filters[i]` channels (the first with `stage_strides[i]`)
    and dropout → global average pooling → Dense(`dense_units[0]`, no activation) → concatenate the
    auxiliary input → Dense(`dense_units[1]`, ReLU) → Dense(`num_classes`, softmax). With the defaults a
    128 × 64 token (256 × 64 after the resize) leaves the last residual block as a 64 × 16 × 256 map.

    Args:
        mel_bins: mel bands of the input (the CSV's 128 rows).
        frames: frames per token (64).
        resized_mel_bins: height after a bilinear `Resizing` inside the model (256, the diagram's input);
            equal to `mel_bins` for no resizing.
        aux_features: length of the auxiliary input ([sex, normalised age]).
        num_classes: sub-classes (21: diagnosis × sex × age band combinations found in the data).
        stem_filters: channels of the 7×7 stem convolution (128).
        stage_filters: channels of the residual stages (192, 256).
        blocks_per_stage: residual blocks per stage (2).
        stage_strides: stride of each stage's first block ((1, 1): the diagram draws every residual
            convolution "/1"; (1, 2) halves the map at the second stage as ResNet does, 4× fewer operations there).
        batch_norm: a BatchNormalization after every convolution, which then has no bias (False: the
            diagram draws no normalisation, and the convolutions keep the biases PyTorch gives them by
            default; True: ResNet's layout).
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
    x = conv2d(x, stem_filters, 7, strides=2, use_bias=not batch_norm, name="stem_conv")
    if batch_norm:
        x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for stage, (filters, stride) in enumerate(zip(stage_filters, stage_strides, strict=True), start=1):
        for block in range(1, blocks_per_stage + 1):
            x = residual_block(
                x,
                filters,
                stride=stride if block == 1 else 1,
                batch_norm=batch_norm,
                name=f"stage{stage}_block{block}",
            )
        x = layers.Dropout(dropout, name=f"stage{stage}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(dense_units[0], name="fc1")(x)  # the diagram draws no ReLU after FC 64
    x = layers.Concatenate(name="concat_aux")([x, aux])
    x = layers.Dense(dense_units[1], activation="relu", name="fc2")(x)
    # The output in the variables' dtype (float32 under the mixed policies): the focal loss, the validation
    # score and the saved predictions get full-precision probabilities, as Keras's mixed-precision guide asks.
    output_dtype = keras.config.dtype_policy().variable_dtype
    outputs = layers.Dense(num_classes, activation="softmax", dtype=output_dtype, name="subclass")(x)
    return keras.Model({"mel": mel, "aux": aux}, outputs, name="maic_mini_resnet")
