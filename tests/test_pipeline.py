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


# --- from_columns: named inputs, sample weights, variable-length rows cropped to a width ------------------

LENGTHS = np.array([3, 7, 5, 12, 6, 9, 4], dtype=np.int64)  # tokens of 3..12 frames of 5 bins, end to end
OFFSETS = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
VALUES = np.arange(LENGTHS.sum() * 5, dtype=np.float32).reshape(-1, 5)


def test_an_array_column_gives_the_batches_of_from_arrays():
    """The DACON training stream built both ways: the same rows, order, transform and targets, bit for bit."""
    options = dict(batch_size=6, indices=np.arange(3, 18), shuffle=True, seed=5, epoch=2)
    expected = list(pipeline.from_arrays(FEATURES, TARGETS, transform=lambda x: x / 7, **options))
    actual = list(pipeline.from_columns(pipeline.ArrayColumn(FEATURES, lambda x: x / 7), TARGETS, **options))
    assert len(actual) == len(expected) == 3
    for (x, y), (expected_x, expected_y) in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(x.numpy(), expected_x.numpy())
        np.testing.assert_array_equal(y.numpy(), expected_y.numpy())


def test_named_inputs_targets_and_weights_stay_aligned():
    side = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    weights = np.linspace(0.5, 2.0, 20).astype(np.float32)
    indices = np.array([9, 2, 17, 4, 11])
    dataset = pipeline.from_columns(
        {"mel": pipeline.ArrayColumn(FEATURES, lambda x: -x), "aux": side},
        TARGETS,
        weights=weights,
        batch_size=2,
        indices=indices,
    )
    batches = [(inputs, y.numpy(), w.numpy()) for inputs, y, w in dataset]
    assert [len(y) for _, y, _ in batches] == [2, 2, 1]
    assert set(batches[0][0]) == {"mel", "aux"}
    np.testing.assert_array_equal(np.concatenate([i["mel"].numpy() for i, _, _ in batches]), -FEATURES[indices])
    np.testing.assert_array_equal(np.concatenate([i["aux"].numpy() for i, _, _ in batches])[:, 0], indices)
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches]).argmax(axis=1), indices)
    np.testing.assert_array_equal(np.concatenate([w for _, _, w in batches]), weights[indices])


def _crops(seed, epoch, starts=None, first_epoch=None):
    column = pipeline.CropColumn(VALUES, OFFSETS, LENGTHS, frames=6, transform=lambda v: v + 1, starts=starts)
    if first_epoch is None:
        return [x.numpy() for x in pipeline.from_columns(column, batch_size=3, shuffle=False, seed=seed, epoch=epoch)]
    stream = tf.data.Dataset.range(first_epoch, 3).flat_map(
        lambda e: pipeline.from_columns(column, batch_size=3, seed=seed, epoch=e)
    )
    return [x.numpy() for x in stream]


def test_token_crops_are_windows_of_their_own_row_transformed_then_zero_padded():
    crops = np.concatenate(_crops(seed=4, epoch=0))
    assert crops.shape == (7, 5, 6, 1)
    for row, crop in enumerate(crops[..., 0]):
        start = int(crop[0, 0] - 1 - VALUES[OFFSETS[row], 0]) // 5  # the first frame's value names it
        length = min(LENGTHS[row] - start, 6)
        assert 0 <= start <= max(LENGTHS[row] - 6, 0)
        np.testing.assert_array_equal(
            crop[:, :length], VALUES[OFFSETS[row] + start : OFFSETS[row] + start + length].T + 1
        )
        assert not crop[:, length:].any()  # padding stays 0 whatever the transform
    assert not np.array_equal(crops, np.concatenate(_crops(seed=4, epoch=1)))  # anew every epoch
    np.testing.assert_array_equal(crops, np.concatenate(_crops(seed=4, epoch=0)))  # and again for the seed
    resumed = _crops(seed=4, epoch=None, first_epoch=1)  # a stream started at epoch 1 (a resumed member)
    whole = _crops(seed=4, epoch=None, first_epoch=0)
    for expected, actual in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_fixed_starts_crop_where_they_say():
    starts = np.array([0, 1, 0, 6, 0, 3, 0])
    crops = np.concatenate(_crops(seed=None, epoch=0, starts=starts))[..., 0]
    np.testing.assert_array_equal(crops[3], VALUES[OFFSETS[3] + 6 : OFFSETS[3] + 12].T + 1)
    np.testing.assert_array_equal(crops[5], VALUES[OFFSETS[5] + 3 : OFFSETS[5] + 9].T + 1)


def test_from_columns_refuses_misaligned_columns_and_random_draws_without_a_seed():
    with pytest.raises(ValueError, match=r"the same rows: input 'a' 20, input 'b' 3, targets 20"):
        pipeline.from_columns({"a": FEATURES, "b": FEATURES[:3]}, TARGETS, batch_size=2)
    with pytest.raises(ValueError, match=r"need a seed"):
        pipeline.from_columns(pipeline.CropColumn(VALUES, OFFSETS, LENGTHS, frames=6), batch_size=2)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        pipeline.from_columns(FEATURES, batch_size=0)


def test_from_columns_gives_ai_cups_weighted_batches():
    """What the AI CUP task trains on: named inputs, one-hot labels and the class weight of each row's label, in
    the epoch's order for the seed, the last incomplete batch dropped (the source's loader: drop_last=True)."""
    rng = np.random.default_rng(1)
    inputs = {"mfcc_13": rng.random((11, 13, 4, 1), dtype=np.float32), "clinical": rng.random((11, 44), np.float32)}
    labels = rng.integers(1, 6, 11)
    class_weights = np.linspace(1, 2, 5)
    one_hot = np.eye(5, dtype=np.float32)[labels - 1]
    options = dict(batch_size=4, shuffle=True, seed=2, epoch=3, drop_remainder=True)
    actual = pipeline.from_columns(inputs, one_hot, weights=class_weights[labels - 1], **options)
    order = pipeline.shuffled(tf.range(11, dtype=tf.int64), 2, 3).numpy()
    # whole batches have a static size, as tf.data's own: the training step is traced for it
    assert actual.element_spec[0]["mfcc_13"].shape == (4, 13, 4, 1) and actual.element_spec[2].shape == (4,)
    ragged = pipeline.from_columns(inputs, one_hot, batch_size=4)
    assert ragged.element_spec[0]["mfcc_13"].shape == (None, 13, 4, 1)
    batches = list(actual)
    assert len(batches) == 2  # 11 rows: two batches of 4, the last 3 rows dropped
    for index, (x, y, w) in enumerate(batches):
        rows = order[4 * index : 4 * (index + 1)]
        for name in inputs:
            np.testing.assert_array_equal(x[name].numpy(), inputs[name][rows])
        np.testing.assert_array_equal(y.numpy(), one_hot[rows])
        np.testing.assert_array_equal(w.numpy(), class_weights[labels[rows] - 1].astype(np.float32))
