"""tf.data input pipelines over (memory-mapped) feature arrays.

Rows are gathered per batch from the array (a memmap stays on disk), transformed by a numpy function
(e.g. `features.Normalizer`), shuffled per epoch with a seed, and prefetched. Augmentations are
dataset → dataset functions with their own seeds, so every member sees its own reproducible stream.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def from_arrays(
    features: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    batch_size: int,
    indices: np.ndarray | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of (transformed features, targets) read from arrays by index.

    Args:
        features: (rows, ...) array; may be a read-only memmap.
        targets: (rows, ...) array, or None for prediction.
        batch_size: rows per batch.
        indices: the rows to use (e.g. a training split), default all.
        transform: numpy function applied to each batch of features (float32 in, float32 out).
        shuffle: reshuffle the row order every epoch (seeded: the same seed gives the same orders).
        seed: shuffle seed.
        drop_remainder: drop a last incomplete batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if targets is not None and len(targets) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(targets)} target rows")
    rows = np.arange(len(features)) if indices is None else np.asarray(indices, dtype=np.int64)
    feature_shape = tuple(features.shape[1:])

    def gather(indices: np.ndarray) -> np.ndarray:
        # Sorted reads are sequential on disk; the shuffle happened in the index order already.
        order = np.argsort(indices)
        batch = np.empty((len(indices), *feature_shape), dtype=np.float32)
        batch[order] = features[indices[order]]
        return transform(batch) if transform is not None else batch

    dataset = tf.data.Dataset.from_tensor_slices(rows)
    if shuffle:
        dataset = dataset.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)

    def load(indices):
        batch = tf.numpy_function(gather, [indices], tf.float32, stateful=False)
        batch.set_shape((None, *feature_shape))
        if targets is None:
            return batch
        labels = tf.gather(tf.constant(targets, dtype=tf.float32), indices)
        return batch, labels

    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def random_crop_or_pad(dataset: tf.data.Dataset, frames: int, *, axis: int = 2, seed: int) -> tf.data.Dataset:
    """Crop batches of (x, y) to `frames` along `axis` (batch axis 0 included) at a random offset per
    example, drawn again every epoch; shorter inputs are zero-padded at the end.

    Offsets come from stateless random ops keyed by (seed, epoch-independent batch counter) through
    `tf.data.Dataset.random`, so a given seed reproduces the same sequence of crops.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def crop(batch, stateless_seed):
        x, y = batch
        length = tf.shape(x)[axis]
        pad_amount = tf.maximum(frames - length, 0)
        paddings = tf.tensor_scatter_nd_update(tf.zeros((tf.rank(x), 2), tf.int32), [[axis, 1]], [pad_amount])
        x = tf.pad(x, paddings)
        room = tf.shape(x)[axis] - frames + 1
        offsets = tf.random.stateless_uniform(
            tf.shape(x)[:1], seed=tf.cast(stateless_seed, tf.int32), maxval=room, dtype=tf.int32
        )
        x = tf.map_fn(
            lambda item: tf.gather(item[0], tf.range(item[1], item[1] + frames), axis=axis - 1),
            (x, offsets),
            fn_output_signature=tf.TensorSpec(None, x.dtype),
        )
        return x, y

    return tf.data.Dataset.zip((dataset, seeds)).map(crop, num_parallel_calls=AUTOTUNE, deterministic=True)


def mixup(dataset: tf.data.Dataset, alpha: float, *, seed: int) -> tf.data.Dataset:
    """Mix each batch of (x, y) with a shuffled copy of itself, λ ~ Beta(alpha, alpha) per example.

    Beta draws are made from two stateless Gamma draws (TensorFlow has no stateless Beta), keyed by
    `tf.data.Dataset.random(seed)`, so the same seed gives the same mixing.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(6)

    def mix(batch, stateless_seeds):
        x, y = batch
        size = tf.shape(x)[0]
        stateless_seeds = tf.reshape(tf.cast(stateless_seeds, tf.int32), (3, 2))
        first = tf.random.stateless_gamma([size], stateless_seeds[0], alpha=alpha)
        second = tf.random.stateless_gamma([size], stateless_seeds[1], alpha=alpha)
        weight = first / (first + second)
        partner = tf.argsort(tf.random.stateless_uniform([size], stateless_seeds[2]))
        x_weight = tf.reshape(tf.cast(weight, x.dtype), [-1] + [1] * (len(x.shape) - 1))
        y_weight = tf.reshape(tf.cast(weight, y.dtype), [-1] + [1] * (len(y.shape) - 1))
        mixed_x = x_weight * x + (1 - x_weight) * tf.gather(x, partner)
        mixed_y = y_weight * y + (1 - y_weight) * tf.gather(y, partner)
        return mixed_x, mixed_y

    return tf.data.Dataset.zip((dataset, seeds)).map(mix, num_parallel_calls=AUTOTUNE, deterministic=True)
