"""Training engine: same seed → same weights; a killed ensemble resumes with finished members kept."""

from __future__ import annotations

import json
import re
import zipfile

import keras
import numpy as np
import pytest

from models.dacon import build_dacon_model
from replicate import files, metrics, optimizers, pipeline, task, train
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
        build_model=build_model,
        train_data=lambda seed: pipeline.from_arrays(FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed),
        verbose=0,
    )


def test_same_seed_gives_identical_weights_with_the_source_model(tmp_path):
    recipe = {"train": {**RECIPE["train"], "epochs": 1}}
    arguments = {
        **_arguments(build_dacon_model),
        "train_data": lambda seed: pipeline.from_arrays(
            FEATURES[:12], TARGETS[:12], batch_size=4, shuffle=True, seed=seed
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


@pytest.mark.parametrize("persist", [False, True])
def test_best_epoch_logs_its_score_and_restores_the_best_weights(tmp_path, persist):
    scores = _ScriptedScores([0.2, 0.7, 0.4, 0.5])
    recipe = {"train": {**RECIPE["train"], "epochs": 4}}
    best_dir = tmp_path / "run" / "checkpoints" / "seed-00.best"

    def member_callbacks(run_dir, name):
        return [train.BestEpoch(scores, monitor="val_score", path=best_dir if persist else None)]

    entry = train.train_member(recipe, 0, run_dir=tmp_path / "run", member_callbacks=member_callbacks, **_arguments())
    assert entry["best_epoch"] == 2 and entry["best"] == {"val_score": 0.7}
    saved = keras.models.load_model(tmp_path / "run" / "members" / "seed-00.keras").get_weights()
    for restored, best in zip(saved, scores.weights[1], strict=True):
        np.testing.assert_array_equal(restored, best)
    assert not np.array_equal(saved[0], scores.weights[3][0])  # the last epoch's weights were replaced
    history = np.genfromtxt(tmp_path / "run" / "members" / "seed-00.history.csv", delimiter=",", names=True)
    np.testing.assert_allclose(history["val_score"], [0.2, 0.7, 0.4, 0.5])
    assert len(history) == 4 and not best_dir.exists()  # the on-disk copy is removed once the member is saved


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


def test_best_epoch_resumes_with_the_best_score_kept_on_disk(tmp_path):
    model = train.compile_model(_small_model(), RECIPE["train"])
    data = pipeline.from_arrays(FEATURES, TARGETS, batch_size=8)
    first = train.BestEpoch(_ScriptedScores([0.9]), monitor="val_score", path=tmp_path / "best")
    first.set_model(model)
    first.set_params({"epochs": 3})
    first.on_train_begin()
    first.on_epoch_end(0, {})  # the run is killed after this epoch: on_train_end never runs
    best_weights = [w.copy() for w in model.get_weights()]
    model.fit(data, epochs=1, verbose=0)  # the resumed run's weights move on
    resumed = train.BestEpoch(_ScriptedScores([0.5, 0.6]), monitor="val_score", path=tmp_path / "best")
    model.fit(data, initial_epoch=1, epochs=3, callbacks=[resumed], verbose=0)
    assert resumed.best_epoch == 1 and resumed.best == 0.9
    for restored, best in zip(model.get_weights(), best_weights, strict=True):
        np.testing.assert_array_equal(restored, best)


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
        "data = lambda seed: pipeline.from_arrays(FEATURES, TARGETS, batch_size=8, shuffle=True, seed=seed)\n"
        f"train.train_member(recipe, 0, run_dir={str(tmp_path)!r}, build_model=_small_model, train_data=data,"
        " verbose=0)\n"
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
    with pytest.raises(task.RunFolderError) as error:
        _train_ensemble(tmp_path, [0, 1], trained_from=other_data)
    assert str(error.value) == (
        f"{tmp_path}: the member of seed 0 was trained from another set-up (other targets); use another "
        "--run-dir, or --retrain to train it again"
    )
    longer = {"train": {**RECIPE["train"], "epochs": 2}}
    with pytest.raises(task.RunFolderError, match=r"\(train\.epochs: 1 → 2\)"):
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
    with pytest.raises(task.RunFolderError, match=r"the members of seeds 0, 1 were trained .* \(other features\)"):
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
            with pytest.raises(task.RunFolderError, match=rf"{tmp_path}: members/seed-00.keras {re.escape(problem)}"):
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
