"""Training a seed ensemble's members as Ray tasks (`run.executor = "ray"`), side by side on a cluster.

`train.train_ensemble` decides which members to train (keep, resume, retrain) and hands the groups to
`train_groups`: each member, or each fused group of `train.fused` members, becomes one Ray task that runs
`train.train_group` with the resources the recipe asks for (`run.cpus_per_member`, `run.gpus_per_member`),
so 15 members on 8 GPUs run as 8, then 7, and members on a CPU-only cluster share its cores as asked. Ray
Core tasks, not Ray Tune trials: a member is one function call with a resource request and a retry count,
and its checkpoints, history and results already have their place in the run folder (`replicate.train`,
`replicate.checkpoint`); Tune would add a second result store, its own checkpoints and a search loop around
a fixed list of seeds.

What travels to the workers: the member arguments that `train_ensemble` got (the model builder, the
`train_data(seed, epoch)` closure and what it reads, validation data, per-member callbacks) are pickled once
with cloudpickle and put into Ray's object store once; every task reads that one copy. Inside them:

- a memory-mapped array (a feature cache) travels as its file's path (`run.ray_features = "files"`): every
  worker maps the same file, nothing is copied, and the page cache is shared by the workers of a machine.
  The file must exist at the same path on every node (one machine, or a shared file system); a worker that
  cannot read it (or sees another size) stops with `ClusterError` naming its host and the path. With
  `"object_store"` the array's bytes go into the object store instead (a copy per node, any cluster).
- any other numpy array travels in the object store (zero-copy for the workers of a machine).
- a `tf.data.Dataset` (validation data) cannot be pickled; it is read once here and travels as its
  batches, a dataset of exactly those batches on the worker (so it must be finite, and its order fixed).

Workers write only their members' own files (`members/seed-XX.keras`, history, checkpoints, TensorBoard
logs, each atomically); this process writes the records and the manifest (`finished`). The run folder
must therefore be the same folder for this process and every worker: one machine, or a shared file system.

Faults: a worker that dies (killed, out of memory, its node lost) or a member that raises anything but a
`ValueError` is started again, up to `run.retries` times, and resumes from its last finished epoch
(`replicate.checkpoint`); a `ValueError` (the package's errors for bad input, a non-finite loss) would only
repeat itself and is reported at once. A member that fails for good is reported with its error while the
others go on; `train_ensemble` then raises `runner.TrainingFailedError` naming the seeds. Ctrl-C cancels
this run's tasks on the cluster; running the same command again resumes.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replicate import recipe as recipe_lib

# Nothing of Keras or TensorFlow at import: the progress actor (`_Events`) is a process of this module's
# classes, and would otherwise hold TensorFlow's 700 MB for nothing.

POLL_SECONDS = 0.5  # how often progress is read while the members train


class ClusterError(ValueError):
    """Ray cannot train the members as asked: no cluster at the address, or a worker that cannot read the
    run's files; the message says what to change."""


def connect(address: str) -> None:
    """Connect this process to Ray, unless it already is (then that session is used as it is).

    Args:
        address: "local" starts a Ray instance on this machine (all its cores and GPUs); "auto" joins the
            cluster this machine belongs to (`ray start --head` / `ray start --address`); or a cluster's
            "host:port".
    """
    try:
        import ray
    except ImportError as error:
        raise recipe_lib.RecipeError(
            "run.executor = 'ray' needs Ray, which is not installed: pip install 'replicate-audio[ray]'"
        ) from error
    if ray.is_initialized():
        return
    try:
        # The members' progress comes back as events (`_Events`); the workers' own output (TensorFlow's start-up
        # lines, once per worker) stays in Ray's log folder (/tmp/ray/session_latest/logs).
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as error:
        raise ClusterError(
            f"run.ray_address = {address!r}: no Ray cluster found ({error}); start one (`ray start --head`) or use "
            "'local' to start Ray on this machine"
        ) from error


def train_groups(
    recipe: dict,
    groups: Sequence[tuple[int, ...]],
    *,
    run_dir: str | Path,
    names: Mapping[tuple[int, ...], str],
    finished: Callable[[tuple[int, ...], list[dict]], None],
    log: Callable[[str], None] = print,
    **member_arguments: Any,
) -> dict[tuple[int, ...], str]:
    """Train every group as one Ray task, all submitted at once; Ray runs as many side by side as the
    cluster's free resources allow.

    Args:
        recipe: the resolved recipe; uses `run.ray_address`, `run.cpus_per_member`, `run.gpus_per_member`,
            `run.retries`, `run.ray_features` (defaults: "local", 1, 0, 2, "files").
        groups: the seeds of each unit of work: one seed, or a fused group's.
        run_dir: the run folder (the same path for every worker).
        names: how progress lines name each group ("member 2/15 (seed 1)").
        finished: called here with a group and its manifest entries as soon as it is trained (it writes the
            records and the manifest: this process is the only one that does).
        log: where the progress lines go: one per member as it starts (where), finishes (epochs, time) or
            fails (its error), and the workers' own lines (a resume, a damaged checkpoint).
        member_arguments: as `train.train_member` takes them; `verbose` other than 0 shows one progress bar of
            every member's epochs here instead of Keras's bars on the workers.

    Returns:
        The groups that failed every retry, each with its error (one line).
    """
    import ray

    run = recipe.get("run", {})
    connect(run.get("ray_address", "local"))
    cpus = float(run.get("cpus_per_member", 1.0))
    gpus = float(run.get("gpus_per_member", 0.0))
    check_resources(cpus, gpus)
    show_bar = member_arguments.get("verbose", "auto") != 0
    pending, events = _submit(recipe, groups, run_dir, member_arguments, cpus=cpus, gpus=gpus)
    progress = _Progress(len(groups), int(recipe["train"]["epochs"]), log, show_bar)
    watch = _Watch(names, progress, finished)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            watch.events(ray.get(events.drain.remote()))
            for reference in ready:
                group = pending.pop(reference)
                watch.result(group, _result(reference))
        watch.events(ray.get(events.drain.remote()))  # what the last workers said before they returned
    except BaseException:  # Ctrl-C, or an error here: this run's work on the cluster stops too
        for reference in pending:
            ray.cancel(reference, force=True)
        if pending:
            progress.say(f"stopped: cancelled the {len(pending)} unfinished task(s) of this run on the cluster")
        raise
    finally:
        progress.close()
        ray.kill(events)
    return watch.failed


def _submit(
    recipe: dict,
    groups: Sequence[tuple[int, ...]],
    run_dir: str | Path,
    member_arguments: Mapping[str, Any],
    *,
    cpus: float,
    gpus: float,
) -> tuple[dict, Any]:
    """Put the member arguments into the object store once and submit one task per group.

    Returns:
        The tasks' references (each with its group), and the `_Events` actor the workers report to.
    """
    import ray

    run = recipe.get("run", {})
    payload, files = pack_arguments(member_arguments, share_files=run.get("ray_features", "files") == "files")
    payload_ref = ray.put(payload)
    events = ray.remote(num_cpus=0)(_Events).remote()
    remote_train = ray.remote(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=int(run.get("retries", 2)),
        retry_exceptions=True,  # every exception but a ValueError, which the worker returns as its result
        max_calls=1,  # a fresh process per member: its own TensorFlow threads, nothing left of another member
    )(_train_on_worker)
    origin = {"host": socket.gethostname(), "cwd": os.getcwd(), "threads": max(1, round(cpus))}
    run_dir = str(Path(run_dir).resolve())
    pending = {
        remote_train.remote(recipe, group, run_dir, [payload_ref], files, events, origin): group for group in groups
    }
    return pending, events


class _Watch:
    """What the driver says of the groups as their events and results come in; it keeps each group's
    attempts, its host and, for those that failed every retry, the error."""

    def __init__(
        self,
        names: Mapping[tuple[int, ...], str],
        progress: _Progress,
        finished: Callable[[tuple[int, ...], list[dict]], None],
    ):
        self.names = names
        self.progress = progress
        self.finished = finished
        self.attempts: dict[tuple[int, ...], int] = {}
        self.hosts: dict[tuple[int, ...], str] = {}
        self.failed: dict[tuple[int, ...], str] = {}

    def events(self, events: list[dict]) -> None:
        for event in events:
            group = tuple(event["group"])
            if event["kind"] == "started":
                self.attempts[group] = self.attempts.get(group, 0) + 1
                self.hosts[group] = event["host"]
                gpu = f", GPU {', '.join(map(str, event['gpus']))}" if event["gpus"] else ""
                again = f", attempt {self.attempts[group]}" if self.attempts[group] > 1 else ""
                self.progress.say(f"{self.names[group]}: started on {event['host']} (pid {event['pid']}{gpu}{again})")
            elif event["kind"] == "log":
                self.progress.say(f"{self.names[group]}: {event['line']}")
            elif event["kind"] == "epoch":
                self.progress.epochs_done(group, event["epochs"])

    def result(self, group: tuple[int, ...], result: dict) -> None:
        """Record a finished task (`_result`'s dict): its entries go to `finished`, or its error is kept."""
        name = self.names[group]
        where = result.get("host") or self.hosts.get(group, "a worker")
        self.progress.member_done(group)
        if "entries" in result:
            self.finished(group, result["entries"])
            sessions = result["entries"][0]["epochs_this_session"]
            self.progress.say(
                f"{name}: finished on {where}: {sessions} epoch{'s' * (sessions != 1)} this session, "
                f"{result['seconds']:.0f} s"
            )
        else:
            self.failed[group] = result["error"]
            self.progress.say(f"{name}: failed on {where}: {result['error']}")
            if result.get("traceback"):
                self.progress.say(result["traceback"].rstrip())


def check_resources(cpus: float, gpus: float) -> None:
    """Raise `ClusterError` unless a node of the cluster has the resources of one member: Ray would otherwise
    keep the tasks waiting for a node that never comes."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        return
    largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
    raise ClusterError(
        f"a member asks for {cpus:g} CPUs and {gpus:g} GPUs (run.cpus_per_member, run.gpus_per_member), which no "
        f"node of the Ray cluster has: the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} "
        "GPUs"
    )


def _result(reference) -> dict:
    """A task's result, however it ended: {"entries", "host", "seconds"}, or {"error"[, "host", "traceback"]}."""
    import ray

    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:  # an exception in the member, after every retry
        cause = error.cause if error.cause is not None else error
        return {"error": f"{type(cause).__name__}: {cause}".splitlines()[0], "traceback": str(error)}
    except ray.exceptions.RayError as error:  # the worker died every time (killed, out of memory, node lost)
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


class _Progress:
    """The lines and the progress bar of the members' epochs, over every group."""

    def __init__(self, groups: int, epochs: int, log: Callable[[str], None], show_bar: bool):
        self.log = log
        self.epochs = epochs
        self.groups = groups
        self.done: dict[tuple[int, ...], int] = {}
        self.finished: set[tuple[int, ...]] = set()
        self.bar = None
        if show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=groups * epochs, unit="epoch", desc=f"0/{groups} done")

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        self.log(line)
        if self.bar is not None:
            self.bar.refresh()

    def epochs_done(self, group: tuple[int, ...], epochs: int) -> None:
        if group not in self.finished:  # an event may come after the group's result
            self.done[group] = epochs
            self._update()

    def member_done(self, group: tuple[int, ...]) -> None:
        self.done[group] = self.epochs  # early stopping ends a member before its last epoch
        self.finished.add(group)
        self._update()

    def _update(self) -> None:
        if self.bar is not None:
            self.bar.n = sum(self.done.values())
            self.bar.set_description(f"{len(self.finished)}/{self.groups} done", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Events:
    """A Ray actor that the workers report to (started, a log line, an epoch finished) and this process
    reads from while it waits for their results."""

    def __init__(self):
        self.events: list[dict] = []

    def report(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def _epoch_reporter(events, group: tuple[int, ...]):
    """A callback that reports each finished epoch (after its checkpoint: it runs after the engine's callbacks)."""
    import keras

    class ReportEpochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            events.report.remote({"kind": "epoch", "group": group, "epochs": epoch + 1})

    return ReportEpochs()


def _train_on_worker(
    recipe: dict,
    group: tuple[int, ...],
    run_dir: str,
    payload: list,
    files: Mapping[str, int],
    events,
    origin: Mapping[str, Any],
) -> dict:
    """One Ray task: train one group into the run folder and return its manifest entries.

    Args:
        payload: [the object-store reference of the packed member arguments] (in a list, so that Ray hands it
            over unread: the files it refers to are checked first).
        files: the files the arguments map, by path, with their sizes.
        origin: the driver's host, working directory and this task's TensorFlow threads.
    """
    import ray

    from replicate import train

    started = time.perf_counter()
    host = socket.gethostname()
    gpus = ray.get_gpu_ids()
    events.report.remote({"kind": "started", "group": group, "host": host, "pid": os.getpid(), "gpus": gpus})
    try:
        check_shared(run_dir, group, files, host=host, origin=origin["host"])
        if Path(origin["cwd"]).is_dir():  # relative paths in the arguments mean what they meant there
            os.chdir(origin["cwd"])
        _limit_threads(origin["threads"])
        member_arguments = unpack_arguments(ray.get(payload[0]))
        member_arguments["callbacks"] = [*member_arguments.get("callbacks", ()), _epoch_reporter(events, group)]
        member_arguments["verbose"] = 0
        entries = train.train_group(
            recipe,
            group,
            run_dir=run_dir,
            log=lambda line: events.report.remote({"kind": "log", "group": group, "line": line}),
            **member_arguments,
        )
    except ValueError as error:  # bad input or a non-finite loss: a retry would only repeat it
        return {"error": f"{type(error).__name__}: {error}", "host": host, "traceback": traceback.format_exc()}
    return {"entries": entries, "host": host, "seconds": time.perf_counter() - started}


def check_shared(run_dir: str, group: Sequence[int], files: Mapping[str, int], *, host: str, origin: str) -> None:
    """Raise `ClusterError` unless this machine sees the run folder and the mapped files as the driver does.

    The run folder is checked through the records the driver wrote for the group before submitting it.
    """
    for seed in group:
        record = Path(run_dir) / "members" / f"seed-{seed:02d}.json"  # train.member_name's
        if not record.is_file():
            raise ClusterError(
                f"{host}: the run folder {run_dir} of the driver on {origin} is not here ({record} is missing): "
                "the run folder must be on a file system that every node mounts at the same path"
            )
    for path, size in files.items():
        try:
            found = os.stat(path).st_size
        except OSError as error:
            reason = error.strerror or type(error).__name__
        else:
            if found == size:
                continue
            reason = f"{found} bytes where the driver's file has {size}"
        raise ClusterError(
            f"{host}: cannot read {path}, which the driver on {origin} maps ({reason}); with run.ray_features = "
            "'files' every node must see the feature cache at the same path (put run.cache_dir on a shared file "
            "system), or set run.ray_features = 'object_store'"
        )


def _limit_threads(threads: int) -> None:
    """TensorFlow's thread pools at the cores Ray reserved (they default to every core of the machine, and
    the number of threads decides the rounding of its reductions: `threads` = the cores asked for, the same
    wherever the member runs)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started in this process: its threads stay as they are
        pass


# --- packing the member arguments ------------------------------------------------------------------


def pack_arguments(arguments: Mapping[str, Any], *, share_files: bool) -> tuple[tuple[bytes, list], dict[str, int]]:
    """The member arguments as (pickle, its out-of-band buffers), and the files they map (path → size).

    numpy arrays leave the pickle as buffers, which Ray's object store keeps once and hands to the workers
    of a machine without a copy. A memory map travels as its file (`share_files`) or as such a buffer.

    Raises:
        ClusterError: something in the arguments cannot be pickled (named), or an infinite dataset.
    """
    stream = io.BytesIO()
    pickler = _ArgumentPickler(stream, share_files=share_files)
    try:
        pickler.dump(dict(arguments))
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise ClusterError(
            f"the training arguments cannot be sent to Ray workers ({type(error).__name__}: {error}); "
            "run.executor = 'local' trains them here"
        ) from error
    buffers = [np.frombuffer(buffer.raw(), dtype=np.uint8) for buffer in pickler.buffers]
    return (stream.getvalue(), buffers), pickler.files


def unpack_arguments(payload: tuple[bytes, list]) -> dict:
    """What `pack_arguments` packed (arrays read-only, on the object store's memory)."""
    data, buffers = payload
    return pickle.loads(data, buffers=buffers)


try:
    from ray import cloudpickle
except ImportError:  # pragma: no cover (without Ray nothing is sent anywhere: `connect` says what to install)
    cloudpickle = pickle


class _ArgumentPickler(cloudpickle.Pickler):
    """cloudpickle (closures, lambdas, functions of __main__ by value) with protocol 5's out-of-band buffers,
    memory maps by file and tf.data datasets by their batches."""

    def __init__(self, file, *, share_files: bool):
        self.buffers: list[pickle.PickleBuffer] = []
        self.files: dict[str, int] = {}
        self.share_files = share_files
        super().__init__(file, protocol=5, buffer_callback=self.buffers.append)

    def reducer_override(self, obj):
        if isinstance(obj, np.memmap):
            return self._memmap(obj)
        tensorflow = sys.modules.get("tensorflow")
        if tensorflow is not None and isinstance(obj, tensorflow.data.Dataset):
            return _dataset_of_batches, (dataset_batches(obj), obj.element_spec)
        return super().reducer_override(obj)

    def _memmap(self, array: np.memmap):
        mapping = getattr(array, "_mmap", None)
        private = array.mode == "c"  # copy-on-write: what this process wrote is not in the file
        if not self.share_files or private or mapping is None or not array.flags.c_contiguous or array.size == 0:
            return np.asarray(array).__reduce_ex__(5)  # its bytes, out of band
        # The file position of the array's first byte: numpy maps the file from its offset rounded down to
        # the allocation granularity, and a view keeps its parent's map and offset.
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        position = array.ctypes.data - base + array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        path = str(Path(array.filename).resolve())
        self.files[path] = mapping.size()  # the size of the file this process mapped (whatever its name is now)
        return _open_memmap, (path, position, array.dtype.str, array.shape)


def _open_memmap(path: str, position: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=position, shape=shape)


def dataset_batches(dataset) -> list:
    """Every element of a finite tf.data dataset, as numpy structures, in order."""
    import tensorflow as tf

    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ClusterError(
            "an infinite tf.data.Dataset among the training arguments cannot be sent to Ray workers (validation "
            "data must be finite)"
        )
    return [tf.nest.map_structure(lambda tensor: tensor.numpy(), element) for element in dataset]


def _dataset_of_batches(batches: list, element_spec):
    """A dataset of exactly these elements, in this order, of the original's element spec and length."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=element_spec)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches)))
