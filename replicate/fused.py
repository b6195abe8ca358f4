"""Fused seed ensembles: K members of one architecture trained side by side as one Keras model.

A member's layers are packed K-wide: a Conv2D becomes one grouped convolution (`groups=K`) with K times the
filters, a Dense becomes an EinsumDense with one kernel per member, and channel-wise layers
(BatchNormalization, activations, pooling, dropout, resizing) act on the K blocks of channels at once —
BatchNormalization's statistics are per channel, so they stay per member. Member k's data sit in channel
block k of every tensor: the fused model's input stacks K samples (one per member, each member's own
shuffled batch) along the channel axis, and its K outputs are the members' outputs, each with the recipe's
loss. The total loss is their sum, so member k's gradient is exactly its own loss's gradient, and with
element-wise optimizers (Adam, Nadam, SGD) each member follows the trajectory of an independent run with
the same initial weights and batches (dropout masks differ: they are drawn for the fused tensor).

    fused = fuse(build_model(), count=4)                     # the architecture, 4 wide
    pack(fused, members)                                     # their initial weights
    fused.fit(stack_datasets(datasets), ...)                 # one step trains all four
    members = unpack(fused, [build_model() for _ in range(4)])   # ordinary members, saved as usual

Only the fused model uses these packed layouts; what is saved is the builder's own model.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

# Layers that act on each channel (or each feature) separately, and so on each member's block separately.
CHANNEL_WISE = (
    layers.Activation,
    layers.ReLU,
    layers.BatchNormalization,
    layers.Dropout,
    layers.AveragePooling2D,
    layers.MaxPooling2D,
    layers.GlobalAveragePooling2D,
    layers.GlobalMaxPooling2D,
    layers.Resizing,
    layers.ZeroPadding2D,
    layers.Cropping2D,
    layers.Add,
)


def fuse(member: keras.Model, count: int) -> keras.Model:
    """The architecture of `member`, `count` members wide, with one output per member.

    Args:
        member: a functional model built of Conv2D, Dense, Flatten, Concatenate and channel-wise layers
            (`CHANNEL_WISE`); its last axis is the channel (or feature) axis.
        count: the number of members trained together.

    Returns:
        A model whose inputs are the member's with `count` times the channels (member k's in block k) and
        whose outputs are `count` tensors shaped like the member's output, named `member_<k>`. Layers that
        hold weights keep the member's layer names, which is how `pack` and `unpack` match them.

    Raises:
        ValueError: for a layer type that cannot be packed (named in the message) or a member with several
            outputs.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if len(member.outputs) != 1:
        raise ValueError(f"{member.name}: fusing needs a model with one output, it has {len(member.outputs)}")
    tensors: dict[int, keras.KerasTensor] = {}
    fused_inputs = []
    for member_input in member.inputs:
        shape = (*member_input.shape[1:-1], member_input.shape[-1] * count)
        fused_inputs.append(keras.Input(shape=shape, name=member_input.name))
        tensors[id(member_input)] = fused_inputs[-1]
    for operation in member.operations:
        if isinstance(operation, layers.InputLayer):
            continue
        node = operation._inbound_nodes[0]
        arguments = [tensors[id(tensor)] for tensor in node.input_tensors]
        outputs = _fused_call(operation, arguments, count)
        for member_tensor, fused_tensor in zip(node.output_tensors, [outputs], strict=True):
            tensors[id(member_tensor)] = fused_tensor
    packed = tensors[id(member.outputs[0])]
    width = member.outputs[0].shape[-1]
    per_member = layers.Reshape((count, width), name="members_split")(packed)
    outputs = [
        layers.Flatten(name=f"member_{k}", dtype="float32")(
            layers.Cropping1D((k, count - 1 - k), name=f"member_{k}_crop")(per_member)
        )
        for k in range(count)
    ]
    return keras.Model(
        fused_inputs if len(fused_inputs) > 1 else fused_inputs[0], outputs, name=f"{member.name}_x{count}"
    )


def _fused_call(layer, arguments: list, count: int):
    """Apply the packed counterpart of one member layer to the fused tensors."""
    name = layer.name
    if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose):
        config = layer.get_config()
        config.update(filters=layer.filters * count, groups=layer.groups * count)
        return layers.Conv2D.from_config(config)(arguments[0])
    if isinstance(layer, CHANNEL_WISE) or _along_other_axes(layer, arguments):
        packed = type(layer).from_config(layer.get_config())
        return packed(arguments if isinstance(layer, (layers.Add, layers.Concatenate)) else arguments[0])
    if isinstance(layer, layers.Flatten):
        # Member k's features must be its own (height, width, channel) flattening, in block k.
        x = arguments[0]
        spatial = int(np.prod(x.shape[1:-1]))
        channels = x.shape[-1] // count
        x = layers.Reshape((spatial, count, channels), name=f"{name}_blocks")(x)
        x = layers.Permute((2, 1, 3), name=f"{name}_members_first")(x)
        return layers.Reshape((count * spatial * channels,), name=name)(x)
    if isinstance(layer, layers.Dense):
        x = layers.Reshape((count, arguments[0].shape[-1] // count), name=f"{name}_members")(arguments[0])
        x = layers.EinsumDense(
            "bki,kio->bko",
            output_shape=(count, layer.units),
            activation=layer.get_config()["activation"],
            bias_axes="ko" if layer.use_bias else None,
            dtype=layer.dtype_policy,
            name=name,
        )(x)
        return layers.Reshape((count * layer.units,), name=f"{name}_packed")(x)
    if isinstance(layer, layers.Concatenate) and layer.axis in (-1, len(arguments[0].shape) - 1):
        blocks = [
            layers.Reshape((*x.shape[1:-1], count, x.shape[-1] // count), name=f"{name}_blocks{i}")(x)
            for i, x in enumerate(arguments)
        ]
        x = layers.Concatenate(axis=-1, name=name)(blocks)
        return layers.Reshape((*x.shape[1:-2], count * x.shape[-1]), name=f"{name}_packed")(x)
    raise ValueError(f"cannot fuse layer {name!r} of type {type(layer).__name__}: no packed form is defined for it")


def _along_other_axes(layer, arguments: list) -> bool:
    """A concatenation or weightless normalisation along axes other than the channel axis, which treats
    every channel (so every member's block) on its own."""
    rank = len(arguments[0].shape)
    if isinstance(layer, layers.Concatenate):
        return layer.axis % rank != rank - 1
    if isinstance(layer, layers.LayerNormalization) and not (layer.center or layer.scale):
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        return all(axis % rank != rank - 1 for axis in axes)
    return False


def _weighted_pairs(fused: keras.Model, members: Sequence[keras.Model]):
    for member_layer in members[0].layers:
        if not member_layer.weights:
            continue
        try:
            fused_layer = fused.get_layer(member_layer.name)
        except ValueError as error:
            raise ValueError(
                f"{fused.name} has no layer {member_layer.name!r}: was it fused from this model?"
            ) from error
        yield fused_layer, [member.get_layer(member_layer.name) for member in members]


def pack(fused: keras.Model, members: Sequence[keras.Model]) -> keras.Model:
    """Set the fused model's weights (and BatchNormalization statistics) from `members`, in order."""
    for fused_layer, member_layers in _weighted_pairs(fused, members):
        stack = isinstance(fused_layer, layers.EinsumDense)
        fused_layer.set_weights(
            [
                np.stack(values) if stack else np.concatenate(values, axis=-1)
                for values in zip(*(layer.get_weights() for layer in member_layers), strict=True)
            ]
        )
    return fused


def unpack(fused: keras.Model, members: Sequence[keras.Model]) -> list[keras.Model]:
    """Copy each member's block of the fused weights into `members` (new models from the same builder)."""
    for fused_layer, member_layers in _weighted_pairs(fused, members):
        stack = isinstance(fused_layer, layers.EinsumDense)
        for k, member_layer in enumerate(member_layers):
            member_layer.set_weights(
                [
                    value[k] if stack else np.split(value, len(members), axis=-1)[k]
                    for value in fused_layer.get_weights()
                ]
            )
    return list(members)


def stack_datasets(datasets: Sequence):
    """One tf.data stream of fused batches from each member's own stream of (inputs, targets) batches.

    Member k's inputs go to channel block k (inputs may be a tensor, a tuple or a dict of tensors); its
    targets become the k-th output's. All streams must give batches of the same sizes (same rows and batch
    size), as seed ensembles over one training set do.
    """
    import tensorflow as tf

    def stack(*batches):
        inputs = [batch[0] for batch in batches]
        targets = tuple(batch[1] for batch in batches)
        return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=-1), *inputs), targets

    return tf.data.Dataset.zip(tuple(datasets)).map(stack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
