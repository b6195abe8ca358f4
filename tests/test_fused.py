"""Fused seed ensembles: the packed model computes each member's function, and training K members fused
gives the weights of K independent runs (same initial weights, same batches)."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
from keras import layers

from models.dacon import build_dacon_model
from replicate import files, fused, pipeline, train
from tests.test_train import KillAfterEpoch, assert_same_member

RNG = np.random.default_rng(3)
FEATURES = RNG.normal(size=(24, 32, 32, 4)).astype(np.float32)
TARGETS = RNG.dirichlet(np.ones(30), size=24).astype(np.float32)
# The source's model on a small input; dropout off, since fused dropout masks are drawn differently.
BUILD = functools.partial(build_dacon_model, input_shape=(32, 32, 4), dropout=0.0)
# The same builder with every layer kind but narrow, for the training tests.
BUILD_NARROW = functools.partial(
    build_dacon_model,
    input_shape=(32, 32, 4),
    plain_filters=(4,),
    bottleneck_filters=((4, 8),),
    dense_units=8,
    dropout=0.0,
)


def _members(count, build=BUILD):
    members = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        members.append(build())
    return members


def _two_input_model():
    """Resizing, max-pooling, a projected residual block, global pooling and a concatenated side input."""
    spectrogram = keras.Input((8, 16, 1), name="mel")
    side = keras.Input((2,), name="aux")
    x = layers.Resizing(16, 16, name="resize")(spectrogram)
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="stem")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    shortcut = layers.Conv2D(4, 1, name="projection")(x)
    x = layers.Conv2D(4, 3, padding="same", name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(layers.Add(name="add")([x, shortcut]))
    x = layers.Dense(5, name="fc")(layers.GlobalAveragePooling2D(name="gap")(x))
    x = layers.Concatenate(name="concat")([x, side])
    return keras.Model([spectrogram, side], layers.Dense(3, activation="softmax", name="out")(x))


LAYOUTS = pytest.mark.parametrize("layout", ["grouped", "copies"])

# How fused results are compared with one-at-a-time results. "copies" runs member k's own copy of every layer
# on its own block of channels: the same operations on the same shapes as the member alone, so the results
# are the same bits (float32, as the recipes train). "grouped" computes all members in one grouped convolution
# or einsum, which sums in another order; there the comparison runs in float64, where reordering a sum of n
# terms moves it by at most n·u·Σ|terms| (u = 2⁻⁵³; Higham, "Accuracy and Stability of Numerical Algorithms",
# §4.2). Each tolerance below is that bound for the test's largest sum, with the terms' scale named; a wrong
# packing (another member's weights or batch, a shared optimizer state) moves values by 1e-3 or more.
PRECISION = {"copies": "float32", "grouped": "float64"}
U64 = np.finfo(np.float64).eps / 2


def _assert_same(actual, expected, layout, atol, err_msg=""):
    """Bit for bit for "copies"; within the float64 reordering bound `atol` for "grouped"."""
    if layout == "copies":
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=err_msg)
    else:
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol, err_msg=err_msg)


@pytest.fixture
def precision(request):
    """Build and run under the layout's comparison precision (the test's `layout` parameter)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION[request.getfixturevalue("layout")])
    yield PRECISION[request.getfixturevalue("layout")]
    keras.config.set_dtype_policy(previous)


# Forward passes of these models: at most ~40 layers, each sum at most 3·3·512 terms of activations that
# BatchNormalization keeps near 1 (bounded by 1e3 here), and softmax outputs in [0, 1].
FORWARD_ATOL = 40 * 3 * 3 * 512 * 1e3 * U64


@LAYOUTS
@pytest.mark.parametrize("training", [False, True])
def test_fused_model_computes_every_members_function(training, layout, precision):
    members = _members(3)
    model = fused.pack(fused.fuse(members[0], 3, layout), members)
    stacked = np.concatenate([FEATURES[:8]] * 3, axis=-1) + RNG.normal(size=(8, 32, 32, 12))
    stacked = stacked.astype(precision)
    outputs = model(stacked, training=training)
    assert len(outputs) == 3 and model.output_shape == [(None, 30)] * 3
    for k, member in enumerate(members):
        expected = member(stacked[..., 4 * k : 4 * (k + 1)], training=training)
        _assert_same(outputs[k], expected, layout, FORWARD_ATOL)


@LAYOUTS
def test_two_input_model_with_side_features_fuses(layout, precision):
    members = _members(2, _two_input_model)
    model = fused.pack(fused.fuse(members[0], 2, layout), members)
    mel = RNG.normal(size=(4, 8, 16, 2)).astype(precision)
    aux = RNG.normal(size=(4, 4)).astype(precision)
    outputs = model.predict({"mel": mel, "aux": aux}, verbose=0)
    for k, member in enumerate(members):
        expected = member.predict({"mel": mel[..., k : k + 1], "aux": aux[:, 2 * k : 2 * k + 2]}, verbose=0)
        _assert_same(outputs[k], expected, layout, FORWARD_ATOL)


@LAYOUTS
def test_unpack_gives_back_the_packed_weights(layout):
    members = _members(2)
    model = fused.pack(fused.fuse(members[0], 2, layout), members)
    copies = fused.unpack(model, [BUILD(), BUILD()])
    for member, copy in zip(members, copies, strict=True):
        for original, unpacked in zip(member.get_weights(), copy.get_weights(), strict=True):
            np.testing.assert_array_equal(original, unpacked)


def test_stacked_batches_are_those_of_tf_concat_bit_for_bit():
    import tensorflow as tf

    def member(seed, dtype):  # two inputs (4 and 2 channels) and targets, as MAIC's members have
        rng = np.random.default_rng(seed)
        inputs = {"mel": rng.normal(size=(10, 3, 5, 4)), "aux": rng.normal(size=(10, 2))}
        inputs = {key: value.astype(dtype) for key, value in inputs.items()}
        return tf.data.Dataset.from_tensor_slices((inputs, rng.dirichlet(np.ones(3), 10))).batch(4)

    for dtype in (np.float32, np.float64):
        members = [member(seed, dtype) for seed in range(3)]
        batches = list(fused.stack_datasets(members))
        assert len(batches) == 3 and batches[0][0]["mel"].shape == (4, 3, 5, 12)
        for (inputs, targets), *parts in zip(batches, *members, strict=True):
            for key in ("mel", "aux"):
                expected = tf.concat([part[0][key] for part in parts], axis=-1)
                assert inputs[key].dtype == expected.dtype
                np.testing.assert_array_equal(inputs[key].numpy(), expected.numpy())
            for target, part in zip(targets, parts, strict=True):
                np.testing.assert_array_equal(target.numpy(), part[1].numpy())


def test_stacked_from_arrays_streams_are_read_in_one_step_to_the_same_batches():
    def member(seed):
        return pipeline.from_arrays(
            FEATURES, TARGETS, batch_size=5, transform=lambda x: x * 2 + 1, shuffle=True, seed=seed, epoch=1
        )

    members = [member(seed) for seed in range(3)]
    assert pipeline.stacked_from_arrays(members) is not None
    assert pipeline.stacked_from_arrays([*members, member(3).map(lambda x, y: (x, y))]) is None  # mapped further
    one_step = list(fused.stack_datasets(members))
    generic = list(fused.stack_datasets([dataset.map(lambda x, y: (x, y)) for dataset in members]))
    assert len(one_step) == len(generic) == 5 and one_step[-1][0].shape == (4, 32, 32, 12)
    for (x, targets), (expected_x, expected_targets) in zip(one_step, generic, strict=True):
        np.testing.assert_array_equal(x.numpy(), expected_x.numpy())
        for target, expected in zip(targets, expected_targets, strict=True):
            np.testing.assert_array_equal(target.numpy(), expected.numpy())


def test_a_layer_without_a_packed_form_is_named():
    inputs = keras.Input((10, 3))
    model = keras.Model(inputs, layers.Dense(2)(layers.Conv1D(4, 3, name="temporal")(inputs)))
    with pytest.raises(ValueError, match="cannot fuse layer 'temporal' of type Conv1D"):
        fused.fuse(model, 2, "grouped")
    assert fused.fuse(model, 2, "copies").output_shape == [(None, 8, 2)] * 2  # copies take any layer


def _ensemble(tmp_path, optimizer, width, epochs=2, seeds=(0, 1, 2), layout="auto", precision="float32"):
    recipe = {
        "train": {
            "epochs": epochs,
            "batch_size": 8,
            "optimizer": optimizer,
            "learning_rate": LEARNING_RATE,
            "loss": "KLDivergence",
            "fused": width,
            "fused_layout": layout,
            "precision": precision,
        }
    }
    return train.train_ensemble(
        recipe,
        list(seeds),
        run_dir=tmp_path,
        manifest={"task": "test", "class_names": [str(i) for i in range(30)]},
        trained_from={"features": FEATURES, "targets": TARGETS},
        log=lambda _: None,
        build_model=lambda seed: BUILD_NARROW(),
        train_data=lambda seed, epoch: pipeline.from_arrays(
            FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch
        ),
        verbose=0,
    )


# Training: 24 rows in batches of 8 for 2 epochs = 6 steps at LEARNING_RATE. A weight gradient sums at most
# 8 rows × 32 × 32 positions = 8192 terms (×3·3·8 along the backward chain, bounded with the rest by the
# terms' scale 1, the batch mean of a KL gradient). So in float64 one step's gradient moves by at most
# GRADIENT_ERROR; SGD turns that into LEARNING_RATE × GRADIENT_ERROR per step. Nadam divides by
# sqrt(v̂) + ε ≥ ε = 1e-7: a weight whose true gradient is 0 (a bias that feeds BatchNormalization) takes a
# step of up to LEARNING_RATE × GRADIENT_ERROR / ε, the largest move rounding can cause.
LEARNING_RATE = 0.01
TRAINING_STEPS = 6
GRADIENT_ERROR = 8192 * 3 * 3 * 8 * U64
SGD_ATOL = TRAINING_STEPS * LEARNING_RATE * GRADIENT_ERROR
NADAM_ATOL = TRAINING_STEPS * LEARNING_RATE * GRADIENT_ERROR / 1e-7


def _compare_members(tmp_path, seeds, layout, atol):
    for seed in seeds:
        name = f"members/seed-0{seed}.keras"
        one_by_one = keras.models.load_model(tmp_path / "sequential" / name)
        together = keras.models.load_model(tmp_path / "fused" / name)
        for expected, actual in zip(one_by_one.weights, together.weights, strict=True):
            _assert_same(actual, expected, layout, atol, err_msg=expected.path)


@LAYOUTS
def test_fused_training_equals_sequential_training_sgd(tmp_path, layout):
    _ensemble(tmp_path / "sequential", "SGD", 1, precision=PRECISION[layout])
    manifest = _ensemble(tmp_path / "fused", "SGD", 3, layout=layout, precision=PRECISION[layout])
    assert [m["fused"]["seeds"] for m in manifest["members"]] == [[0, 1, 2]] * 3
    _compare_members(tmp_path, range(3), layout, SGD_ATOL)
    for seed in range(3):
        history = (tmp_path / "fused" / f"members/seed-0{seed}.history.csv").read_text().splitlines()
        sequential_history = (tmp_path / "sequential" / f"members/seed-0{seed}.history.csv").read_text()
        assert history[0] == sequential_history.splitlines()[0] and len(history) == 3  # epoch,loss,...
        _assert_same(
            [float(row.split(",")[1]) for row in history[1:]],
            [float(row.split(",")[1]) for row in sequential_history.splitlines()[1:]],
            layout,
            FORWARD_ATOL,  # the loss is the mean of a forward pass's outputs
        )


@LAYOUTS
def test_fused_training_with_the_source_optimizer_equals_sequential_training(tmp_path, layout):
    """Keras 2's Nadam (DACON's optimizer) amplifies a gradient's rounding noise where the true gradient is near 0, so
    float32 grouped and one-at-a-time runs part by up to a learning-rate step there; "copies" must still give
    the same bits, and "grouped" in float64 stays within the bound above, every weight compared."""
    _ensemble(tmp_path / "sequential", "Keras2Nadam", 1, seeds=(0, 1), precision=PRECISION[layout])
    _ensemble(tmp_path / "fused", "Keras2Nadam", 2, seeds=(0, 1), layout=layout, precision=PRECISION[layout])
    _compare_members(tmp_path, range(2), layout, NADAM_ATOL)


class _KillAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt("killed")


def test_an_interrupted_fused_group_resumes_and_leftover_seeds_train_alone(tmp_path):
    arguments = dict(
        run_dir=tmp_path,
        manifest={"task": "test", "class_names": [str(i) for i in range(30)]},
        trained_from={"features": FEATURES, "targets": TARGETS},
        log=lambda _: None,
        build_model=lambda seed: BUILD_NARROW(),
        train_data=lambda seed, epoch: pipeline.from_arrays(
            FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch
        ),
        verbose=0,
    )
    recipe = {
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "SGD", "learning_rate": 0.01, "loss": "KLDivergence"}
    }
    recipe["train"]["fused"] = 2
    with pytest.raises(KeyboardInterrupt):
        train.train_ensemble(recipe, [0, 1, 2], callbacks=[_KillAfterFirstEpoch()], **arguments)
    assert (tmp_path / "checkpoints" / "fused-00-01").is_dir()
    logged = []
    manifest = train.train_ensemble(recipe, [0, 1, 2], **{**arguments, "log": logged.append})
    checkpoint = tmp_path / "checkpoints" / "fused-00-01" / "epoch-0001"
    assert logged == [
        "members 1/3 (seed 0), 2/3 (seed 1): training as one fused model",
        f"fused-00-01: resuming after epoch 1 ({checkpoint})",  # the members' own lines go to the same log
        "member 3/3 (seed 2): training",
    ]
    assert [m["epochs_this_session"] for m in manifest["members"]] == [1, 1, 2]
    assert "fused" not in manifest["members"][2]
    assert [m["seed"] for m in files.read_json(tmp_path / "manifest.json")["members"]] == [0, 1, 2]
    assert not (tmp_path / "checkpoints" / "fused-00-01").exists()


def _small_model_with_dropout():
    inputs = keras.Input((32, 32, 4))
    x = layers.Conv2D(4, 3, strides=4, activation="relu", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Dropout(0.3, name="dropout")(layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inputs, layers.Dense(30, activation="softmax", name="out")(x))


def _train_group(run_dir, learning_rate=0.01, callbacks=()):
    """Seeds 0 and 1 as one fused group, 3 epochs, with dropout (its random state must resume too)."""
    recipe = {
        "train": {"epochs": 3, "batch_size": 8, "optimizer": "Adam", "learning_rate": learning_rate}
        | {"loss": "KLDivergence", "fused_layout": "copies"}
    }
    return train.train_fused(
        recipe,
        [0, 1],
        run_dir=run_dir,
        build_model=lambda seed: _small_model_with_dropout(),
        train_data=lambda seed, epoch: pipeline.from_arrays(
            FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch
        ),
        callbacks=callbacks,
        verbose=0,
        log=lambda _: None,
    )


def test_a_killed_fused_group_resumes_to_the_files_of_an_uninterrupted_group(tmp_path):
    _train_group(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train_group(tmp_path / "killed", callbacks=[KillAfterEpoch(1)])
    entries = _train_group(tmp_path / "killed")
    assert [entry["epochs_this_session"] for entry in entries] == [2, 2]
    for seed in (0, 1):
        assert_same_member(tmp_path / "whole", tmp_path / "killed", seed)
    group_history = "members/fused-00-01.history.csv"
    assert (tmp_path / "killed" / group_history).read_text() == (tmp_path / "whole" / group_history).read_text()
    assert not (tmp_path / "killed" / "checkpoints" / "fused-00-01").exists()


def test_a_non_finite_loss_in_a_fused_group_names_its_seeds_and_saves_nothing(tmp_path):
    with pytest.raises(train.NonFiniteLossError, match=r"^seeds? [01].* \(fused group of \[0, 1\]\): .* at epoch 1"):
        _train_group(tmp_path, learning_rate=1e30)
    assert not list((tmp_path / "members").glob("*.keras"))


def test_fused_training_refuses_per_member_callbacks(tmp_path):
    recipe = {
        "train": {"epochs": 1, "batch_size": 8, "optimizer": "SGD", "learning_rate": 0.01, "loss": "KLDivergence"}
    }
    with pytest.raises(ValueError, match="set train.fused = 1"):
        train.train_fused(
            recipe,
            [0, 1],
            run_dir=tmp_path,
            build_model=lambda seed: BUILD_NARROW(),
            train_data=lambda seed, epoch: pipeline.from_arrays(FEATURES, TARGETS, batch_size=8),
            member_callbacks=lambda run_dir, name: [keras.callbacks.ReduceLROnPlateau()],
        )


@LAYOUTS
def test_the_ai_cup_model_with_its_edge_padding_and_frame_standardisation_fuses(layout, precision):
    from models.aicup import build_aicup_model

    build = functools.partial(build_aicup_model, n_mfcc=13, clinical_units=(8,), head_units=8)
    members = _members(2, build)
    model = fused.pack(fused.fuse(members[0], 2, layout), members)
    mfcc = RNG.normal(size=(3, 13, 126, 2)).astype(precision)
    clinical = RNG.normal(size=(3, 88)).astype(precision)
    outputs = model.predict({"mfcc_13": mfcc, "clinical": clinical}, verbose=0)
    for k, member in enumerate(members):
        expected = member.predict(
            {"mfcc_13": mfcc[..., k : k + 1], "clinical": clinical[:, 44 * k : 44 * (k + 1)]}, verbose=0
        )
        _assert_same(outputs[k], expected, layout, FORWARD_ATOL)


@LAYOUTS
def test_the_maic_model_with_its_resizing_and_side_input_trains_fused_as_one_at_a_time(layout, precision):
    """One SGD step with the recipe's focal loss: the fused members' weights are those of members trained
    one by one on their own batches (the MAIC mini-ResNet, narrow, without dropout)."""
    from models.maic import build_maic_model

    build = functools.partial(
        build_maic_model, mel_bins=16, frames=16, resized_mel_bins=32, stem_filters=4, stage_filters=(6, 8), dropout=0.0
    )
    members = _members(2, build)
    model = fused.pack(fused.fuse(members[0], 2, layout), members)
    mel = RNG.normal(size=(8, 16, 16, 2)).astype(precision)
    aux = RNG.normal(size=(8, 4)).astype(precision)
    targets = [np.eye(21, dtype=precision)[RNG.integers(0, 21, 8)] for _ in range(2)]
    recipe = {"optimizer": "SGD", "learning_rate": 0.1, "loss": "CategoricalFocalCrossentropy"}
    train.compile_model(model, recipe)
    model.fit({"mel": mel, "aux": aux}, targets, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for k, member in enumerate(members):
        train.compile_model(member, recipe)
        inputs = {"mel": mel[..., k : k + 1], "aux": aux[:, 2 * k : 2 * k + 2]}
        member.fit(inputs, targets[k], batch_size=8, epochs=1, verbose=0, shuffle=False)
    # One SGD step of 0.1 on gradients that sum 8 rows × 16 × 32 positions (× 3·3·8 along the chain).
    atol = 0.1 * 8 * 16 * 32 * 3 * 3 * 8 * U64
    for member, unpacked in zip(members, fused.unpack(model, [build(), build()]), strict=True):
        for expected, actual in zip(member.weights, unpacked.weights, strict=True):
            _assert_same(actual, expected, layout, atol, err_msg=expected.path)
