"""Training engine: same seed → same weights; a killed ensemble resumes with finished members kept."""

from __future__ import annotations

import errno
import io
import json
import re
import zipfile

import keras
import numpy as np
import pytest

from models.dacon import build_dacon_model
from replicate import files, metrics, optimizers, pipeline, runner, train
from replicate.ensemble import Ensemble
from tests.conftest import run_python

RNG = np.random.default_rng(0)
FEATURES = RNG.normal(size=(32, 64, 101, 4)).astype(np.float32)
TARGETS = RNG.dirichlet(np.ones(30), size=32).astype(np.float32)
RECIPE = {"train": {"epochs": 2, "batch_size": 8, "optimizer": "Nadam", "learning_rate": 0.002, "loss": "KLDivergence"}}


def _small_model():
    inputs = keras.Input((64, 101, 4))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="mish")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Dense(30, activation="softmax")(x))


def _arguments(build_model=_small_model):
    return dict(
        build_model=lambda seed: build_model(),
        train_data=lambda seed, epoch: pipeline.from_arrays(
            FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch
        ),
        verbose=0,
    )


def test_same_seed_gives_identical_weights_with_the_source_model(tmp_path):
    recipe = {"train": {**RECIPE["train"], "epochs": 1}}
    arguments = {
        **_arguments(build_dacon_model),
        "train_data": lambda seed, epoch: pipeline.from_arrays(
            FEATURES[:12], TARGETS[:12], batch_size=4, shuffle=True, seed=seed, epoch=epoch
        ),
    }
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        train.train_member(recipe, seed, run_dir=tmp_path / run, **arguments)
    weights = {
        run: keras.models.load_model(tmp_path / run / f"members/seed-0{seed}.keras").get_weights()
        for run, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    for first, second in zip(weights["a"], weights["b"], strict=True):
        np.testing.assert_array_equal(first, second)
    assert not np.array_equal(weights["c"][0], weights["a"][0])


def test_a_member_trained_with_a_loss_of_this_package_loads_where_only_keras_is(tmp_path):
    recipe = {"train": {**RECIPE["train"], "epochs": 1, "loss": "DoubleSoftmaxCrossentropy"}}
    train.train_member(recipe, 0, run_dir=tmp_path, **_arguments())
    member = tmp_path / "members" / "seed-00.keras"
    # Saved without its training configuration: Keras would need replicate.losses imported to rebuild it.
    run_python(
        "import keras, numpy as np\n"
        f"model = keras.models.load_model({str(member)!r}, safe_mode=True)\n"
        "assert not model.compiled and model.output_shape == (None, 30)\n"
        "print(model.predict(np.zeros((1, 64, 101, 4), np.float32), verbose=0).sum())\n",
        cwd=tmp_path,
    )


class KillSecondMember(keras.callbacks.Callback):
    """Stops the run the hard way at the end of the second member's first epoch (after its checkpoint)."""

    def __init__(self):
        super().__init__()
        self.members_started = 0

    def on_train_begin(self, logs=None):
        self.members_started += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.members_started == 2:
            raise KeyboardInterrupt("killed")


def test_killed_ensemble_resumes_keeping_finished_members(tmp_path):
    manifest = {"task": "test", "class_names": [str(i) for i in range(30)]}
    with pytest.raises(KeyboardInterrupt):
        train.train_ensemble(
            RECIPE,
            [0, 1],
            run_dir=tmp_path,
            manifest=manifest,
            trained_from={},
            log=lambda _: None,
            callbacks=[KillSecondMember()],
            **_arguments(),
        )
    members = tmp_path / "members"
    assert (members / "seed-00.keras").is_file() and not (members / "seed-01.keras").exists()
    assert [m["seed"] for m in files.read_json(tmp_path / "manifest.json")["members"]] == [0]
    assert (tmp_path / "checkpoints" / "seed-01").is_dir()  # the interrupted member's last epoch
    finished_at = (members / "seed-00.keras").stat().st_mtime_ns

    logged = []
    result = train.train_ensemble(
        RECIPE, [0, 1], run_dir=tmp_path, manifest=manifest, trained_from={}, log=logged.append, **_arguments()
    )
    assert logged[0] == "member 1/2 (seed 0): already trained, kept"
    assert (members / "seed-00.keras").stat().st_mtime_ns == finished_at
    second = result["members"][1]
    assert second["seed"] == 1 and second["epochs"] == 2 and second["epochs_this_session"] == 1  # resumed
    assert [row for row in (members / "seed-01.history.csv").read_text().splitlines()[1:]][-1].startswith("1,")
    assert not (tmp_path / "checkpoints" / "seed-01").exists()
    ensemble = Ensemble.load(tmp_path)
    assert ensemble.seeds == [0, 1]
    probabilities = ensemble.predict(FEATURES[:5])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, ensemble.predict_members(FEATURES[:5]).mean(axis=0))
    scores = ensemble.evaluate(FEATURES, TARGETS, metrics.kl_divergence)
    members = ensemble.predict_members(FEATURES)
    assert scores["member"] == [metrics.kl_divergence(TARGETS, p) for p in members]
    assert scores["ensemble_by_size"]["2"] == pytest.approx(metrics.kl_divergence(TARGETS, members.mean(axis=0)))
    assert scores["ensemble_by_size"]["2"] <= np.mean(scores["member"])  # KL is convex in the prediction


def test_exported_members_keep_the_trained_model_and_are_kept_when_training_again(tmp_path):
    manifest = {"task": "test", "class_names": [str(i) for i in range(30)]}
    recipe = dict(RECIPE, train={**RECIPE["train"], "epochs": 1})
    options = dict(run_dir=tmp_path, manifest=manifest, trained_from={}, **_arguments())
    train.train_ensemble(recipe, [0], log=lambda _: None, **options)
    trained = keras.models.load_model(tmp_path / "members" / "seed-00.keras")

    def export(model):  # a new model of the same layers, told apart by its name
        return keras.Model(model.inputs, model.outputs, name="exported")

    logged = []
    train.export_members(tmp_path, export, "a new name", log=logged.append)
    train.export_members(tmp_path, export, "a new name", log=logged.append)  # done: nothing to do
    assert logged == ["member seed-00.keras: exported (a new name)"]
    [entry] = files.read_json(tmp_path / "manifest.json")["members"]
    assert entry["exported"] and entry["training_file"] == "training/seed-00.keras"
    member = keras.models.load_model(tmp_path / "members" / "seed-00.keras")
    kept = keras.models.load_model(tmp_path / "training" / "seed-00.keras")
    assert member.name == "exported" and kept.name == trained.name != "exported"
    np.testing.assert_array_equal(member.predict(FEATURES[:4], verbose=0), trained.predict(FEATURES[:4], verbose=0))
    logged = []  # the member's record took the exported file's SHA-256: the member is kept, not refused
    train.train_ensemble(recipe, [0], log=logged.append, **options)
    assert logged[0] == "member 1/1 (seed 0): already trained, kept"


def test_batchnorm_recalibration_averages_the_batch_statistics_with_final_weights():
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(momentum=0.99)(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(1).normal(2.0, 3.0, size=(40, 4)).astype(np.float32)
    dataset = pipeline.from_arrays(data, np.zeros((40, 1), np.float32), batch_size=10)
    kernel, bias = (weight.numpy() for weight in model.layers[1].weights)
    batches = train.recalibrate_batchnorm(model, dataset, max_batches=3)
    assert batches == 3
    dense_outputs = [data[start : start + 10] @ kernel + bias for start in (0, 10, 20)]
    batch_norm = model.layers[2]
    np.testing.assert_allclose(
        batch_norm.moving_mean.numpy(), np.mean([o.mean(0) for o in dense_outputs], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        batch_norm.moving_variance.numpy(), np.mean([o.var(0) for o in dense_outputs], 0), rtol=1e-4
    )
    assert batch_norm.momentum == 0.99
    np.testing.assert_array_equal(model.layers[1].weights[0].numpy(), kernel)  # nothing else changed


def test_compile_model_passes_loss_options_weight_decay_and_metrics():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    recipe = {
        "optimizer": "SGD",
        "learning_rate": 0.01,
        "weight_decay": 1e-4,
        "loss": "CategoricalFocalCrossentropy",
        "loss_options": {"alpha": 0.5, "gamma": 3.0},
    }
    train.compile_model(model, recipe, metrics=["accuracy"])
    assert model.optimizer.weight_decay == pytest.approx(1e-4)
    assert model.loss.alpha == 0.5 and model.loss.gamma == 3.0
    history = model.fit(np.ones((4, 3)), np.eye(2)[[0, 1, 0, 1]], epochs=1, verbose=0)
    assert "accuracy" in history.history


class _ScriptedScores:
    """A score function that returns the next of fixed values and remembers the weights it was shown."""

    def __init__(self, values):
        self.values = list(values)
        self.weights = []

    def __call__(self, model):
        self.weights.append([w.copy() for w in model.get_weights()])
        return {"val_score": self.values[len(self.weights) - 1]}


def test_best_epoch_logs_its_score_and_restores_the_best_weights(tmp_path):
    scores = _ScriptedScores([0.2, 0.7, 0.4, 0.5])
    recipe = {"train": {**RECIPE["train"], "epochs": 4}}

    def member_callbacks(run_dir, name):
        return [train.BestEpoch(scores, monitor="val_score")]

    entry = train.train_member(recipe, 0, run_dir=tmp_path / "run", member_callbacks=member_callbacks, **_arguments())
    assert entry["best_epoch"] == 2 and entry["best"] == {"val_score": 0.7}
    saved = keras.models.load_model(tmp_path / "run" / "members" / "seed-00.keras").get_weights()
    for restored, best in zip(saved, scores.weights[1], strict=True):
        np.testing.assert_array_equal(restored, best)
    assert not np.array_equal(saved[0], scores.weights[3][0])  # the last epoch's weights were replaced
    history = np.genfromtxt(tmp_path / "run" / "members" / "seed-00.history.csv", delimiter=",", names=True)
    np.testing.assert_allclose(history["val_score"], [0.2, 0.7, 0.4, 0.5])
    assert len(history) == 4 and not (tmp_path / "run" / "checkpoints" / "seed-00").exists()  # member saved


def test_best_epoch_scores_every_few_epochs_and_after_the_last(tmp_path):
    scores = _ScriptedScores([0.3, 0.1, 0.2])
    best = train.BestEpoch(scores, monitor="val_score", mode="min", every=2)
    model = train.compile_model(_small_model(), RECIPE["train"])
    logger = keras.callbacks.CSVLogger(str(tmp_path / "history.csv"))
    model.fit(pipeline.from_arrays(FEATURES, TARGETS, batch_size=8), epochs=5, callbacks=[best, logger], verbose=0)
    assert len(scores.weights) == 3  # after epochs 2, 4 and 5 (the last)
    assert best.best_epoch == 4 and best.best == 0.1
    history = np.genfromtxt(tmp_path / "history.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(history["val_score"], [np.nan, 0.3, np.nan, 0.1, 0.2])  # NaN: not scored


def test_best_epoch_refuses_a_score_without_the_monitored_value():
    best = train.BestEpoch(lambda model: {"val_other": 1.0}, monitor="val_score")
    model = train.compile_model(_small_model(), RECIPE["train"])
    with pytest.raises(ValueError, match="without the monitored 'val_score'"):
        model.fit(pipeline.from_arrays(FEATURES, TARGETS, batch_size=8), epochs=1, callbacks=[best], verbose=0)


def test_a_member_trained_with_the_packages_optimizer_is_saved_for_plain_keras(tmp_path):
    recipe = {"train": {**RECIPE["train"], "epochs": 1, "optimizer": "Keras2Nadam"}}
    compiled = train.compile_model(_small_model(), recipe["train"])
    assert isinstance(compiled.optimizer, optimizers.Keras2Nadam)
    assert float(compiled.optimizer.learning_rate) == pytest.approx(0.002)
    portable = train.loadable_anywhere(compiled)
    assert not portable.compiled and portable.name == compiled.name  # the same network, uncompiled
    assert len(portable.weights) == len(compiled.weights) and all(
        ours is theirs for ours, theirs in zip(portable.weights, compiled.weights, strict=True)
    )

    train.train_member(recipe, 0, run_dir=tmp_path, **_arguments())
    with zipfile.ZipFile(tmp_path / "members" / "seed-00.keras") as archive:
        config = archive.read("config.json").decode()
    assert "replicate" not in config and not json.loads(config)["compile_config"]  # only Keras's own objects
    model = keras.models.load_model(tmp_path / "members" / "seed-00.keras", safe_mode=True)
    assert model.predict(FEATURES[:2], verbose=0).shape == (2, 30)


def test_members_train_and_save_under_the_recipes_precision(tmp_path):
    recipe = {"train": {**RECIPE["train"], "epochs": 1, "precision": "mixed_bfloat16"}}
    train.train_member(recipe, 0, run_dir=tmp_path, **_arguments())
    model = keras.models.load_model(tmp_path / "members" / "seed-00.keras")
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the process's policy is left as it was


def test_mirrored_training_uses_every_device_and_saves_an_ordinary_member(tmp_path):
    # Two logical CPUs stand in for two GPUs; they must be set before TensorFlow starts: a fresh process.
    run_python(
        "import numpy as np, tensorflow as tf, keras\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from replicate import pipeline, train\n"
        "from tests.test_train import FEATURES, TARGETS, RECIPE, _small_model\n"
        "recipe = {'train': {**RECIPE['train'], 'epochs': 1, 'distribute': 'mirrored'}}\n"
        "with train.distribution_scope(recipe['train']):\n"
        "    assert tf.distribute.get_strategy().num_replicas_in_sync == 2\n"
        "data = lambda seed, epoch: pipeline.from_arrays(FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed,"
        " epoch=epoch)\n"
        f"train.train_member(recipe, 0, run_dir={str(tmp_path)!r}, build_model=lambda seed: _small_model(),"
        " train_data=data, verbose=0)\n"
    )
    model = keras.models.load_model(tmp_path / "members" / "seed-00.keras")  # no strategy needed to load
    assert model.predict(FEATURES[:2], verbose=0).shape == (2, 30)


# --- the run folder: what a member was trained from, damaged members, the manifest rebuilt ---------

ONE_EPOCH = {"train": {**RECIPE["train"], "epochs": 1}}
DATA = {"features": FEATURES, "targets": TARGETS}


def _train_ensemble(run_dir, seeds, recipe=ONE_EPOCH, trained_from=DATA, **options):
    return train.train_ensemble(
        recipe,
        seeds,
        run_dir=run_dir,
        manifest={"task": "test", "class_names": [str(i) for i in range(30)]},
        trained_from=trained_from,
        **{"log": lambda _: None, **_arguments(), **options},
    )


class CountTrainings(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_begin(self, logs=None):
        self.count += 1


def test_the_set_up_leaves_out_what_does_not_change_a_member():
    recipe = {
        "name": "x",
        "train": {**RECIPE["train"], "fused": 1},
        "features": {"n_mels": 64},
        "ensemble": {"seeds": 3, "first_seed": 0},
        "run": {"workers": 0, "cache_dir": "a", "runs_dir": "runs", "profile": "quick"},
    }
    setup = train.training_setup(recipe, DATA)
    same = {
        **recipe,
        "name": "y",
        "train": {**recipe["train"], "fused": 4, "fused_layout": "copies", "distribute": "mirrored"},
        "ensemble": {"seeds": 15, "first_seed": 0},
        "run": {"workers": 2, "cache_dir": "b", "runs_dir": "elsewhere", "profile": "full"},
    }
    assert train.setup_changes(setup, train.training_setup(same, {"targets": TARGETS, "features": FEATURES})) == []
    other = {**recipe, "features": {"n_mels": 32}, "ensemble": {"seeds": 3, "first_seed": 1}}
    assert train.setup_changes(setup, train.training_setup(other, {**DATA, "targets": TARGETS[::-1]})) == [
        "ensemble.first_seed: 0 → 1",
        "features.n_mels: 64 → 32",
        "other targets",
    ]
    one_value = FEATURES.copy()
    one_value[3, 2, 1, 0] += 1e-6  # the data are compared by content, to the last bit
    assert train.setup_changes(setup, train.training_setup(recipe, {**DATA, "features": one_value})) == [
        "other features"
    ]


def test_a_member_of_another_set_up_is_refused_until_retrain_and_added_seeds_keep_it(tmp_path):
    _train_ensemble(tmp_path, [0])
    member = tmp_path / "members" / "seed-00.keras"
    trained_at = member.stat().st_mtime_ns
    other_data = {**DATA, "targets": TARGETS[::-1]}
    with pytest.raises(runner.RunFolderError) as error:
        _train_ensemble(tmp_path, [0, 1], trained_from=other_data)
    assert str(error.value) == (
        f"{tmp_path}: the member of seed 0 was trained from another set-up (other targets); use another "
        "--run-dir, or --retrain to train it again"
    )
    longer = {"train": {**RECIPE["train"], "epochs": 2}}
    with pytest.raises(runner.RunFolderError, match=r"\(train\.epochs: 1 → 2\)"):
        _train_ensemble(tmp_path, [0], longer)
    assert member.stat().st_mtime_ns == trained_at and not (tmp_path / "members" / "seed-01.keras").exists()

    logged = []
    _train_ensemble(tmp_path, [0, 1], log=logged.append)  # seeds added to the same set-up: the member is kept
    assert logged == ["member 1/2 (seed 0): already trained, kept", "member 2/2 (seed 1): training"]
    assert member.stat().st_mtime_ns == trained_at

    logged = []
    counted = CountTrainings()
    manifest = _train_ensemble(
        tmp_path, [0], trained_from=other_data, retrain=True, log=logged.append, callbacks=[counted]
    )
    assert logged == [
        "seed 0: trained from another set-up (other targets); removed (--retrain)",
        "seed 1: trained from another set-up (other targets); removed (--retrain)",
        "member 1/1 (seed 0): training",
    ]
    assert counted.count == 1 and member.stat().st_mtime_ns != trained_at
    assert [m["seed"] for m in manifest["members"]] == [0] and not (tmp_path / "members" / "seed-01.json").exists()
    assert len((tmp_path / "members" / "seed-00.history.csv").read_text().splitlines()) == 2  # header, one epoch
    _train_ensemble(tmp_path, [0], trained_from=other_data, callbacks=[counted])  # the new set-up is kept
    assert counted.count == 1


def test_an_interrupted_member_of_another_set_up_starts_over_with_retrain(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train_ensemble(tmp_path, [0, 1], RECIPE, callbacks=[KillSecondMember()])
    assert (tmp_path / "checkpoints" / "seed-01").is_dir()
    with pytest.raises(runner.RunFolderError, match=r"the members of seeds 0, 1 were trained .* \(other features\)"):
        _train_ensemble(tmp_path, [0, 1], RECIPE, trained_from={**DATA, "features": FEATURES[::-1]})
    assert (tmp_path / "checkpoints" / "seed-01").is_dir()  # nothing removed without --retrain
    manifest = _train_ensemble(
        tmp_path, [0, 1], RECIPE, trained_from={**DATA, "features": FEATURES[::-1]}, retrain=True
    )
    assert [m["epochs_this_session"] for m in manifest["members"]] == [2, 2]  # from the start, not resumed


def test_a_damaged_member_is_detected_and_trained_again(tmp_path):
    _train_ensemble(tmp_path, [0])
    member = tmp_path / "members" / "seed-00.keras"
    for damage in ("truncated", "overwritten", "deleted"):
        content = member.read_bytes()
        if damage == "truncated":
            member.write_bytes(content[: len(content) // 2])
            problem = "is damaged (its SHA-256 differs from members/seed-00.json)"
            with pytest.raises(runner.RunFolderError, match=rf"{tmp_path}: members/seed-00.keras {re.escape(problem)}"):
                Ensemble.load(tmp_path)  # loading it is refused too
        elif damage == "overwritten":  # the same size, other bytes
            member.write_bytes(content[:1000] + bytes(4096) + content[5096:])
            problem = "is damaged (its SHA-256 differs from members/seed-00.json)"
        else:
            member.unlink()
            problem = "is missing"
        logged = []
        _train_ensemble(tmp_path, [0], log=logged.append)
        assert logged == [
            f"member 1/1 (seed 0): members/seed-00.keras {problem}: training again",
            "member 1/1 (seed 0): training",
        ], damage
        assert keras.models.load_model(member).predict(FEATURES[:2], verbose=0).shape == (2, 30)
        assert len((tmp_path / "members" / "seed-00.history.csv").read_text().splitlines()) == 2  # not appended


def test_a_member_without_a_finished_record_is_trained_again(tmp_path):
    _train_ensemble(tmp_path, [0])
    record_path = tmp_path / "members" / "seed-00.json"
    record = files.read_json(record_path)
    files.write_json(record_path, {"seed": 0, "state": "training", "trained_from": record["trained_from"]})
    logged = []
    _train_ensemble(tmp_path, [0], log=logged.append)  # killed between saving the member and recording it
    assert logged == [
        "member 1/1 (seed 0): members/seed-00.keras was saved but not recorded (the run was killed in between): "
        "training again",
        "member 1/1 (seed 0): training",
    ]
    record_path.unlink()  # e.g. a run folder of an earlier version
    logged = []
    _train_ensemble(tmp_path, [0], log=logged.append)
    assert logged == [
        "member 1/1 (seed 0): members/seed-00.keras has no record of its set-up: training again",
        "member 1/1 (seed 0): training",
    ]
    assert len((tmp_path / "members" / "seed-00.history.csv").read_text().splitlines()) == 2  # header, one epoch


def test_a_deleted_manifest_is_rebuilt_from_the_member_records_without_training(tmp_path):
    first = _train_ensemble(tmp_path, [0, 1])
    histories = [(tmp_path / "members" / f"seed-0{seed}.history.csv").read_text() for seed in (0, 1)]
    (tmp_path / "manifest.json").unlink()
    counted = CountTrainings()
    logged = []
    manifest = _train_ensemble(tmp_path, [0, 1], callbacks=[counted], log=logged.append)
    assert counted.count == 0 and logged[1] == "member 2/2 (seed 1): already trained, kept"
    assert manifest["members"] == first["members"]
    assert files.read_json(tmp_path / "manifest.json")["members"] == first["members"]
    assert [(tmp_path / "members" / f"seed-0{seed}.history.csv").read_text() for seed in (0, 1)] == histories
    record = files.read_json(tmp_path / "members" / "seed-01.json")
    assert record["entry"] == first["members"][1] and record["state"] == "trained"
    assert Ensemble.load(tmp_path).seeds == [0, 1]


# --- checkpoints, resume, history, non-finite losses ------------------------------------------------


class KillAfterEpoch(keras.callbacks.Callback):
    """Stops the run the hard way after epoch `epochs` (1-based), after its checkpoint was written."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt(f"killed after epoch {self.epochs}")


def assert_same_member(first_run, second_run, seed):
    """The two runs saved the same member: weights equal bit for bit, the same history file."""
    name = train.member_name(seed)
    first = keras.models.load_model(first_run / "members" / f"{name}.keras")
    second = keras.models.load_model(second_run / "members" / f"{name}.keras")
    assert len(first.weights) == len(second.weights)
    for expected, actual in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=expected.path)
    history = (first_run / "members" / f"{name}.history.csv").read_text()
    assert (second_run / "members" / f"{name}.history.csv").read_text() == history


def assert_resume_equals_uninterrupted(recipe, seed, member_arguments, tmp_path, kill_after):
    """Train the member without a break, and killed after `kill_after` epochs then resumed: the saved
    weights must be equal bit for bit and the history files identical, each epoch once."""
    train.train_member(recipe, seed, run_dir=tmp_path / "whole", **member_arguments)
    with pytest.raises(KeyboardInterrupt):
        train.train_member(
            recipe, seed, run_dir=tmp_path / "killed", callbacks=[KillAfterEpoch(kill_after)], **member_arguments
        )
    assert not (tmp_path / "killed" / "members" / f"{train.member_name(seed)}.keras").exists()
    resumed = train.train_member(recipe, seed, run_dir=tmp_path / "killed", **member_arguments)
    assert resumed["epochs_this_session"] == recipe["train"]["epochs"] - kill_after
    assert_same_member(tmp_path / "whole", tmp_path / "killed", seed)
    history = (tmp_path / "whole" / "members" / f"{train.member_name(seed)}.history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == [str(e) for e in range(recipe["train"]["epochs"])]


THREE_EPOCHS = {"train": {**RECIPE["train"], "epochs": 3}}


def test_a_member_that_starts_over_rewrites_its_history(tmp_path):
    # As when the manifest was deleted and the command run again: the member trains again from scratch.
    for _ in range(2):
        train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path, **_arguments())
    rows = (tmp_path / "members" / "seed-00.history.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss" and [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]


@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_killed_member_resumes_to_the_weights_and_history_of_an_uninterrupted_run(tmp_path, kill_after):
    logged = []
    arguments = {**_arguments(), "log": logged.append}
    assert_resume_equals_uninterrupted(THREE_EPOCHS, 0, arguments, tmp_path, kill_after)
    checkpoint = tmp_path / "killed" / "checkpoints" / "seed-00" / f"epoch-000{kill_after}"
    assert logged == [f"seed-00: resuming after epoch {kill_after} ({checkpoint})"]


@pytest.mark.parametrize("restore_best_weights", [False, True])
def test_a_member_killed_after_early_stopping_trains_no_further(tmp_path, restore_best_weights):
    recipe = {"train": {**RECIPE["train"], "epochs": 4}}

    def member_callbacks(run_dir, name):
        # val_score falls after epoch 1, so early stopping ends epoch 2 (and, restoring its best weights, puts
        # back epoch 1's); val_rising rises, so the best epoch is epoch 2.
        scores = _ScriptedScores([0.5, 0.4, 0.3, 0.2])
        return [
            train.BestEpoch(
                lambda model: {**scores(model), "val_rising": float(len(scores.weights))},
                monitor="val_rising",
                keys=("val_score", "val_rising"),
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_score", mode="max", patience=1, restore_best_weights=restore_best_weights
            ),
        ]

    arguments = {**_arguments(), "member_callbacks": member_callbacks, "log": lambda _: None}
    whole = train.train_member(recipe, 0, run_dir=tmp_path / "whole", **arguments)
    assert whole["epochs_this_session"] == 2 and whole["best_epoch"] == 2
    with pytest.raises(KeyboardInterrupt):
        train.train_member(recipe, 0, run_dir=tmp_path / "killed", callbacks=[KillAfterEpoch(2)], **arguments)
    resumed = train.train_member(recipe, 0, run_dir=tmp_path / "killed", **arguments)
    assert resumed["epochs_this_session"] == 0 and resumed["best_epoch"] == 2
    assert_same_member(tmp_path / "whole", tmp_path / "killed", 0)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _alter(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated arrays": (lambda folder: _truncate(folder / "epoch-0002.npz"), "does not match its SHA-256"),
    "altered arrays": (lambda folder: _alter(folder / "epoch-0002.npz"), "does not match its SHA-256"),
    "missing arrays": (lambda folder: (folder / "epoch-0002.npz").unlink(), "epoch-0002.npz is missing"),
    "garbage description": (lambda folder: (folder / "epoch-0002.json").write_text('{"form'), "unreadable"),
}


@pytest.mark.parametrize("damage", [*DAMAGE, "every checkpoint"])
def test_a_damaged_checkpoint_is_said_and_the_member_resumes_from_the_one_before(tmp_path, damage):
    logged = []
    arguments = {**_arguments(), "log": logged.append}
    train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "whole", **arguments)
    with pytest.raises(KeyboardInterrupt):
        train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", callbacks=[KillAfterEpoch(2)], **arguments)
    folder = tmp_path / "killed" / "checkpoints" / "seed-00"
    assert sorted(path.name for path in folder.iterdir()) == [
        "epoch-0001.json",
        "epoch-0001.npz",
        "epoch-0002.json",
        "epoch-0002.npz",
    ]
    if damage == "every checkpoint":
        _truncate(folder / "epoch-0002.npz")
        (folder / "epoch-0001.json").write_text("")
    else:
        DAMAGE[damage][0](folder)
    resumed = train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", **arguments)
    assert logged[0].startswith(f"{folder}/epoch-0002: damaged checkpoint (")
    if damage == "every checkpoint":
        assert logged[1].startswith(f"{folder}/epoch-0001: damaged checkpoint (unreadable description")
        assert logged[2] == "seed-00: no usable checkpoint left; training from the first epoch"
        assert resumed["epochs_this_session"] == 3
    else:
        assert DAMAGE[damage][1] in logged[0] and logged[0].endswith("; removed")
        assert logged[1] == f"seed-00: resuming after epoch 1 ({folder}/epoch-0001)"
        assert resumed["epochs_this_session"] == 2
    assert_same_member(tmp_path / "whole", tmp_path / "killed", 0)


def test_what_a_kill_left_half_written_is_removed_without_a_word(tmp_path):
    logged = []
    arguments = {**_arguments(), "log": logged.append}
    train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "whole", **arguments)
    with pytest.raises(KeyboardInterrupt):
        train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", callbacks=[KillAfterEpoch(2)], **arguments)
    folder = tmp_path / "killed" / "checkpoints" / "seed-00"
    (folder / ".epoch-0003.npz.k2j4.npz").write_bytes(b"PK")  # killed while writing the arrays
    (folder / "epoch-0003.npz").write_bytes(b"PK")  # killed before writing their description
    with pytest.raises(KeyboardInterrupt):
        train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", callbacks=[KillAfterEpoch(3)], **arguments)
    assert logged == [f"seed-00: resuming after epoch 2 ({folder}/epoch-0002)"]
    assert sorted(path.name for path in folder.iterdir()) == [
        "epoch-0002.json",
        "epoch-0002.npz",
        "epoch-0003.json",
        "epoch-0003.npz",
    ]
    train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", **arguments)
    assert_same_member(tmp_path / "whole", tmp_path / "killed", 0)


def fill_the_disk_at_checkpoint(monkeypatch, number):
    """From the `number`-th checkpoint on, its arrays reach the disk by half, then the write fails as on a
    full disk (ENOSPC, an OSError without a file name)."""
    savez = np.savez
    written = []

    def full_disk(file, **arrays):
        written.append(file)
        if len(written) < number:
            return savez(file, **arrays)
        buffer = io.BytesIO()
        savez(buffer, **arrays)
        with open(file, "wb") as handle:
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)


def test_a_full_disk_while_checkpointing_is_an_error_naming_the_file_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "whole", **_arguments())
    folder = tmp_path / "killed" / "checkpoints" / "seed-00"
    with monkeypatch.context() as patch:
        fill_the_disk_at_checkpoint(patch, 2)
        with pytest.raises(OSError) as raised:
            train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", **_arguments())
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(folder / "epoch-0002.npz")
    assert sorted(path.name for path in folder.iterdir()) == ["epoch-0001.json", "epoch-0001.npz"]  # no half file
    assert not (tmp_path / "killed" / "members" / "seed-00.keras").exists()
    resumed = train.train_member(THREE_EPOCHS, 0, run_dir=tmp_path / "killed", **_arguments())
    assert resumed["epochs_this_session"] == 2
    assert_same_member(tmp_path / "whole", tmp_path / "killed", 0)


def test_a_non_finite_loss_stops_training_naming_the_seed_and_epoch_and_saves_nothing(tmp_path):
    recipe = {"train": {**THREE_EPOCHS["train"], "learning_rate": 1e30}}
    with pytest.raises(train.NonFiniteLossError, match=r"^seed 0: the training loss became (nan|inf|-inf) at epoch 1"):
        train.train_member(recipe, 0, run_dir=tmp_path, **_arguments())
    assert not (tmp_path / "members" / "seed-00.keras").exists()


def test_the_command_line_turns_a_full_disk_and_a_non_finite_loss_into_one_line_and_exit_2(capsys, tmp_path):
    def main_with(error):
        def run(recipe, data_root, run_dir, progress, retrain):
            raise error

        return runner.command_line(
            ["--data", "data", "--run-dir", str(tmp_path / "run")],
            prog="test",
            description="test",
            data_help="test",
            load_recipe=lambda profile, overrides, path: {},
            run=run,
        )

    assert main_with(OSError(errno.ENOSPC, "No space left on device", "run/members/seed-00.keras")) == 2
    assert capsys.readouterr().err == (
        "error: no space left on the device writing run/members/seed-00.keras; free some space and run the "
        "same command again (finished members and the last good checkpoint are kept)\n"
    )
    assert main_with(train.NonFiniteLossError("seed 3: the training loss became nan at epoch 2, batch 1")) == 2
    assert capsys.readouterr().err == "error: seed 3: the training loss became nan at epoch 2, batch 1\n"
    with pytest.raises(PermissionError):  # any other OSError is not a full disk: not hidden
        main_with(PermissionError(errno.EACCES, "Permission denied", "run"))


def test_the_throughput_of_a_resumed_session_leaves_out_its_first_epoch():
    timer = train._EpochTimer()  # a session resumed at epoch 1 of 3: epoch 1 traces the graph, epoch 2 counts
    timer.set_params({"epochs": 3})
    for epoch, steps in ((1, 4), (2, 5)):
        timer.on_epoch_begin(epoch)
        for batch in range(steps):
            timer.on_train_batch_end(batch)
        timer.on_epoch_end(epoch)
    assert timer.steps == 5 and timer.seconds > 0
