"""DCASE 2020 Task 2 machine-ID classifiers: torchvision's ResNet-50 layout on 1-channel log-mel spectrograms.

The write-up started from torchvision's resnet50 code (7×7/2 stem, BN, ReLU, 3×3/2 max-pool, stages of 3, 4,
6, 3 units at widths 64, 128, 256, 512 and strides 1, 2, 2, 2, torchvision's padding) and

- `build_resnet50_softmax`: kept its bottleneck blocks (1×1, 3×3, 1×1 ×4) + global average pooling + softmax
  for plain cross-entropy;
- `build_ir_resnet50_margin`: for the margin losses, swapped the bottleneck for the ArcFace paper's "IR" unit
  (BN-Conv-BN-PReLU-Conv-BN + shortcut) and global pooling for the embedding head BN-Dropout-FC-BN (2048-d),
  then the ArcFace/CosFace `CosineMarginClassifier`, which takes the labels as a second input at training time.

Depth: IR units in torchvision's resnet50 stages (3-4-6-3, the default and the write-up's most literal reading)
make a 34-layer network, 63,323,008 trainable parameters at the default input (128 × 313) with 41 IDs, of
which 41.9 M are the head's FC on the flattened 512 × 4 × 10 map; the ArcFace paper's own IR-50 has 3-4-14-3
units (`blocks=(3, 4, 14, 3)`: 72,774,528). tests/test_models_dcase.py builds both and holds an independent
PyTorch port of the IR network that gives the same outputs with the same weights.

`inference_model` turns either trained model into the saved ensemble member: built-in layers only
(probabilities = softmax(s · cos θ) via UnitNormalization + Dense, and the embedding as a second output),
so it loads in a process that has never imported this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from replicate.layers import CosineMarginClassifier

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


def _check(input_shape, num_classes, blocks, width):
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (mels, frames, channels) of positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"blocks must be four positive unit counts (ResNet-50: 3, 4, 6, 3), got {blocks}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")


def _conv(x, filters: int, kernel_size: int, stride: int, name: str):
    """A bias-free convolution padded as torchvision's: kernel_size // 2 cells on every side.

    For stride 1 that is Keras's "same". For stride 2 on an even size "same" pads only after (bottom, right),
    which samples the grid one cell off PyTorch's; the padding is then explicit (same output size).
    """
    if stride > 1 and kernel_size > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        return layers.Conv2D(filters, kernel_size, strides=stride, use_bias=False, name=name)(x)
    return layers.Conv2D(filters, kernel_size, strides=stride, padding="same", use_bias=False, name=name)(x)


def _stem(x, width: int):
    """torchvision's stem: 7×7/2 convolution (padding 3), BN, ReLU, 3×3/2 max-pool (padding 1).

    torchvision pads the max-pool with −∞; after the ReLU every value is ≥ 0 and every window holds a real
    cell, so zero padding gives the same maxima.
    """
    x = _conv(x, width, 7, 2, "stem_conv")
    x = layers.BatchNormalization(epsilon=1e-5, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_act")(x)
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


def _prelu(x, name: str):
    """One slope per channel starting at 0.25, as PyTorch's nn.PReLU(channels) in the IR unit."""
    return layers.PReLU(shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name=name)(x)


def _shortcut(x, filters: int, stride: int, name: str):
    """torchvision's `downsample` where the shape changes: 1×1 convolution (stride), BN; else the identity."""
    if x.shape[-1] == filters and stride == 1:
        return x
    x = _conv(x, filters, 1, stride, f"{name}_shortcut_conv")
    return layers.BatchNormalization(epsilon=1e-5, name=f"{name}_shortcut_bn")(x)


def _bottleneck(x, width: int, stride: int, name: str):
    """torchvision Bottleneck: 1×1(w) BN ReLU, 3×3(w, stride) BN ReLU, 1×1(4w) BN, + shortcut, ReLU."""
    shortcut = _shortcut(x, 4 * width, stride, name)
    x = _conv(x, width, 1, 1, f"{name}_conv1")
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn1")(x)
    x = layers.Activation("relu", name=f"{name}_relu1")(x)
    x = _conv(x, width, 3, stride, f"{name}_conv2")
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn2")(x)
    x = layers.Activation("relu", name=f"{name}_relu2")(x)
    x = _conv(x, 4 * width, 1, 1, f"{name}_conv3")
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn3")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _ir_unit(x, width: int, stride: int, name: str):
    """ArcFace "IR" unit: BN, 3×3(w), BN, PReLU, 3×3(w, stride), BN, + shortcut (no activation after)."""
    shortcut = _shortcut(x, width, stride, name)
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn1")(x)
    x = _conv(x, width, 3, 1, f"{name}_conv1")
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn2")(x)
    x = _prelu(x, f"{name}_prelu")
    x = _conv(x, width, 3, stride, f"{name}_conv2")
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn3")(x)
    return layers.Add(name=f"{name}_add")([x, shortcut])


def _stages(x, unit, blocks: Sequence[int], width: int):
    for stage, (units, base, stride) in enumerate(zip(blocks, STAGE_WIDTHS, STAGE_STRIDES, strict=True), start=1):
        for index in range(units):
            x = unit(x, base * width // 64, stride if index == 0 else 1, f"stage{stage}_unit{index + 1}")
    return x


def build_resnet50_softmax(
    input_shape: tuple[int, int, int] = (128, 313, 1),
    num_classes: int = 41,
    blocks: Sequence[int] = (3, 4, 6, 3),
    width: int = 64,
) -> keras.Model:
    """ResNet-50 with torchvision bottleneck blocks, global pooling and a softmax over machine IDs.

    Args:
        input_shape: (mels, frames, 1) log-mel input; frames may be None (global pooling).
        num_classes: number of machine IDs (41 for the integrated model).
        blocks: units per stage (ResNet-50: 3, 4, 6, 3).
        width: channels of the stem and of the first stage's bottleneck (64 in ResNet-50; smaller values
            scale every stage alike, for quick CPU runs).

    Returns:
        A `keras.Model` named "dcase_resnet50_softmax"; the pooled 2048-d features are layer "embedding".

    Example:
        >>> model = build_resnet50_softmax((128, 313, 1), num_classes=41)
        >>> model.output_shape, model.get_layer("embedding").output.shape
        ((None, 41), (None, 2048))
    """
    _check(input_shape, num_classes, blocks, width)
    inputs = keras.Input(shape=input_shape, name="log_mel")
    x = _stem(inputs, width)
    x = _stages(x, _bottleneck, blocks, width)
    embedding = layers.GlobalAveragePooling2D(name="embedding")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(embedding)
    return keras.Model(inputs, outputs, name="dcase_resnet50_softmax")


def build_ir_resnet50_margin(
    input_shape: tuple[int, int, int] = (128, 313, 1),
    num_classes: int = 41,
    margin_type: str = "arcface",
    scale: float = 30.0,
    margin: float = 0.05,
    embedding_dim: int = 2048,
    dropout: float = 0.4,
    blocks: Sequence[int] = (3, 4, 6, 3),
    width: int = 64,
) -> keras.Model:
    """torchvision's ResNet-50 with ArcFace IR units, the BN-Dropout-FC-BN embedding head and a margin classifier.

    Args:
        input_shape: (mels, frames, 1) log-mel input, frames fixed (the head flattens the last feature map).
        num_classes: number of machine IDs.
        margin_type: "arcface" (additive angular margin) or "cosface" (additive cosine margin).
        scale: logit scale s (source: 30).
        margin: margin m (source: 0.05).
        embedding_dim: width of the FC layer of the head (source: 2048).
        dropout: dropout rate of the head (not in the source; the ArcFace paper's "E" head uses 0.4).
        blocks: IR units per stage (3, 4, 6, 3: torchvision's resnet50 stages, as the write-up swapped the
            unit; the ArcFace paper's IR-50 is 3, 4, 14, 3).
        width: channels of the stem and of the first stage (64; smaller for quick CPU runs).

    Returns:
        A `keras.Model` named "dcase_ir_resnet50_<margin_type>" with inputs [log_mel, labels] and the
        margin logits as output; the embedding is layer "embedding", the classifier layer "classifier".

    Example:
        >>> model = build_ir_resnet50_margin((128, 64, 1), num_classes=41, embedding_dim=128, width=16)
        >>> model.output_shape, model.get_layer("embedding").output.shape
        ((None, 41), (None, 128))
    """
    _check(input_shape, num_classes, blocks, width)
    if input_shape[1] is None:
        raise ValueError("the IR model flattens its last feature map: input_shape needs a fixed frame count")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    inputs = keras.Input(shape=input_shape, name="log_mel")
    labels = keras.Input(shape=(num_classes,), name="labels")
    x = _stem(inputs, width)
    x = _stages(x, _ir_unit, blocks, width)
    x = layers.BatchNormalization(epsilon=1e-5, name="head_bn1")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(embedding_dim, name="head_fc")(x)
    embedding = layers.BatchNormalization(epsilon=1e-5, name="embedding")(x)
    classifier = CosineMarginClassifier(num_classes, margin_type, scale, margin, name="classifier")
    logits = classifier([embedding, labels])
    return keras.Model([inputs, labels], logits, name=f"dcase_ir_resnet50_{margin_type}")


def inference_model(model: keras.Model) -> keras.Model:
    """The saved member: log-mel → {"probabilities", "embedding"}, built-in Keras layers only.

    For a margin model the classifier becomes UnitNormalization → Dense(no bias) whose kernel is
    scale × the column-normalised classifier weights, i.e. exactly softmax(s · cos θ) without margin.
    A softmax model keeps its own classifier. The layers (and weights) are shared with `model`.

    Args:
        model: a model from `build_ir_resnet50_margin` or `build_resnet50_softmax` (or `finetune_model`).

    Returns:
        A `keras.Model` named "<model name>_inference" with outputs probabilities (batch, classes) and
        embedding (batch, embedding_dim).
    """
    inputs = model.get_layer("log_mel").output
    embedding = model.get_layer("embedding").output
    if isinstance(model.get_layer("classifier") if _has(model, "classifier") else None, CosineMarginClassifier):
        classifier = model.get_layer("classifier")
        kernel = keras.ops.convert_to_numpy(classifier.kernel).astype(np.float64)
        kernel = classifier.scale * kernel / np.maximum(np.linalg.norm(kernel, axis=0, keepdims=True), 1e-6)
        normalized = layers.UnitNormalization(dtype="float32", name="unit_embedding")(embedding)
        dense = layers.Dense(classifier.num_classes, use_bias=False, dtype="float32", name="cosine_logits")
        logits = dense(normalized)
        dense.set_weights([kernel.astype(np.float32)])
        probabilities = layers.Softmax(dtype="float32", name="probabilities")(logits)
    else:
        probabilities = model.get_layer("probabilities").output
    embedding_output = layers.Identity(dtype="float32", name="embedding_out")(embedding)
    return keras.Model(
        inputs, {"probabilities": probabilities, "embedding": embedding_output}, name=f"{model.name}_inference"
    )


def finetune_model(model: keras.Model, class_indices: Sequence[int], name_suffix: str = "finetune") -> keras.Model:
    """A copy of a trained classifier with a frozen trunk and a new classifier over `class_indices` only.

    The transfer-learning set-up of the source: the integrated (all-ID) model's feature extractor is kept
    and only the final classifier layer is trained again, per machine type. The new classifier starts from
    the integrated classifier's weights of those classes (the source does not say; a warm start).

    Args:
        model: a trained model from `build_ir_resnet50_margin` or `build_resnet50_softmax`.
        class_indices: the classes (machine IDs of one type) of the new classifier, in order.
        name_suffix: appended to the model name.

    Returns:
        A new `keras.Model` (same inputs structure as `model`, with `len(class_indices)` classes) whose only
        trainable layer is "classifier" (margin) or "probabilities" (softmax).
    """
    class_indices = list(class_indices)
    if len(class_indices) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {class_indices}")
    trunk = keras.Model(model.get_layer("log_mel").output, model.get_layer("embedding").output)
    trunk.trainable = False
    inputs = keras.Input(shape=model.get_layer("log_mel").output.shape[1:], name="log_mel")
    embedding = layers.Identity(name="embedding")(trunk(inputs, training=False))
    if _has(model, "classifier"):
        old = model.get_layer("classifier")
        labels = keras.Input(shape=(len(class_indices),), name="labels")
        classifier = CosineMarginClassifier(
            len(class_indices), old.margin_type, old.scale, old.margin, old.epsilon, name="classifier"
        )
        outputs = classifier([embedding, labels])
        classifier.set_weights([keras.ops.convert_to_numpy(old.kernel)[:, class_indices]])
        return keras.Model([inputs, labels], outputs, name=f"{model.name}_{name_suffix}")
    old = model.get_layer("probabilities")
    dense = layers.Dense(len(class_indices), activation="softmax", dtype="float32", name="probabilities")
    outputs = dense(embedding)
    kernel, bias = (keras.ops.convert_to_numpy(weight) for weight in old.weights)
    dense.set_weights([kernel[:, class_indices], bias[class_indices]])
    return keras.Model(inputs, outputs, name=f"{model.name}_{name_suffix}")


def _has(model: keras.Model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)
