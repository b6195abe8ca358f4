"""tf.data pipelines: seeded per-epoch shuffles, row subsets, transforms, random crops and mixup."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from replicate import pipeline

FEATURES = np.arange(20 * 3 * 8, dtype=np.float32).reshape(20, 3, 8, 1)
TARGETS = np.eye(20, dtype=np.float32)


def _order(seed, epoch):
    dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=6, shuffle=True, seed=seed, epoch=epoch)
    return np.concatenate([y.numpy().argmax(axis=1) for _, y in dataset])


def test_shuffle_is_a_function_of_seed_and_epoch():
    first, second = _order(1, 0), _order(1, 1)
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(_order(1, 1), second)
    assert not np.array_equal(_order(2, 0), first)
    with pytest.raises(ValueError, match="needs a seed"):
        pipeline.from_arrays(FEATURES, TARGETS, batch_size=6, shuffle=True)


def _augmented_epoch(epoch):
    """A DCASE-like epoch: shuffled rows, random crops and mixup, all drawn from (seed 7, epoch)."""
    dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=6, shuffle=True, seed=7, epoch=epoch)
    dataset = pipeline.random_crop_or_pad(dataset, frames=5, axis=2, seed=7, epoch=epoch)
    return pipeline.mixup(dataset, alpha=0.5, seed=7, epoch=epoch)


def test_an_epochs_batches_do_not_depend_on_the_epoch_a_stream_starts_from():
    """What a resumed run relies on: epochs 1 and 2 read from a stream that starts at epoch 1 (epoch a
    tensor, as the training engine's flat_map gives it) are those of a stream that starts at epoch 0."""

    def stream(first):
        batches = tf.data.Dataset.range(first, 3).flat_map(_augmented_epoch)
        return [tuple(tensor.numpy() for tensor in batch) for batch in batches]

    whole, resumed = stream(0), stream(1)
    assert len(whole) == 3 * 4 and len(resumed) == 2 * 4
    for expected, actual in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(actual[0], expected[0])
        np.testing.assert_array_equal(actual[1], expected[1])
    one_epoch = [tuple(tensor.numpy() for tensor in batch) for batch in _augmented_epoch(2)]  # a Python int
    for expected, actual in zip(whole[8:], one_epoch, strict=True):
        np.testing.assert_array_equal(actual[0], expected[0])
    assert not np.array_equal(whole[0][0], whole[4][0])  # every draw changes with the epoch


def test_rows_features_and_transform_stay_aligned():
    indices = np.array([7, 3, 15])
    dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=2, indices=indices, transform=lambda x: x * 2)
    rows = [(x.numpy(), y.numpy()) for x, y in dataset]
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    np.testing.assert_array_equal(y.argmax(axis=1), indices)
    np.testing.assert_array_equal(x, FEATURES[indices] * 2)
    assert rows[0][0].shape == (2, 3, 8, 1)


def test_memmap_input(tmp_path):
    np.save(tmp_path / "f.npy", FEATURES)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    x = np.concatenate([batch.numpy() for batch in pipeline.from_arrays(mapped, batch_size=7)])
    np.testing.assert_array_equal(x, FEATURES)


def test_batches_are_gathered_into_aligned_memory_as_float32():
    for shape in ((3, 5), (16, 64, 101, 4)):
        array = pipeline.aligned_empty(shape, np.float32)
        assert array.shape == shape and array.dtype == np.float32 and array.ctypes.data % pipeline.ALIGNMENT == 0
    as_float64 = FEATURES.astype(np.float64)
    x = np.concatenate([b.numpy() for b, _ in pipeline.from_arrays(as_float64, TARGETS, batch_size=6)])
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, FEATURES)


def test_mismatched_rows_and_bad_batch_size():
    with pytest.raises(ValueError, match="20 feature rows but 3 target rows"):
        pipeline.from_arrays(FEATURES, TARGETS[:3], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.from_arrays(FEATURES, TARGETS, batch_size=0)


def test_random_crop_differs_across_epochs_and_repeats_for_a_seed():
    def crops(seed):
        dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=20)
        return [
            next(iter(pipeline.random_crop_or_pad(dataset, frames=4, axis=2, seed=seed, epoch=epoch)))[0].numpy()
            for epoch in (0, 1)
        ]

    first, second = crops(3)
    assert first.shape == (20, 3, 4, 1)
    # each crop is a contiguous window of its own row
    for row in range(20):
        start = int(first[row, 0, 0, 0] - FEATURES[row, 0, 0, 0])
        np.testing.assert_array_equal(first[row], FEATURES[row, :, start : start + 4])
    assert not np.array_equal(first, second)
    again = crops(3)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)


def test_random_crop_pads_short_inputs_with_zeros():
    dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=4)
    x, _ = next(iter(pipeline.random_crop_or_pad(dataset, frames=10, axis=2, seed=0)))
    assert x.shape == (4, 3, 10, 1)
    np.testing.assert_array_equal(x.numpy()[:, :, :8], FEATURES[:4])
    assert not x.numpy()[:, :, 8:].any()


def test_mixup_mixes_inputs_and_targets_with_one_weight():
    dataset = pipeline.mixup(pipeline.from_arrays(FEATURES, TARGETS, batch_size=20), alpha=1.0, seed=4)
    x, y = (tensor.numpy() for tensor in next(iter(dataset)))
    for row in range(20):
        sources = np.flatnonzero(y[row])
        weights = y[row, sources]
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
        expected = (FEATURES[sources] * weights[:, None, None, None]).sum(axis=0) if len(sources) > 1 else FEATURES[row]
        np.testing.assert_allclose(x[row], expected, rtol=1e-5)
    x_again, _ = next(iter(pipeline.mixup(pipeline.from_arrays(FEATURES, TARGETS, batch_size=20), 1.0, seed=4)))
    np.testing.assert_array_equal(x_again.numpy(), x)
    with pytest.raises(ValueError, match="alpha"):
        pipeline.mixup(tf.data.Dataset.range(1), alpha=0.0, seed=0)
