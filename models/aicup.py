"""The AI CUP 2023 pathological-voice model (6th private): an MFCC CNN with an optional clinical MLP branch.

Architecture from ../shared/spec/aicup.md ("Model"), layer for layer as the team's notebooks ran it:

    MFCC (n_mfcc, 126, 1) → per-frame standardisation
      → [Conv 3×3 → CELU → BN → MaxPool 2] (16) → [Conv (3,10) → CELU → BN → MaxPool 2] (32)
      → [Conv (3,10) → CELU → BN → MaxPool 2] (64) → global average pool (64)
    clinical (44) → Dense 1024 → 256 → 128, each CELU                           (optional)
    concat (192, or 64 audio only) → Dense 128 → CELU → BN → Dense 5 → softmax

PyTorch details kept: every convolution has padding 1 (also the (3,10) ones, so time shrinks by 7),
max pooling pads 1 with −∞ (`nn.MaxPool2d(2, padding=1)`), BatchNorm momentum 0.1 / eps 1e-5, and
PyTorch's default initialisation (weights and biases uniform in ±1/√fan_in). The source's notebooks standardised
each MFCC matrix per frame with numpy before the network; here that is the first layer, so a saved member
takes raw MFCCs. The source applied `CrossEntropyLoss` to the softmax output (a softmax twice); this model
outputs probabilities and is trained with `CategoricalCrossentropy(from_logits=False)`.
"""

from __future__ import annotations

import math

import keras
from keras import initializers, layers

NUM_FRAMES = 126  # 1 s at 44.1 kHz, hop 352, centred frames: 1 + 44100 // 352
NUM_CLINICAL = 44  # the spec's clinical encoding


def _torch_default(fan_in: int):
    """PyTorch's default Conv/Linear initialisation: kaiming_uniform(a=√5) = uniform ±1/√fan_in, and the
    bias uniform ±1/√fan_in."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform"),
        "bias_initializer": initializers.RandomUniform(-bound, bound),
    }


def _batch_norm(name: str):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)  # PyTorch's momentum 0.1


def _max_pool_padded(x, name: str):
    """`nn.MaxPool2d(2, padding=1)`: 2×2 max pooling, stride 2, over the input padded by one cell of −∞.

    A window never holds only padding, so −∞ padding equals repeating the edge row and column (the max of
    a window is then its real cells' max either way). Keras has no padding layer but zeros, so the edges
    are repeated with Cropping2D and Concatenate: exact, and built from Keras layers only.
    """
    height, width = x.shape[1], x.shape[2]
    first_row = layers.Cropping2D(((0, height - 1), (0, 0)), name=f"{name}_first_row")(x)
    last_row = layers.Cropping2D(((height - 1, 0), (0, 0)), name=f"{name}_last_row")(x)
    x = layers.Concatenate(axis=1, name=f"{name}_pad_rows")([first_row, x, last_row])
    first_column = layers.Cropping2D(((0, 0), (0, width - 1)), name=f"{name}_first_column")(x)
    last_column = layers.Cropping2D(((0, 0), (width - 1, 0)), name=f"{name}_last_column")(x)
    x = layers.Concatenate(axis=2, name=f"{name}_pad_columns")([first_column, x, last_column])
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def _conv_block(x, filters: int, kernel_size: tuple[int, int], name: str):
    """Conv (padding 1) → CELU → BatchNorm → MaxPool 2 (padding 1), in the source's order."""
    fan_in = x.shape[-1] * kernel_size[0] * kernel_size[1]
    x = layers.ZeroPadding2D(1, name=f"{name}_conv_pad")(x)
    x = layers.Conv2D(filters, kernel_size, name=f"{name}_conv", **_torch_default(fan_in))(x)
    x = layers.Activation("celu", name=f"{name}_celu")(x)
    x = _batch_norm(f"{name}_bn")(x)
    return _max_pool_padded(x, name)


def _dense(x, units: int, name: str, activation: str | None = "celu"):
    return layers.Dense(units, activation=activation, name=name, **_torch_default(x.shape[-1]))(x)


def build_aicup_model(
    n_mfcc: int = 13,
    num_frames: int = NUM_FRAMES,
    num_clinical: int = NUM_CLINICAL,
    num_classes: int = 5,
    clinical: bool = True,
    conv_filters: tuple[int, int, int] = (16, 32, 64),
    clinical_units: tuple[int, ...] = (1024, 256, 128),
    head_units: int = 128,
) -> keras.Model:
    """Build the AI CUP 2023 MFCC CNN, multimodal (MFCC + clinical fields) or audio only.

    Args:
        n_mfcc: MFCC coefficients of the input (the source trained one model each for 13, 17, 21, 30, 50).
        num_frames: MFCC frames (126 for the first second at 44.1 kHz, hop 352).
        num_clinical: width of the encoded clinical vector (44).
        num_classes: disease categories (5).
        clinical: add the clinical branch and its input; False builds the audio-only model.
        conv_filters: filters of the three convolution blocks.
        clinical_units: widths of the clinical MLP.
        head_units: width of the dense layer after the concatenation.

    Returns:
        A `keras.Model` named "aicup_mfcc_cnn" (audio only: "aicup_mfcc_cnn_audio_only") whose inputs are a
        dict: `{"mfcc_<n_mfcc>": (batch, n_mfcc, num_frames, 1) raw MFCCs, "clinical": (batch, num_clinical)}`
        (audio only: just the MFCC input) and whose output is (batch, num_classes) softmax probabilities.
        The input is named after `n_mfcc`, so one dict of every variant's MFCCs feeds a whole ensemble.

    Example:
        >>> model = build_aicup_model(n_mfcc=13)
        >>> sorted(model.input.keys()), model.output_shape
        (['clinical', 'mfcc_13'], (None, 5))
    """
    if n_mfcc < 2 or num_frames < 2:
        raise ValueError(f"n_mfcc and num_frames must be at least 2, got {n_mfcc} and {num_frames}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if clinical and num_clinical < 1:
        raise ValueError(f"num_clinical must be at least 1 with the clinical branch, got {num_clinical}")
    if len(conv_filters) != 3:
        raise ValueError(f"conv_filters must give the three blocks' filters, got {conv_filters}")

    mfcc = keras.Input(shape=(n_mfcc, num_frames, 1), name=mfcc_input_name(n_mfcc))
    # The source's `(x - x.mean(axis=0)) / x.std(axis=0)` over the coefficients of each frame. Axes (1, 3)
    # rather than 1: over the single channel the statistics are the same, and Keras's PyTorch backend
    # normalises a lone middle axis wrongly (it hands it to F.layer_norm, which takes the trailing axes).
    x = layers.LayerNormalization(axis=(1, 3), center=False, scale=False, epsilon=1e-12, name="frame_standardization")(
        mfcc
    )
    for index, (filters, kernel_size) in enumerate(zip(conv_filters, ((3, 3), (3, 10), (3, 10)), strict=True)):
        x = _conv_block(x, filters, kernel_size, name=f"block{index + 1}")
    x = layers.GlobalAveragePooling2D(name="audio_pool")(x)
    inputs = {mfcc_input_name(n_mfcc): mfcc}

    if clinical:
        clinical_input = keras.Input(shape=(num_clinical,), name="clinical")
        inputs["clinical"] = clinical_input
        y = clinical_input
        for index, units in enumerate(clinical_units):
            y = _dense(y, units, name=f"clinical_dense{index + 1}")
        x = layers.Concatenate(name="concat")([x, y])

    x = _dense(x, head_units, name="head_dense")
    x = _batch_norm("head_bn")(x)
    outputs = layers.Dense(
        num_classes,
        activation="softmax",
        dtype=keras.config.dtype_policy().variable_dtype,  # float32 under the mixed policies
        name="probabilities",
        **_torch_default(head_units),
    )(x)
    return keras.Model(inputs, outputs, name="aicup_mfcc_cnn" if clinical else "aicup_mfcc_cnn_audio_only")


def mfcc_input_name(n_mfcc: int) -> str:
    """The model input (and feature dict key) of one MFCC variant."""
    return f"mfcc_{n_mfcc}"
