"""tf.data input pipelines over (memory-mapped) feature arrays.

One family of builders: `from_arrays` (one input array: the plain case, tuned for throughput) and
`from_columns` (named inputs, each a column of rows: an array, or variable-length rows cropped or padded
to a width; sample weights), with the dataset-level augmentations `random_crop_or_pad` and `mixup`.
Rows are gathered per batch from the array (a memmap stays on disk), transformed by a numpy function
(e.g. `features.Normalizer`), and prefetched. A training dataset is one epoch: every random draw in it
(the row order, crops, mixup) comes from stateless random ops keyed by (seed, epoch, what is drawn, batch)
(`random_key`), so epoch e's batches are the same whether a run started at epoch 0 or resumed at epoch e,
and every member sees its own reproducible stream. `epoch` may be a Python int or a scalar tensor (the
training engine builds each epoch's dataset inside `tf.data.Dataset.flat_map`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

# One stream of random draws per purpose, so that no two draws of a member share a key.
STREAMS = {"shuffle": 1, "crop": 2, "mixup": 3}


def random_key(seed, epoch, stream: str, batch=None) -> tf.Tensor:
    """The seed of a stateless random op (shape (2,)) for one member seed, epoch, stream and batch.

    Args:
        seed: the member's seed (int or scalar tensor).
        epoch: the epoch (int or scalar tensor).
        stream: what is drawn, one of `STREAMS`.
        batch: the batch's index within the epoch, or None for a draw made once per epoch.
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(key, STREAMS[stream])
    return key if batch is None else tf.random.experimental.stateless_fold_in(key, tf.cast(batch, tf.int64))


def shuffled(rows, seed, epoch) -> tf.Tensor:
    """`rows` in epoch `epoch`'s order for `seed`: a permutation that is a function of (seed, epoch) only."""
    return tf.random.experimental.stateless_shuffle(rows, seed=random_key(seed, epoch, "shuffle"))


def from_arrays(
    features: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    batch_size: int,
    indices: np.ndarray | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    epoch=0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """One epoch of batches of (transformed features, targets) read from arrays by index.

    Args:
        features: (rows, ...) array; may be a read-only memmap.
        targets: (rows, ...) array, or None for prediction.
        batch_size: rows per batch.
        indices: the rows to use (e.g. a training split), default all.
        transform: numpy function applied to each batch of features (float32 in, float32 out).
        shuffle: put the rows in the epoch's order for `seed` (`shuffled`); otherwise in `indices` order.
        seed: shuffle seed (required with `shuffle`).
        epoch: which epoch's order (int or scalar tensor).
        drop_remainder: drop a last incomplete batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if targets is not None and len(targets) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(targets)} target rows")
    if shuffle and seed is None:
        raise ValueError("shuffle=True needs a seed: the order of every epoch is drawn from (seed, epoch)")
    rows = tf.constant(np.arange(len(features)) if indices is None else np.asarray(indices), dtype=tf.int64)
    source = _Rows(features, targets, transform)
    order = tf.data.Dataset.from_tensor_slices(shuffled(rows, seed, epoch) if shuffle else rows)
    order = order.batch(batch_size, drop_remainder=drop_remainder)

    def load(indices):
        batch = tf.numpy_function(source.read, [indices], tf.float32, stateful=False)
        batch.set_shape((None, *source.feature_shape))
        return batch if targets is None else (batch, source.targets_of(indices))

    dataset = order.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
    dataset._replicate_rows = (source, order)  # what `stacked_from_arrays` reads, for fused batches
    return dataset


class _Rows:
    """The arrays that a `from_arrays` dataset reads its batches from, and how a batch is read."""

    def __init__(self, features: np.ndarray, targets: np.ndarray | None, transform: Callable | None):
        self.features = features
        self.targets = targets
        self.transform = transform
        self.feature_shape = tuple(features.shape[1:])

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The transformed features of these rows, float32. One copy, row by row (each row is contiguous: one
        read), into memory that TensorFlow takes as it is (`aligned_empty`)."""
        batch = aligned_empty((len(indices), *self.feature_shape), np.float32)
        if self.features.dtype == np.float32:
            np.take(self.features, indices, axis=0, out=batch)
        else:
            batch[...] = self.features[indices]
        return self.transform(batch) if self.transform is not None else batch

    def targets_of(self, indices: tf.Tensor) -> tf.Tensor:
        return tf.gather(tf.constant(self.targets, dtype=tf.float32), indices)


def stacked_from_arrays(datasets) -> tf.data.Dataset | None:
    """The fused batches of K `from_arrays` datasets with targets (as `fused.stack_datasets` stacks them: member
    k's features in channel block k, the targets one per member), each made in one step; None for datasets
    that `from_arrays` did not make as they are (a dataset mapped further, e.g. cropped, is not).

    The generic stacking runs K pipelines and a concatenation for every fused batch: K calls into Python,
    each batch copied into TensorFlow and then again into the fused batch. Here one call reads every
    member's rows and writes each member's transformed batch into its block: the same bits, in a quarter
    less processor time for 15 DACON members (the README's pipeline benchmark).
    """
    sources = [getattr(dataset, "_replicate_rows", None) for dataset in datasets]
    if not sources or any(source is None or source[0].targets is None for source in sources):
        return None
    shapes = {source.feature_shape for source, _ in sources}
    if len(shapes) != 1 or not next(iter(shapes)):
        return None
    shape = next(iter(shapes))
    count = len(sources)
    piece = np.dtype((np.void, shape[-1] * 4))  # one member's float32 channels at one position

    def read(*indices: np.ndarray) -> np.ndarray:
        stacked = aligned_empty((len(indices[0]), *shape[:-1], shape[-1] * count), np.float32)
        blocks = stacked.view(piece)
        for k, ((source, _), rows) in enumerate(zip(sources, indices, strict=True)):
            batch = np.ascontiguousarray(source.read(rows))
            if batch.dtype != np.float32:
                raise ValueError(f"a from_arrays transform must return float32, it returned {batch.dtype}")
            blocks[..., k] = batch.view(piece)[..., 0]
        return stacked

    def load(*indices):
        stacked = tf.numpy_function(read, list(indices), tf.float32, stateful=False)
        stacked.set_shape((None, *shape[:-1], shape[-1] * count))
        return stacked, tuple(source.targets_of(rows) for (source, _), rows in zip(sources, indices, strict=True))

    orders = tf.data.Dataset.zip(tuple(order for _, order in sources))
    return orders.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)


# TensorFlow takes an array that a `numpy_function` returns as its tensor's memory when the array's data start
# on a boundary of this many bytes (Eigen's alignment), and copies it otherwise.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data start on an `ALIGNMENT`-byte boundary: returned by a `numpy_function`,
    it becomes a tensor without a copy (numpy's own large arrays start 16 bytes past a page)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


@dataclass(frozen=True)
class ArrayColumn:
    """One model input read from an array by row: the rows of a batch, as float32, through `transform`.

    Attributes:
        array: (rows, ...) array; may be a read-only memmap (read in sorted order, sequentially on disk).
        transform: numpy function of a batch of rows (float32 in, float32 out) that treats each row on its
            own (e.g. `features.Normalizer`), or None.
    """

    array: np.ndarray
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.array)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def read(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)
        batch = np.empty((len(rows), *self.row_shape), dtype=np.float32)
        batch[order] = self.array[rows[order]]
        return self.transform(batch) if self.transform is not None else batch


@dataclass(frozen=True)
class CropColumn:
    """One model input of variable-length rows, each cropped (or zero-padded at its end) to `frames`.

    The rows are stored end to end, time first, so that a row is one contiguous read: row i is
    `values[offsets[i] : offsets[i] + lengths[i]]`, of shape (length, bins). A batch is read as images of
    the package's layout, (bins, frames, 1): `frames` columns from the row's start frame, `transform`ed,
    then zero-padded at the end when the row is shorter (padding stays 0 whatever the transform).

    The start frames are fixed per row (`starts`, e.g. seeded once for prediction), or, without them,
    drawn anew for every batch as a uniform start in [0, length − frames] (0 for shorter rows) by a
    stateless random op keyed by (seed, epoch, batch) (`random_key`): a member sees other crops every epoch
    and the same ones again for the same seed, however its training was interrupted.

    Attributes:
        values: (total frames, bins) array, e.g. MAIC's token store (a memmap).
        offsets, lengths: per row, its first frame in `values` and its number of frames.
        frames: the width of every crop.
        transform: numpy function applied to each row's crop (frames, bins) before padding, or None.
        starts: a fixed start frame per row, or None for random crops.
    """

    values: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    frames: int
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.values.shape[1], self.frames, 1)

    def read(self, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
        batch = np.zeros((len(rows), *self.row_shape), dtype=np.float32)
        for position, (row, start) in enumerate(zip(rows, starts, strict=True)):
            length = min(int(self.lengths[row]) - int(start), self.frames)
            first = self.offsets[row] + start
            crop = np.asarray(self.values[first : first + length], dtype=np.float32)
            batch[position, :, :length, 0] = (self.transform(crop) if self.transform is not None else crop).T
        return batch

    def random_starts(self, rows: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
        """A uniform start per row in [0, length − frames] (0 for shorter rows), drawn with `key`."""
        room = tf.maximum(tf.gather(tf.constant(self.lengths, tf.int64), rows) - self.frames, 0) + 1
        uniform = tf.random.stateless_uniform(tf.shape(rows), seed=key)
        return tf.minimum(tf.cast(uniform * tf.cast(room, tf.float32), tf.int64), room - 1)


Column = ArrayColumn | CropColumn


def from_columns(
    inputs: Mapping[str, Column | np.ndarray] | Column | np.ndarray,
    targets: np.ndarray | None = None,
    *,
    weights: np.ndarray | None = None,
    batch_size: int,
    indices: np.ndarray | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    epoch=0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """One epoch of batches of (inputs[, targets[, sample weights]]) read by row from columns.

    Every column, the targets and the weights share the row index: row i of each is the same example.
    Random draws (the order, random crops) come from (seed, epoch) as in `from_arrays`.

    Args:
        inputs: input name → column (`ArrayColumn`, `CropColumn`, or a plain array), giving batches of
            {name: tensor} (as a multi-input model takes them by name); or one column, giving tensors.
        targets: (rows, ...) array, or None for prediction.
        weights: (rows,) sample weights (e.g. the class weight of each row's label), or None.
        batch_size: rows per batch.
        indices: the rows to use, default all.
        shuffle: put the rows in the epoch's order for `seed` (`shuffled`); otherwise in `indices` order.
        seed: the member's seed (required with `shuffle` or random crops).
        epoch: which epoch's order and crops (int or scalar tensor).
        drop_remainder: drop a last incomplete batch.

    Example:
        >>> dataset = from_columns({"mel": CropColumn(values, offsets, lengths, 64), "aux": aux}, labels,
        ...                        batch_size=32, shuffle=True, seed=0, epoch=3)
        >>> inputs, targets = next(iter(dataset))   # inputs["mel"]: (32, bins, 64, 1)
    """
    named = isinstance(inputs, Mapping)
    columns = {
        name: column if isinstance(column, ArrayColumn | CropColumn) else ArrayColumn(np.asarray(column))
        for name, column in (inputs.items() if named else {"": inputs}.items())
    }
    _check_rows(columns, targets, weights, batch_size)
    if (shuffle or any(isinstance(c, CropColumn) and c.starts is None for c in columns.values())) and seed is None:
        raise ValueError("shuffle=True and random crops need a seed: every draw comes from (seed, epoch)")
    rows = tf.constant(
        np.arange(len(next(iter(columns.values())))) if indices is None else np.asarray(indices), tf.int64
    )
    constants = [tf.constant(array, tf.float32) for array in (targets, weights) if array is not None]

    def load(batch_index, batch_rows):
        read = {name: _read_column(column, batch_rows, seed, epoch, batch_index) for name, column in columns.items()}
        element = (read if named else read[""], *(tf.gather(constant, batch_rows) for constant in constants))
        return element if len(element) > 1 else element[0]

    dataset = tf.data.Dataset.from_tensor_slices(shuffled(rows, seed, epoch) if shuffle else rows)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder).enumerate()
    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _check_rows(columns: Mapping[str, Column], targets, weights, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not columns:
        raise ValueError("no input columns")
    counts = {f"input {name!r}" if name else "input": len(column) for name, column in columns.items()}
    counts.update(
        {what: len(array) for what, array in (("targets", targets), ("weights", weights)) if array is not None}
    )
    if len(set(counts.values())) > 1:
        raise ValueError("the columns must have the same rows: " + ", ".join(f"{k} {n}" for k, n in counts.items()))


def _read_column(column: Column, rows: tf.Tensor, seed, epoch, batch_index) -> tf.Tensor:
    """A batch of one column inside the tf.data graph (numpy reads run in `tf.numpy_function`)."""
    if isinstance(column, ArrayColumn):
        batch = tf.numpy_function(column.read, [rows], tf.float32, stateful=False)
    else:
        if column.starts is None:
            starts = column.random_starts(rows, random_key(seed, epoch, "crop", batch_index))
        else:
            starts = tf.gather(tf.constant(column.starts, tf.int64), rows)
        batch = tf.numpy_function(column.read, [rows, starts], tf.float32, stateful=False)
    # The batch size is static where the batches are whole (drop_remainder), as tf.data's own batches are: the
    # training step is then traced for that size, which changes float results in the last bits.
    batch.set_shape((rows.shape[0], *column.row_shape))
    return batch


def random_crop_or_pad(dataset: tf.data.Dataset, frames: int, *, axis: int = 2, seed: int, epoch=0) -> tf.data.Dataset:
    """Crop batches of (x, y) to `frames` along `axis` (batch axis 0 included) at a random offset per
    example; shorter inputs are zero-padded at the end.

    The offsets are keyed by (seed, epoch, batch) (`random_key`): they change every epoch and a seed
    reproduces them.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")

    def crop(batch_index, batch):
        x, y = batch
        length = tf.shape(x)[axis]
        pad_amount = tf.maximum(frames - length, 0)
        paddings = tf.tensor_scatter_nd_update(tf.zeros((tf.rank(x), 2), tf.int32), [[axis, 1]], [pad_amount])
        x = tf.pad(x, paddings)
        room = tf.shape(x)[axis] - frames + 1
        offsets = tf.random.stateless_uniform(
            tf.shape(x)[:1], seed=random_key(seed, epoch, "crop", batch_index), maxval=room, dtype=tf.int32
        )
        x = tf.map_fn(
            lambda item: tf.gather(item[0], tf.range(item[1], item[1] + frames), axis=axis - 1),
            (x, offsets),
            fn_output_signature=tf.TensorSpec(None, x.dtype),
        )
        return x, y

    return dataset.enumerate().map(crop, num_parallel_calls=AUTOTUNE, deterministic=True)


def mixup(dataset: tf.data.Dataset, alpha: float, *, seed: int, epoch=0) -> tf.data.Dataset:
    """Mix each batch of (x, y) with a shuffled copy of itself, λ ~ Beta(alpha, alpha) per example.

    Beta draws are made from two stateless Gamma draws (TensorFlow has no stateless Beta), keyed like the
    partners by (seed, epoch, batch) (`random_key`), so the same seed and epoch give the same mixing.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")

    def mix(batch_index, batch):
        x, y = batch
        size = tf.shape(x)[0]
        keys = tf.random.experimental.stateless_split(random_key(seed, epoch, "mixup", batch_index), 3)
        first = tf.random.stateless_gamma([size], keys[0], alpha=alpha)
        second = tf.random.stateless_gamma([size], keys[1], alpha=alpha)
        weight = first / (first + second)
        partner = tf.argsort(tf.random.stateless_uniform([size], keys[2]))
        x_weight = tf.reshape(tf.cast(weight, x.dtype), [-1] + [1] * (len(x.shape) - 1))
        y_weight = tf.reshape(tf.cast(weight, y.dtype), [-1] + [1] * (len(y.shape) - 1))
        mixed_x = x_weight * x + (1 - x_weight) * tf.gather(x, partner)
        mixed_y = y_weight * y + (1 - y_weight) * tf.gather(y, partner)
        return mixed_x, mixed_y

    return dataset.enumerate().map(mix, num_parallel_calls=AUTOTUNE, deterministic=True)
