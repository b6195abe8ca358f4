"""tf.data pipelines: seeded per-epoch shuffles, row subsets, transforms, random crops and mixup."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from replicate import pipeline

FEATURES = np.arange(20 * 3 * 8, dtype=np.float32).reshape(20, 3, 8, 1)
TARGETS = np.eye(20, dtype=np.float32)


def _epochs(dataset, count=2):
    return [np.concatenate([y.numpy().argmax(axis=1) for _, y in dataset]) for _ in range(count)]


def test_shuffle_is_seeded_and_changes_every_epoch():
    make = lambda seed: pipeline.from_arrays(FEATURES, TARGETS, batch_size=6, shuffle=True, seed=seed)  # noqa: E731
    first, second = _epochs(make(1))
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(_epochs(make(1)), [first, second])
    assert not np.array_equal(_epochs(make(2))[0], first)


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


def test_mismatched_rows_and_bad_batch_size():
    with pytest.raises(ValueError, match="20 feature rows but 3 target rows"):
        pipeline.from_arrays(FEATURES, TARGETS[:3], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.from_arrays(FEATURES, TARGETS, batch_size=0)


def test_random_crop_differs_across_epochs_and_repeats_for_a_seed():
    def crops(seed):
        dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=20)
        dataset = pipeline.random_crop_or_pad(dataset, frames=4, axis=2, seed=seed)
        return [next(iter(dataset))[0].numpy() for _ in range(2)]

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
