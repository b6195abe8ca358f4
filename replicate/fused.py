"""Fused seed ensembles: K members of one architecture trained side by side as one Keras model.

A member's layers are packed K-wide: a Conv2D becomes one grouped convolution (`groups=K`) with K times the
filters, a Dense becomes an EinsumDense with one kernel per member, and channel-wise layers
(BatchNormalization, activations, pooling, dropout, resizing) act on the K blocks of channels at once —
BatchNormalization's statistics are per channel, so they stay per member. Member k's data sit in channel
block k of every tensor: the fused model's input stacks K samples (one per member, each member's own
shuffled batch) along the channel axis, and its K outputs are the members' outputs, each with the recipe's
loss. The total loss is their sum, so member k's gradient is exactly its own loss's gradient, and with
element-wise optimizers (Adam, Nadam, Keras2Nadam, SGD) each member follows the trajectory of an independent
run with the same initial weights and batches (dropout masks differ: they are drawn for the fused tensor).

    fused = fuse(build_model(), count=4)                     # the architecture, 4 wide (layout "auto")
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


def fuse(member: keras.Model, count: int, layout: str = "auto") -> keras.Model:
    """The architecture of `member`, `count` members wide, with one output per member.

    Args:
        member: a functional model; for the "grouped" layout built of Conv2D, Dense, Flatten, Concatenate
            and channel-wise layers (`CHANNEL_WISE`), its last axis the channel (or feature) axis.
        count: the number of members trained together.
        layout: "grouped" packs each layer's members into one wider layer (grouped convolutions,
            EinsumDense), which is what makes an accelerator fast; "copies" keeps one copy of each layer
            per member side by side in the graph (on a CPU a grouped convolution is far slower than its
            members' convolutions one by one); "auto" is "grouped" where the backend sees a GPU, else "copies".

    Returns:
        A model whose inputs are the member's with `count` times the channels (member k's in block k) and
        whose outputs are `count` tensors shaped like the member's output, named `member_<k>`. A layer
        with weights keeps the member's layer name ("grouped") or gets `<name>_member<k>` ("copies"), which
        is how `pack` and `unpack` match them.

    Raises:
        ValueError: for a layer type that cannot be packed (named in the message), a member with several
            outputs, or an unknown layout.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if len(member.outputs) != 1:
        raise ValueError(f"{member.name}: fusing needs a model with one output, it has {len(member.outputs)}")
    if layout == "auto":
        layout = "grouped" if has_accelerator() else "copies"
    if layout not in ("grouped", "copies"):
        raise ValueError(f"layout must be 'auto', 'grouped' or 'copies', got {layout!r}")
    fused_inputs = [
        keras.Input(shape=(*tensor.shape[1:-1], tensor.shape[-1] * count), name=tensor.name) for tensor in member.inputs
    ]
    if layout == "copies":
        outputs = _copies(member, count, fused_inputs)
    else:
        outputs = _grouped(member, count, fused_inputs)
    return keras.Model(
        fused_inputs if len(fused_inputs) > 1 else fused_inputs[0], outputs, name=f"{member.name}_x{count}"
    )


def has_accelerator() -> bool:
    """Whether the Keras backend computes on a GPU (or another accelerator)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def _grouped(member: keras.Model, count: int, fused_inputs: list) -> list:
    tensors = {id(tensor): fused for tensor, fused in zip(member.inputs, fused_inputs, strict=True)}
    for operation in member.operations:
        if isinstance(operation, layers.InputLayer):
            continue
        node = operation._inbound_nodes[0]
        arguments = [tensors[id(tensor)] for tensor in node.input_tensors]
        tensors[id(node.output_tensors[0])] = _fused_call(operation, arguments, count)
    width = member.outputs[0].shape[-1]
    per_member = layers.Reshape((count, width), name="members_split")(tensors[id(member.outputs[0])])
    return [
        layers.Flatten(name=f"member_{k}", dtype=member.outputs[0].dtype)(
            layers.Cropping1D((k, count - 1 - k), name=f"member_{k}_crop")(per_member)
        )
        for k in range(count)
    ]


def _copies(member: keras.Model, count: int, fused_inputs: list) -> list:
    """Member k's layers applied to channel block k of the inputs, once per member."""
    tensors = {
        id(tensor): _member_blocks(fused, count, tensor.name)
        for tensor, fused in zip(member.inputs, fused_inputs, strict=True)
    }
    for operation in member.operations:
        if isinstance(operation, layers.InputLayer):
            continue
        node = operation._inbound_nodes[0]
        outputs = []
        for k in range(count):
            copy = type(operation).from_config({**operation.get_config(), "name": f"{operation.name}_member{k}"})
            arguments = [tensors[id(tensor)][k] for tensor in node.input_tensors]
            outputs.append(copy(arguments if len(arguments) > 1 else arguments[0]))
        tensors[id(node.output_tensors[0])] = outputs
    return [
        layers.Activation("linear", dtype=member.outputs[0].dtype, name=f"member_{k}")(output)
        for k, output in enumerate(tensors[id(member.outputs[0])])
    ]


def _member_blocks(x, count: int, name: str) -> list:
    """The `count` channel blocks of a stacked input, each shaped like one member's input."""
    shape = tuple(x.shape[1:-1])
    channels = x.shape[-1] // count
    cropping = {0: layers.Cropping1D, 1: layers.Cropping2D, 2: layers.Cropping3D}.get(len(shape))
    if cropping is None:
        raise ValueError(
            f"cannot split input {name!r} of shape {x.shape} into members (at most 3 axes before channels)"
        )
    blocks = layers.Reshape((*shape, count, channels), name=f"{name}_members")(x)
    pieces = []
    for k in range(count):
        keep = (k, count - 1 - k)
        crop = keep if not shape else ((0, 0),) * len(shape) + (keep,)
        piece = cropping(crop, name=f"{name}_member{k}_crop")(blocks)
        pieces.append(layers.Reshape((*shape, channels), name=f"{name}_member{k}")(piece))
    return pieces


def _fused_call(layer, arguments: list, count: int):
    """Apply the packed counterpart of one member layer to the fused tensors."""
    name = layer.name
    if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose):
        config = layer.get_config()
        config.update(filters=layer.filters * count, groups=layer.groups * count)
        return layers.Conv2D.from_config(config)(arguments[0])
    if isinstance(layer, layers.LayerNormalization) and not (layer.center or layer.scale):
        return _standardize_per_member(layer, arguments[0], count)
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
    """A concatenation along an axis other than the channel axis, which keeps every channel (so every
    member's block) apart."""
    rank = len(arguments[0].shape)
    return isinstance(layer, layers.Concatenate) and layer.axis % rank != rank - 1


def _standardize_per_member(layer, x, count: int):
    """A weightless LayerNormalization over axes that hold one member's values only.

    The member's channel axis may be among its axes only where the member has one channel (its statistics
    are then those of the other axes). The normalised axes are moved to the end, normalised there and moved
    back: a normalisation over trailing axes is the one every backend computes alike.
    """
    rank = len(x.shape)
    axes = {axis % rank for axis in ([layer.axis] if isinstance(layer.axis, int) else layer.axis)}
    if rank - 1 in axes:
        if x.shape[-1] != count:
            raise ValueError(
                f"cannot fuse layer {layer.name!r}: it normalises over the channel axis, which would mix members"
            )
        axes.discard(rank - 1)
    kept = [axis for axis in range(1, rank) if axis not in axes]
    order = kept + sorted(axes)
    inverse = [order.index(axis) + 1 for axis in range(1, rank)]
    config = {**layer.get_config(), "axis": list(range(len(kept) + 1, rank))}
    x = layers.Permute(order, name=f"{layer.name}_axes_last")(x)
    x = layers.LayerNormalization.from_config(config)(x)
    return layers.Permute(inverse, name=f"{layer.name}_axes_back")(x)


def _weighted_pairs(fused: keras.Model, members: Sequence[keras.Model]):
    """(fused layer or its per-member copies, the members' layers) for every member layer with weights."""
    for member_layer in members[0].layers:
        if not member_layer.weights:
            continue
        member_layers = [member.get_layer(member_layer.name) for member in members]
        names = {layer.name for layer in fused.layers}
        copies = [f"{member_layer.name}_member{k}" for k in range(len(members))]
        if all(name in names for name in copies):
            yield [fused.get_layer(name) for name in copies], member_layers
        elif member_layer.name in names:
            yield fused.get_layer(member_layer.name), member_layers
        else:
            raise ValueError(f"{fused.name} has no layer {member_layer.name!r}: was it fused from this model?")


def pack(fused: keras.Model, members: Sequence[keras.Model]) -> keras.Model:
    """Set the fused model's weights (and BatchNormalization statistics) from `members`, in order."""
    for fused_layer, member_layers in _weighted_pairs(fused, members):
        if isinstance(fused_layer, list):  # the "copies" layout
            for copy, member_layer in zip(fused_layer, member_layers, strict=True):
                copy.set_weights(member_layer.get_weights())
            continue
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
        if isinstance(fused_layer, list):
            for copy, member_layer in zip(fused_layer, member_layers, strict=True):
                member_layer.set_weights(copy.get_weights())
            continue
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
    size), as seed ensembles over one training set do. Streams that `pipeline.from_arrays` made are read
    together, one step per fused batch (`pipeline.stacked_from_arrays`), to the same batches.
    """
    import tensorflow as tf

    from replicate import pipeline

    fast = pipeline.stacked_from_arrays(datasets)  # streams of `pipeline.from_arrays`: one step per batch
    if fast is not None:
        return fast

    def stack(*batches):
        inputs = [batch[0] for batch in batches]
        targets = tuple(batch[1] for batch in batches)
        return tf.nest.map_structure(lambda *parts: _concatenate_channels(parts), *inputs), targets

    return tf.data.Dataset.zip(tuple(datasets)).map(stack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _concatenate_channels(parts):
    """`tf.concat(parts, axis=-1)` of the members' batches, copied by numpy where it can.

    Member k's channels go to block k of every position: a copy in pieces of one member's channels (16 bytes
    for DACON's 4 float32 resolutions). TensorFlow's concatenation copies such pieces at about half the speed
    of numpy copying them as single 16-byte items (9 ms against 4-5 ms for 15 DACON batches of 16 on one
    core, most of what a fused batch costs the input pipeline). A copy either way: the same bits.
    """
    import tensorflow as tf

    from replicate import pipeline

    first = parts[0]
    channels = {part.shape[-1] if part.shape.rank else None for part in parts}
    if not first.dtype.is_numpy_compatible or len(channels) != 1 or None in channels:
        return tf.concat(parts, axis=-1)

    def concatenate(*arrays):
        channels = arrays[0].shape[-1]
        out = pipeline.aligned_empty((*arrays[0].shape[:-1], channels * len(arrays)), arrays[0].dtype)
        piece = np.dtype((np.void, channels * arrays[0].dtype.itemsize))  # one member's channels at one position
        blocks = out.view(piece)
        for k, array in enumerate(arrays):
            blocks[..., k] = np.ascontiguousarray(array).view(piece)[..., 0]
        return out

    stacked = tf.numpy_function(concatenate, list(parts), first.dtype, stateful=False)
    stacked.set_shape([*first.shape[:-1], channels.pop() * len(parts)])
    return stacked
