"""Training one member and a seed ensemble, with per-epoch checkpoints and resume.

Layout of a run folder (`runs/<recipe>/<run-id>/`):

    recipe.toml                 the resolved recipe
    manifest.json               members, feature parameters, normalisation, class names, versions
    members/seed-XX.keras       one saved model per finished member
    members/seed-XX.history.csv its per-epoch history
    checkpoints/seed-XX/        the unfinished member's last epoch (removed when it finishes)
    tensorboard/seed-XX/        TensorBoard logs
"""

from __future__ import annotations

import datetime
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras

from replicate import files

MANIFEST = "manifest.json"


def member_name(seed: int) -> str:
    return f"seed-{seed:02d}"


def compile_model(model: keras.Model, train_recipe: dict, metrics: Sequence[Any] | None = None) -> keras.Model:
    """Compile with the recipe's optimizer, learning rate and loss, all Keras built-ins by name.

    Optional recipe keys: `loss_options` (the loss's constructor arguments, e.g. focal alpha/gamma),
    `weight_decay` (the optimizer's decoupled weight decay), `jit_compile` (XLA; Keras's "auto" if absent).
    """
    optimizer_config = {"learning_rate": train_recipe["learning_rate"]}
    if train_recipe.get("weight_decay"):
        optimizer_config["weight_decay"] = train_recipe["weight_decay"]
    optimizer = keras.optimizers.get({"class_name": train_recipe["optimizer"], "config": optimizer_config})
    loss = keras.losses.get({"class_name": train_recipe["loss"], "config": dict(train_recipe.get("loss_options", {}))})
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=list(metrics) if metrics else None,
        jit_compile=train_recipe.get("jit_compile", "auto"),
    )
    return model


def train_member(
    recipe: dict,
    seed: int,
    *,
    run_dir: str | Path,
    build_model: Callable[[], keras.Model],
    train_data: Callable[[int], Any],
    validation_data: Any = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    member_callbacks: Callable[[Path, str], Iterable[keras.callbacks.Callback]] | None = None,
    metrics: Sequence[Any] | None = None,
    verbose: int | str = "auto",
) -> dict:
    """Train one member and save it as `members/seed-XX.keras`; resume it if it was interrupted.

    Args:
        recipe: the resolved recipe; uses `train.epochs`, `train.optimizer`, `train.learning_rate`,
            `train.loss`.
        seed: seeds weights, dropout (`keras.utils.set_random_seed`) and the data order.
        run_dir: the run folder.
        build_model: returns a new, uncompiled model.
        train_data: seed → the training `tf.data.Dataset` of this member.
        validation_data: passed to `fit` (None: no validation, as the DACON source trained).
        callbacks: extra callbacks, run after the checkpointing ones.
        member_callbacks: (run_dir, member name) → callbacks made for this member only, which run before
            the logging ones: stateful callbacks (`BestEpoch`, ReduceLROnPlateau, EarlyStopping) go here.
        metrics: compiled metrics, logged per epoch (validation ones too when there is validation data).
        verbose: Keras progress display.

    Returns:
        The member's manifest entry: seed, file, epochs, wall time, training throughput, final metrics.
    """
    run_dir = Path(run_dir)
    name = member_name(seed)
    member_path = run_dir / "members" / f"{name}.keras"
    history_path = run_dir / "members" / f"{name}.history.csv"
    member_path.parent.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(), recipe["train"], metrics=metrics)
    dataset = train_data(seed)
    epochs = recipe["train"]["epochs"]
    timer = _EpochTimer()
    own_callbacks = list(member_callbacks(run_dir, name)) if member_callbacks else []
    started = time.perf_counter()
    history = model.fit(
        dataset,
        epochs=epochs,
        validation_data=validation_data,
        shuffle=False,  # the dataset shuffles itself, seeded per member
        verbose=verbose,
        callbacks=[
            *own_callbacks,  # first: the scores they add to an epoch's logs reach the logger and the others
            keras.callbacks.BackupAndRestore(str(run_dir / "checkpoints" / name), delete_checkpoint=True),
            keras.callbacks.CSVLogger(str(history_path), append=True),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard" / name)),
            timer,
            *callbacks,
        ],
    )
    seconds = time.perf_counter() - started
    recalibrated = 0
    if recipe["train"].get("recalibrate_batchnorm", False):
        recalibrated = recalibrate_batchnorm(model, train_data(seed))
    with files.atomic_path(member_path, suffix=".keras") as temporary:
        model.save(temporary)
    final = {key: float(values[-1]) for key, values in history.history.items() if values}
    entry = {
        "seed": seed,
        "file": str(member_path.relative_to(run_dir)),
        "epochs": epochs,
        "epochs_this_session": len(history.epoch),
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(timer.steps_per_second * recipe["train"]["batch_size"], 2),
        "batchnorm_recalibration_batches": recalibrated,
        "final": final,
    }
    for callback in own_callbacks:
        if isinstance(callback, BestEpoch) and callback.best_epoch:
            entry.update(best_epoch=callback.best_epoch, best={callback.monitor: callback.best})
    return entry


class BestEpoch(keras.callbacks.Callback):
    """Score the model on held-out data every few epochs, log the scores, and keep the best epoch's weights.

    The sources chose their final weights by a validation score that Keras cannot compute as a streaming
    metric (person-level macro F1, UAR, AUC/pAUC per machine ID), so the score is any function of the model.
    The values go into the epoch's logs, where the CSV history, ReduceLROnPlateau and EarlyStopping read them
    (`train_member` runs member callbacks first for that reason). At the end of training the best weights
    are put back; with `path`, they and the best score are also kept on disk, so a member resumed after a
    kill still ends with the best epoch of the whole run.

    Args:
        score: model → {name: value}, e.g. `lambda model: {"val_uar": ...}`; must include `monitor`.
        monitor: the value that decides the best epoch.
        mode: "max" (higher is better) or "min".
        every: score every `every` epochs (and always after the last epoch).
        path: a folder for the best weights and score (removed when training ends), or None (memory only).

    Example:
        >>> best = BestEpoch(lambda model: {"val_uar": uar(model)}, monitor="val_uar")
        >>> model.fit(dataset, epochs=150, callbacks=[best])   # the model now has the best epoch's weights
        >>> best.best_epoch, best.best                           # e.g. (87, 0.7305)
    """

    def __init__(self, score, *, monitor: str, mode: str = "max", every: int = 1, path=None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.score = score
        self.monitor = monitor
        self.mode = mode
        self.every = every
        self.path = Path(path) if path is not None else None
        self.best: float | None = None
        self.best_epoch = 0  # 1-based; 0 until an epoch was scored
        self._best_weights = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_train_begin(self, logs=None):
        state = self.path / "best.json" if self.path else None
        if state is not None and state.is_file():  # a resumed member: its best so far is on disk
            saved = files.read_json(state)
            self.best, self.best_epoch = saved["best"], saved["best_epoch"]

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every and not last:
            return
        scores = {key: float(value) for key, value in self.score(self.model).items()}
        if self.monitor not in scores:
            raise ValueError(f"the score function returned {sorted(scores)}, without the monitored {self.monitor!r}")
        if logs is not None:
            logs.update(scores)
        if not self._better(scores[self.monitor]):
            return
        self.best, self.best_epoch = scores[self.monitor], epoch + 1
        if self.path is None:
            self._best_weights = self.model.get_weights()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(self.path / "best.weights.h5", suffix=".weights.h5") as temporary:
            self.model.save_weights(temporary)
        files.write_json(self.path / "best.json", {"best": self.best, "best_epoch": self.best_epoch})

    def on_train_end(self, logs=None):
        if self.path is not None and (self.path / "best.weights.h5").is_file():
            self.model.load_weights(self.path / "best.weights.h5")
            shutil.rmtree(self.path)
        elif self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def recalibrate_batchnorm(model: keras.Model, dataset, max_batches: int = 16) -> int:
    """Replace every BatchNormalization layer's moving mean and variance by the average of its batch
    statistics over training batches, computed with the final weights ("precise BN").

    The moving averages (momentum 0.99) trail the weights by about a hundred steps, which does not matter
    after the source's 187 epochs but makes a model trained for a few hundred steps predict worse than
    the training prior. The forward passes run in training mode, as the averages were gathered in
    training; no weight other than the moving statistics changes.

    Args:
        model: a trained model.
        dataset: batches of (inputs, targets) or inputs, e.g. the member's training dataset.
        max_batches: at most this many batches are averaged.

    Returns:
        The number of batches averaged (0 for a model without BatchNormalization).
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    batches = 0
    try:
        for batch in dataset.take(max_batches) if layers else ():
            for layer in layers:
                layer.momentum = batches / (batches + 1)  # a running mean over the batches seen so far
            model(batch[0] if isinstance(batch, tuple) else batch, training=True)
            batches += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return batches


def train_ensemble(
    recipe: dict,
    seeds: Sequence[int],
    *,
    run_dir: str | Path,
    manifest: dict,
    log: Callable[[str], None] = print,
    **member_arguments: Any,
) -> dict:
    """Train every seed's member in turn, keeping members that an earlier run finished.

    The manifest is rewritten (atomically) after each member, so a killed run loses at most the epoch
    in progress: started again with the same run folder, finished members are kept and the
    interrupted one continues from its last checkpoint.

    Args:
        recipe: the resolved recipe.
        seeds: one member per seed.
        run_dir: the run folder.
        manifest: what inference needs besides the members (task, features, normalisation, class names).
        log: where progress lines go.
        member_arguments: passed to `train_member` (build_model, train_data, validation_data, ...).

    Returns:
        The manifest, with its `members` list.
    """
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    previous = files.read_json(manifest_path) if manifest_path.is_file() else {}
    finished = {
        member["seed"]: member for member in previous.get("members", []) if (run_dir / member["file"]).is_file()
    }
    manifest = {**manifest, "members": [], "environment": environment()}
    for index, seed in enumerate(seeds, start=1):
        if seed in finished:
            log(f"member {index}/{len(seeds)} (seed {seed}): already trained, kept")
            manifest["members"].append(finished[seed])
            continue
        log(f"member {index}/{len(seeds)} (seed {seed}): training")
        manifest["members"].append(train_member(recipe, seed, run_dir=run_dir, **member_arguments))
        manifest["peak_memory_mb"] = peak_memory_mb()
        files.write_json(manifest_path, manifest)
    files.write_json(manifest_path, manifest)
    return manifest


def peak_memory_mb() -> dict:
    """Peak resident memory so far of this process and of its finished child processes, in MiB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def environment() -> dict:
    """Package versions, git commit and machine of this run, for the manifest."""
    import librosa
    import numpy
    import tensorflow

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "tensorflow": tensorflow.__version__,
        "numpy": numpy.__version__,
        "librosa": librosa.__version__,
        "git": git_commit(),
        "machine": f"{platform.machine()} {platform.system()}, {_cpu_count()} CPU cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit() -> str:
    """The commit of the package's checkout ("+dirty" with uncommitted changes), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _EpochTimer(keras.callbacks.Callback):
    """Steps per second over the epochs after the first (which includes graph tracing)."""

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.epoch_steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.params.get("initial_epoch", 0) and self.params.get("epochs", 1) > epoch + 1:
            return
        self.seconds += time.perf_counter() - self.started
        self.steps += self.epoch_steps

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0
