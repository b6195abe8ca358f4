"""Members trained as Ray tasks (`run.executor = "ray"`), on one local Ray instance of 2 CPUs shared by the
module: the same members as local training, a killed worker's member resumed from its last epoch, a failing
member reported while the others are kept, a fused group through the command line, a worker that cannot
read the driver's files, and Ctrl-C on the driver stopping the run's tasks. Each Ray task is a fresh worker
process (it imports TensorFlow), so the members are tiny and few."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import keras
import numpy as np
import pytest

from replicate import files, pipeline, ray_executor, runner, train
from replicate import recipe as recipe_lib
from tests.conftest import run_python
from tests.test_train import assert_same_member

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' (the dev extra has it)")

RNG = np.random.default_rng(3)
FEATURES = RNG.normal(size=(24, 16, 16, 2)).astype(np.float32)
TARGETS = RNG.dirichlet(np.ones(30), size=24).astype(np.float32)
TRAIN = {"epochs": 3, "batch_size": 8, "optimizer": "Nadam", "learning_rate": 0.002, "loss": "KLDivergence"}
RECIPE = {"train": TRAIN}  # local, the default
ON_RAY = {"executor": "ray", "cpus_per_member": 1.0, "gpus_per_member": 0.0, "retries": 1, "ray_features": "files"}
MANIFEST = {"task": "test", "class_names": [str(i) for i in range(30)]}


def small_model(seed: int) -> keras.Model:
    """Batch normalisation and dropout (random state that a resume must carry), layers named as a fused group
    matches them."""
    inputs = keras.Input((16, 16, 2), name="features")
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, keras.layers.Dense(30, activation="softmax", name="words")(x))


def member_arguments(features, **changes):
    """What a task gives `train_ensemble` for its members: a builder and a closure over (memory-mapped) arrays."""
    return {
        "build_model": small_model,
        "train_data": lambda seed, epoch: pipeline.from_arrays(
            features, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch
        ),
        "verbose": 0,
        **changes,
    }


@pytest.fixture(scope="module")
def features_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "features.npy"
    np.save(path, FEATURES)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, features_path):
    """Members 0 and 1 trained by the local executor, with TensorFlow at one thread (as a Ray task of 1 CPU
    runs; the thread count decides how TensorFlow's reductions round), in a fresh process."""
    run_dir = tmp_path_factory.mktemp("local")
    run_python(
        "import tensorflow as tf\n"
        "tf.config.threading.set_intra_op_parallelism_threads(1)\n"
        "tf.config.threading.set_inter_op_parallelism_threads(1)\n"
        "import numpy as np\n"
        "from replicate import train\n"
        "from tests.test_ray import MANIFEST, RECIPE, member_arguments\n"
        f"features = np.load({str(features_path)!r}, mmap_mode='r')\n"
        f"train.train_ensemble(RECIPE, [0, 1], run_dir={str(run_dir)!r}, manifest=MANIFEST, trained_from={{}},\n"
        "                      log=lambda line: None, **member_arguments(features))\n"
    )
    return run_dir


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def _on_ray(**run):
    return {**RECIPE, "run": {**ON_RAY, **run}}


def test_members_trained_on_ray_are_those_trained_locally_bit_for_bit(ray_instance, local_run, features_path, tmp_path):
    logged = []
    features = np.load(features_path, mmap_mode="r")  # here in the object store: a copy the workers share
    manifest = train.train_ensemble(
        _on_ray(ray_features="object_store"),
        [0, 1],
        run_dir=tmp_path,
        manifest=MANIFEST,
        trained_from={},
        log=logged.append,
        **member_arguments(features),
    )
    for seed in (0, 1):
        assert_same_member(local_run, tmp_path, seed)  # weights bit for bit, the same history file
        record = files.read_json(tmp_path / "members" / f"seed-0{seed}.json")
        assert record["state"] == "trained" and record["sha256"] == files.sha256(tmp_path / record["entry"]["file"])
    assert [member["seed"] for member in manifest["members"]] == [0, 1]
    assert files.read_json(tmp_path / "manifest.json")["members"] == manifest["members"]
    assert not (tmp_path / "checkpoints" / "seed-00").exists()
    assert (tmp_path / "tensorboard" / "seed-01").is_dir()
    for which in ("member 1/2 (seed 0)", "member 2/2 (seed 1)"):
        assert any(line.startswith(f"{which}: started on ") for line in logged), logged
        assert any(line.startswith(f"{which}: finished on ") and "3 epochs this session" in line for line in logged)


class PauseToBeKilled(keras.callbacks.Callback):
    """The first time only (the file does not exist yet), in the middle of epoch 2 (after epoch 1's checkpoint):
    write this worker's process id into `path` and wait to be killed."""

    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 1 and not os.path.exists(self.path):
            files.write_text(self.path, str(os.getpid()))
            time.sleep(300)


def _kill_when_written(path, killed):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.2)
    if path.exists():
        pid = int(path.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_a_killed_worker_is_retried_and_its_member_resumes_from_its_last_epoch(
    ray_instance, local_run, features_path, tmp_path
):
    pid_file = tmp_path / "worker.pid"
    killed = []
    killer = threading.Thread(target=_kill_when_written, args=(pid_file, killed), daemon=True)
    killer.start()
    logged = []
    features = np.load(features_path, mmap_mode="r")  # by its file: every worker maps it
    manifest = train.train_ensemble(
        _on_ray(),
        [0],
        run_dir=tmp_path / "run",
        manifest=MANIFEST,
        trained_from={},
        log=logged.append,
        **member_arguments(features, callbacks=[PauseToBeKilled(pid_file)]),
    )
    killer.join()
    assert len(killed) == 1
    # The retry trained epochs 2 and 3 only, from the checkpoint of epoch 1, to the uninterrupted weights.
    assert manifest["members"][0]["epochs_this_session"] == 2
    assert_same_member(local_run, tmp_path / "run", 0)
    started = [line for line in logged if line.startswith("member 1/1 (seed 0): started on ")]
    assert len(started) == 2 and started[1].endswith(", attempt 2)") and f"(pid {killed[0]})" in started[0]
    assert any("seed-00: resuming after epoch 1" in line for line in logged), logged


def test_a_member_that_fails_every_retry_is_reported_and_the_others_are_kept(
    ray_instance, features_path, tmp_path, capsys
):
    features = np.load(features_path, mmap_mode="r")

    def train_data(seed, epoch):
        if seed == 1:
            raise RuntimeError("no data for seed 1")
        return pipeline.from_arrays(features, TARGETS, batch_size=8, shuffle=True, seed=seed, epoch=epoch)

    logged = []

    def run(recipe, data_root, run_dir, *, progress, retrain):
        train.train_ensemble(
            recipe,
            [0, 1],
            run_dir=run_dir,
            manifest=MANIFEST,
            trained_from={},
            log=logged.append,
            **member_arguments(features, train_data=train_data),
        )
        return run_dir

    run_dir = tmp_path / "run"
    command = dict(prog="p", description="d", data_help="h", load_recipe=lambda *_: _on_ray(), run=run)
    assert runner.command_line(["--data", str(tmp_path), "--run-dir", str(run_dir), "--no-progress"], **command) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {run_dir}: member 2/2 (seed 1) failed: RuntimeError: no data for seed 1; ")
    assert "the members trained so far are kept" in error and error.count("\n") == 1
    started = [line for line in logged if line.startswith("member 2/2 (seed 1): started on ")]
    assert len(started) == 2 and started[1].endswith(", attempt 2)")  # retried once (run.retries = 1)
    assert any(line.startswith("member 2/2 (seed 1): failed on ") for line in logged)
    assert [member["seed"] for member in files.read_json(run_dir / "manifest.json")["members"]] == [0]
    assert files.read_json(run_dir / "members" / "seed-00.json")["state"] == "trained"
    assert files.read_json(run_dir / "members" / "seed-01.json")["state"] == "training"  # resumed next time
    assert (run_dir / "members" / "seed-00.keras").is_file() and not (run_dir / "members" / "seed-01.keras").exists()


def test_the_command_line_trains_a_fused_group_as_one_ray_task(ray_instance, features_path, tmp_path):
    from replicate import dacon

    features = np.load(features_path, mmap_mode="r")
    logged, recipes = [], []

    def run(recipe, data_root, run_dir, *, progress, retrain):
        recipes.append(recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        train.train_ensemble(
            recipe,
            recipe_lib.seeds_of(recipe),
            run_dir=run_dir,
            manifest=MANIFEST,
            trained_from={},
            log=logged.append,
            **member_arguments(features),
        )
        return run_dir

    arguments = ["--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-progress", "--executor", "ray"]
    arguments += ["--seeds", "2", "--epochs", "1", "--set", "train.fused=2", "--set", "run.retries=0"]
    command = dict(prog="p", description="d", data_help="h", load_recipe=dacon.load_recipe, run=run)
    assert runner.command_line(arguments, **command) == 0
    assert recipes[0]["run"]["executor"] == "ray" and recipes[0]["train"]["fused"] == 2
    assert [line.split(": ")[1].split(" on ")[0] for line in logged] == ["started", "finished"]
    assert logged[0].startswith("members 1/2 (seed 0), 2/2 (seed 1): started on ")
    members = files.read_json(tmp_path / "run" / "manifest.json")["members"]
    assert [(member["seed"], member["fused"]["seeds"]) for member in members] == [(0, [0, 1]), (1, [0, 1])]
    for seed in (0, 1):
        assert keras.models.load_model(tmp_path / "run" / "members" / f"seed-0{seed}.keras").output_shape == (None, 30)


def test_a_worker_that_cannot_read_the_drivers_feature_cache_says_so(ray_instance, tmp_path):
    # A file that only the driver can read, as a cache on a disk of the head node alone would be: the driver
    # maps it, then its name goes (the mapping stays, the workers' open fails).
    path = tmp_path / "features.npy"
    np.save(path, FEATURES)
    features = np.load(path, mmap_mode="r")
    path.unlink()
    with pytest.raises(runner.TrainingFailedError) as failure:
        train.train_ensemble(
            _on_ray(),
            [0],
            run_dir=tmp_path / "run",
            manifest=MANIFEST,
            trained_from={},
            log=lambda line: None,
            **member_arguments(features),
        )
    message = str(failure.value)
    assert f"member 1/1 (seed 0) failed: ClusterError: {os.uname().nodename}: cannot read {path}, which the " in message
    assert "(No such file or directory); with run.ray_features = 'files' every node must see the feature" in message
    assert "cache at the same path (put run.cache_dir on a shared file system), or set run.ray_features = " in message


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie that its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_ctrl_c_on_the_driver_stops_the_runs_tasks_on_the_cluster(ray_instance, features_path, tmp_path):
    features = np.load(features_path, mmap_mode="r")
    logged, workers = [], []

    def log(line):
        logged.append(line)
        if ": started on " in line:
            workers.append(int(re.search(r"\(pid (\d+)", line).group(1)))
            raise KeyboardInterrupt  # where Python raises it on Ctrl-C: in the driver, while it waits

    with pytest.raises(KeyboardInterrupt):
        train.train_ensemble(
            _on_ray(),
            [0, 1],
            run_dir=tmp_path,
            manifest=MANIFEST,
            trained_from={},
            log=log,
            **member_arguments(features),
        )
    assert logged[-1] == "stopped: cancelled the 2 unfinished task(s) of this run on the cluster"
    # Both tasks stop and give their CPUs back (none is retried), the first one's worker process is gone.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_running(workers[0]) or ray.available_resources().get("CPU") != 2.0):
        time.sleep(0.2)
    assert not _running(workers[0]) and ray.available_resources().get("CPU") == 2.0
    # Stopped, not finished (a task left running would have written its member before giving its CPU back).
    assert not any((tmp_path / "members" / f"seed-0{seed}.keras").exists() for seed in (0, 1))
    assert [files.read_json(tmp_path / "members" / f"seed-0{seed}.json")["state"] for seed in (0, 1)] == [
        "training",
        "training",
    ]  # the same command again resumes them


def test_a_member_asking_for_more_than_any_node_has_is_refused_before_anything_runs(ray_instance, tmp_path):
    message = "a member asks for 4 CPUs and 1 GPUs (run.cpus_per_member, run.gpus_per_member), which no node of the"
    for cpus, gpus in ((4.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ray_executor.ClusterError, match="which no node of the Ray cluster has: the largest has 2"):
            train.train_ensemble(
                _on_ray(cpus_per_member=cpus, gpus_per_member=gpus),
                [0],
                run_dir=tmp_path,
                manifest=MANIFEST,
                trained_from={},
                log=lambda line: None,
                **member_arguments(FEATURES),
            )
    with pytest.raises(ray_executor.ClusterError, match=re.escape(message)):
        ray_executor.check_resources(4.0, 1.0)
    assert not (tmp_path / "members" / "seed-00.keras").exists()


# --- without Ray: what travels to the workers, the recipe keys, the command line ----------------------------


def test_arguments_travel_with_memory_maps_by_file_or_by_content_and_datasets_by_their_batches(tmp_path):
    import tensorflow as tf

    path = tmp_path / "features.npy"
    np.save(path, FEATURES)
    mapped = np.load(path, mmap_mode="r")
    view = mapped[3:9]  # a view keeps its parent's map: its own position in the file must travel
    dataset = pipeline.from_arrays(FEATURES, TARGETS, batch_size=5)
    arguments = {"features": mapped, "view": view, "pair": (view, TARGETS), "validation_data": dataset}

    payload, mapped_files = ray_executor.pack_arguments(arguments, share_files=True)
    assert mapped_files == {str(path.resolve()): path.stat().st_size}
    assert len(payload[0]) < 10_000  # the memory maps are not in the pickle; TARGETS is an out-of-band buffer
    unpacked = ray_executor.unpack_arguments(payload)
    assert isinstance(unpacked["features"], np.memmap) and unpacked["features"].filename == str(path.resolve())
    np.testing.assert_array_equal(unpacked["features"], FEATURES)
    np.testing.assert_array_equal(unpacked["view"], FEATURES[3:9])
    assert unpacked["pair"][0] is unpacked["view"]  # one object stays one object
    np.testing.assert_array_equal(unpacked["pair"][1], TARGETS)
    batches = list(unpacked["validation_data"])
    assert unpacked["validation_data"].element_spec == dataset.element_spec
    assert int(unpacked["validation_data"].cardinality()) == 5 and len(batches) == 5
    for (x, y), (expected_x, expected_y) in zip(batches, dataset, strict=True):
        np.testing.assert_array_equal(x.numpy(), expected_x.numpy())
        np.testing.assert_array_equal(y.numpy(), expected_y.numpy())

    payload, mapped_files = ray_executor.pack_arguments(arguments, share_files=False)
    assert mapped_files == {}
    unpacked = ray_executor.unpack_arguments(payload)
    assert not isinstance(unpacked["features"], np.memmap)
    np.testing.assert_array_equal(unpacked["features"], FEATURES)
    np.testing.assert_array_equal(unpacked["view"], FEATURES[3:9])

    with pytest.raises(ray_executor.ClusterError, match="an infinite tf.data.Dataset"):
        ray_executor.pack_arguments({"validation_data": tf.data.Dataset.range(3).repeat()}, share_files=True)


@pytest.mark.parametrize(
    "name, generate",
    [
        ("maic", {"n_train": 14, "n_test": 6}),
        ("aicup", {"n_train": 60, "n_public": 4, "n_private": 0}),  # a full batch of 32 after the split
        (
            "dcase",
            {
                "machine_types": ["valve"],
                "dev_ids": 1,
                "eval_ids": 1,
                "train_per_id": 8,
                "test_per_id": 3,
                "seconds": 0.5,
            },
        ),
    ],
)
def test_every_tasks_groups_travel_to_the_workers(name, generate, tmp_path):
    """What the runner gives `train_ensemble` for each group of MAIC, AI CUP and DCASE (DACON's: the tests above)
    packs, unpacks and reads a training batch as the workers do."""
    import importlib

    from replicate.task import Run

    module = importlib.import_module(f"replicate.{name}")
    importlib.import_module(f"replicate.synth.{name}").generate(tmp_path / "data", seed=2, progress=False, **generate)
    task = module.TASK
    recipe = task.load_recipe("quick", [f"run.cache_dir={str(tmp_path / 'cache')!r}"])
    data = task.load(tmp_path / "data")
    run = Run(task, recipe, tmp_path / "run", tmp_path / "data", progress=False, log=lambda line: None)
    prepared = task.prepare(run, data)
    groups = task.groups(run, data, prepared)
    assert groups
    for group in groups:
        arguments = {
            "build_model": group.build_model,
            "train_data": group.train_data,
            "validation_data": group.validation_data,
            "member_callbacks": group.member_callbacks,
            "metrics": group.metrics,
        }
        expected = next(iter(group.train_data(0, 1)))
        unpacked = ray_executor.unpack_arguments(ray_executor.pack_arguments(arguments, share_files=True)[0])
        batch = next(iter(unpacked["train_data"](0, 1)))  # the same batch, bit for bit
        for part, expected_part in zip(keras.tree.flatten(batch), keras.tree.flatten(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(part), np.asarray(expected_part))


def test_the_progress_bar_counts_every_members_finished_epochs():
    lines = []
    progress = ray_executor._Progress(3, 4, lines.append, show_bar=True)
    progress.epochs_done((0,), 2)
    progress.epochs_done((1, 2), 1)  # a fused group
    progress.member_done((3,))  # a member that stopped early counts its every epoch
    progress.epochs_done((3,), 2)  # an event that comes after its member's result changes nothing
    progress.say("a line")
    assert (progress.bar.n, progress.bar.total, progress.bar.desc) == (7, 12, "1/3 done: ")  # tqdm adds ": "
    assert lines == ["a line"]
    progress.close()


def test_a_worker_checks_the_run_folder_and_the_files_it_maps(tmp_path):
    (tmp_path / "members").mkdir()
    files.write_json(tmp_path / "members" / "seed-00.json", {"seed": 0, "state": "training"})
    data = tmp_path / "features.npy"
    data.write_bytes(b"x" * 10)
    ray_executor.check_shared(str(tmp_path), [0], {str(data): 10}, host="worker", origin="head")
    with pytest.raises(ray_executor.ClusterError, match=r"^worker: the run folder .* of the driver on head is not"):
        ray_executor.check_shared(str(tmp_path), [0, 1], {}, host="worker", origin="head")
    with pytest.raises(ray_executor.ClusterError, match=r"cannot read .*features.npy, which the driver on head maps"):
        ray_executor.check_shared(str(tmp_path), [0], {str(data): 12}, host="worker", origin="head")


def test_the_executor_keys_are_checked_and_left_out_of_the_run_folder_and_the_set_up(tmp_path):
    from replicate import dacon

    recipe = dacon.load_recipe("quick")
    assert recipe["run"]["executor"] == "local" and recipe["run"]["ray_address"] == "local"
    on_ray = dacon.load_recipe("quick", ["run.executor='ray'", "run.gpus_per_member=1", "run.cpus_per_member=4"])
    assert on_ray["run"]["gpus_per_member"] == 1.0
    assert runner.default_run_id(on_ray, tmp_path) == runner.default_run_id(recipe, tmp_path)
    assert train.training_setup(on_ray, {}) == train.training_setup(recipe, {})
    for override, message in (
        ("run.executor='spark'", "run.executor = 'spark': must be one of 'local', 'ray'"),
        ("run.cpus_per_member=0", "run.cpus_per_member = 0.0: must be > 0"),
        ("run.gpus_per_member=-1", "run.gpus_per_member = -1.0: must be >= 0"),
        ("run.ray_features='nfs'", "run.ray_features = 'nfs': must be one of 'files', 'object_store'"),
    ):
        with pytest.raises(recipe_lib.RecipeError, match=re.escape(message)):
            dacon.load_recipe("quick", [override])


def test_the_command_line_sets_the_executor_and_the_ray_address(tmp_path):
    from replicate import dacon

    seen = []

    def run(recipe, data_root, run_dir, *, progress, retrain):
        seen.append(recipe["run"])
        return run_dir

    command = dict(prog="p", description="d", data_help="h", load_recipe=dacon.load_recipe, run=run)
    arguments = ["--data", str(tmp_path), "--run-dir", str(tmp_path / "run")]
    assert runner.command_line([*arguments, "--executor", "ray", "--ray-address", "10.0.0.5:6379"], **command) == 0
    assert runner.command_line(arguments, **command) == 0
    assert (seen[0]["executor"], seen[0]["ray_address"]) == ("ray", "10.0.0.5:6379")
    assert (seen[1]["executor"], seen[1]["ray_address"]) == ("local", "local")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys):
    def run(recipe, data_root, run_dir, *, progress, retrain):
        raise KeyboardInterrupt

    command = dict(prog="p", description="d", data_help="h", load_recipe=lambda *_: {}, run=run)
    assert runner.command_line(["--data", str(tmp_path), "--run-dir", str(tmp_path / "run")], **command) == 130
    assert capsys.readouterr().err.startswith("interrupted: the finished members and the last finished epoch")
