"""Training one member and a seed ensemble, with per-epoch checkpoints and resume.

Layout of a run folder (`runs/<recipe>/<run-id>/`):

    recipe.toml                 the resolved recipe
    manifest.json               members, feature parameters, normalisation, class names, versions
    members/seed-XX.keras       one saved model per finished member
    members/seed-XX.json        its record: what it was trained from, the file's SHA-256, its manifest entry
    members/seed-XX.history.csv its per-epoch history (exactly the finished epochs, once each)
    checkpoints/seed-XX/        the unfinished member's last two epochs (`replicate.checkpoint`; removed when
                                the member is saved); `fused-XX-YY/` for a group trained as one fused model
    tensorboard/seed-XX/        TensorBoard logs

A task that trains several seed ensembles (`replicate.task.Group`) has one such folder per group under the
run folder, e.g. `per_machine/fan/`, and the run's own manifest lists the members of its ensemble
(`replicate.runner`: the manifest's schema).

Each member stands on its own record, written when it starts ("training") and when it is saved ("trained"),
which says what it was trained from: the recipe's values (all but `NOT_IN_SETUP`) and `train_ensemble`'s
`trained_from`. A rerun keeps a member whose record matches the run's set-up and whose file matches the
record's SHA-256; an interrupted one continues from its last checkpoint; a damaged, missing or unrecorded
one is trained again from the start, said on `log`. Members trained from another set-up stop the run with
`runner.RunFolderError` naming what changed, unless `retrain`: then they are removed and trained again.
The manifest is rebuilt from the records and rewritten (atomically) after each member, so a killed run
loses at most the epoch in progress.

A member (or a fused group) resumed after a kill ends with exactly the weights and history of an
uninterrupted run on the same machine: every epoch's data are a function of (seed, epoch)
(`train_data(seed, epoch)`), and the checkpoint holds every other state that training carries from one
epoch to the next, the member callbacks' state included (`checkpoint.state_attributes`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from replicate import checkpoint as checkpoint_lib
from replicate import files, losses, optimizers, report, runner, task
from replicate import recipe as recipe_lib

MANIFEST = runner.MANIFEST

# Recipe values that do not change what a member learns, left out of its set-up (`training_setup`): the
# recipe's name and the source's reported numbers; where and how the run works (run.*: folders, threads,
# the profile's name — its values are in the recipe); which members make up the ensembles (ensemble.seeds:
# a member is its own seed; AI CUP's ensemble.compare_modalities: whether a second ensemble is trained
# beside); and how members share the hardware (train.fused, fused_layout, distribute), which changes float
# rounding and dropout masks but not what is trained. Every other value is part of the set-up.
NOT_IN_SETUP = (
    "name",
    "source",
    "run",
    "ensemble.seeds",
    "ensemble.compare_modalities",
    "train.fused",
    "train.fused_layout",
    "train.distribute",
)


def member_name(seed: int) -> str:
    return f"seed-{seed:02d}"


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message names the seed and the epoch."""


def compile_model(model: keras.Model, train_recipe: dict, metrics: Sequence[Any] | None = None) -> keras.Model:
    """Compile with the recipe's optimizer, learning rate and loss, by name: Keras built-ins, or one of
    `replicate.optimizers.OPTIMIZERS` (e.g. "Keras2Nadam") and `replicate.losses` (e.g.
    "DoubleSoftmaxCrossentropy"), for what Keras has no built-in.

    Optional recipe keys: `loss_options` (the loss's constructor arguments, e.g. focal alpha/gamma),
    `weight_decay` (the optimizer's decoupled weight decay), `jit_compile` (XLA; Keras's "auto" if absent).
    """
    optimizer_config = {"learning_rate": train_recipe["learning_rate"]}
    if train_recipe.get("weight_decay"):
        optimizer_config["weight_decay"] = train_recipe["weight_decay"]
    name = train_recipe["optimizer"]
    if name in optimizers.OPTIMIZERS:
        optimizer = optimizers.OPTIMIZERS[name](**optimizer_config)
    else:
        optimizer = keras.optimizers.get({"class_name": name, "config": optimizer_config})
    loss = losses.get(train_recipe["loss"], train_recipe.get("loss_options", {}))
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=list(metrics) if metrics else None,
        jit_compile=train_recipe.get("jit_compile", "auto"),
    )
    return model


@contextlib.contextmanager
def dtype_policy(train_recipe: dict):
    """Build and train under the recipe's Keras dtype policy: `train.precision`, "float32" when absent,
    e.g. "mixed_bfloat16" or "mixed_float16" on a GPU (Keras then scales the loss for float16 itself)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(train_recipe.get("precision", "float32"))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def distribution_scope(train_recipe: dict):
    """The scope to build and compile in: `train.distribute = "mirrored"` copies the model to every GPU
    (every logical CPU on a machine without one) with `tf.distribute.MirroredStrategy`, each replica
    taking a share of the batch; "none" (the default) trains on one device."""
    mode = train_recipe.get("distribute", "none")
    if mode == "none":
        return contextlib.nullcontext()
    if mode != "mirrored":
        raise ValueError(f"train.distribute must be 'none' or 'mirrored', got {mode!r}")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"train.distribute = 'mirrored' needs the TensorFlow backend, not {keras.backend.backend()}")
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices]).scope()


def _under_recipe_settings(function):
    """Run a training function under the recipe's dtype policy and distribution strategy."""

    @functools.wraps(function)
    def wrapper(recipe, *args, **kwargs):
        with dtype_policy(recipe["train"]), distribution_scope(recipe["train"]):
            return function(recipe, *args, **kwargs)

    return wrapper


@_under_recipe_settings
def train_member(
    recipe: dict,
    seed: int,
    *,
    run_dir: str | Path,
    build_model: Callable[[int], keras.Model],
    train_data: Callable[[int, Any], Any],
    validation_data: Any = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    member_callbacks: Callable[[Path, str], Iterable[keras.callbacks.Callback]] | None = None,
    metrics: Sequence[Any] | None = None,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Train one member and save it as `members/seed-XX.keras`; resume it if it was interrupted.

    Args:
        recipe: the resolved recipe (its `train` table).
        seed: seeds the initial weights and dropout (`keras.utils.set_random_seed`) and the data.
        run_dir: the run folder.
        build_model: seed → a new, uncompiled model (called after the seeding; the seed lets a member start
            from its own seed's member of an earlier ensemble, as DCASE's fine-tuning does).
        train_data: (seed, epoch) → that epoch's training `tf.data.Dataset`, of known length, whose order and
            augmentations are a function of (seed, epoch), as `replicate.pipeline` builds them; `epoch` is a
            scalar int64 tensor (the epochs are read as one stream: `_epoch_stream`).
        validation_data: passed to `fit` (None: no validation, as the DACON source trained).
        callbacks: extra callbacks, run after the checkpointing ones (their state is not checkpointed).
        member_callbacks: (run_dir, member name) → this member's own callbacks, run before the logging ones:
            stateful ones (`BestEpoch`, ReduceLROnPlateau, EarlyStopping) go here, their state checkpointed.
        metrics: compiled metrics, logged per epoch (validation ones too when there is validation data).
        verbose: Keras progress display.
        log: where a resume or a damaged checkpoint is said.

    Returns:
        The member's manifest entry: seed, file, epochs, wall time, training throughput, final metrics.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (nothing is saved for the member).
    """
    run_dir = Path(run_dir)
    model = compile_model(_seeded_model(build_model, seed), recipe["train"], metrics=metrics)
    own_callbacks = list(member_callbacks(run_dir, member_name(seed))) if member_callbacks else []
    history, seconds, timer, checkpoint = _fit(
        model,
        lambda epoch: train_data(seed, epoch),
        recipe,
        run_dir,
        [seed],
        validation_data=validation_data,
        callbacks=callbacks,
        verbose=verbose,
        log=log,
        first_callbacks=own_callbacks,
    )
    entry = _save_member(model, recipe, seed, run_dir, train_data)
    checkpoint.remove()
    entry.update(_session_entry(history, seconds, timer, recipe["train"]["batch_size"]), final=checkpoint.final_logs())
    entry.update(_best_epoch_entry(own_callbacks))
    return entry


def _seeded_model(build_model: Callable[[int], keras.Model], seed: int) -> keras.Model:
    """A member's new model, built after seeding: its initial weights and dropout come from its seed."""
    keras.utils.set_random_seed(seed)
    return build_model(seed)


def _session_entry(history, seconds: float, timer, batch_size: int, members: int = 1) -> dict:
    """What this session trained, for a member's manifest entry: its epochs, its share of the wall time and
    the training throughput (of the whole fused group when `members` trained as one model)."""
    return {
        "epochs_this_session": len(history.epoch),
        "train_seconds": round(seconds / members, 2),
        "samples_per_second": round(timer.steps_per_second * batch_size * members, 2),
    }


def _best_epoch_entry(member_callbacks: Iterable[keras.callbacks.Callback]) -> dict:
    """The best epoch and score of the member's `BestEpoch` callback, for its manifest entry ({} without one,
    or before it scored an epoch)."""
    best = {}
    for callback in member_callbacks:
        if isinstance(callback, BestEpoch) and callback.best_epoch:
            best = {"best_epoch": callback.best_epoch, "best": {callback.monitor: callback.best}}
    return best


@_under_recipe_settings
def train_fused(
    recipe: dict,
    seeds: Sequence[int],
    *,
    run_dir: str | Path,
    build_model: Callable[[int], keras.Model],
    train_data: Callable[[int, Any], Any],
    validation_data: Any = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    member_callbacks: Callable[[Path, str], Iterable[keras.callbacks.Callback]] | None = None,
    metrics: Sequence[Any] | None = None,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train one member per seed as one fused model (`replicate.fused`) and save each as `train_member` does.

    Each member starts from the weights `train_member` would give it (its seed, then the builder) and sees
    its own seeded batches, so the result equals training them one by one up to float rounding and dropout
    masks. An interrupted group resumes as a member does.

    Args:
        recipe, run_dir, build_model, train_data, validation_data, callbacks, metrics, verbose, log: as for
            `train_member`; validation data are given to every member.
        seeds: the members trained together.
        member_callbacks: not supported (`recipe.RecipeError`, `fused_refusal`).

    Returns:
        The members' manifest entries, each with `fused` (the group's seeds and wall time).
    """
    from replicate import fused

    if member_callbacks is not None:
        raise recipe_lib.RecipeError(fused_refusal(recipe))
    run_dir = Path(run_dir)
    model, members = _fused_model(recipe, seeds, build_model, metrics)
    if validation_data is not None:
        validation_data = fused.stack_datasets([validation_data] * len(seeds))
    history, seconds, timer, checkpoint = _fit(
        model,
        lambda epoch: fused.stack_datasets([train_data(seed, epoch) for seed in seeds]),
        recipe,
        run_dir,
        list(seeds),
        validation_data=validation_data,
        callbacks=callbacks,
        verbose=verbose,
        log=log,
    )
    session = _session_entry(history, seconds, timer, recipe["train"]["batch_size"], len(seeds))
    group_logs = {key: [value] for key, value in checkpoint.final_logs().items()}
    entries = []
    for k, member in enumerate(fused.unpack(model, members)):
        entry = _save_fused_member(member, seeds, k, recipe, run_dir, train_data, metrics)
        entry.update(
            session, final=_member_logs(group_logs, k), fused={"seeds": list(seeds), "train_seconds": round(seconds, 2)}
        )
        entries.append(entry)
    checkpoint.remove()
    return entries


def _fused_model(
    recipe: dict,
    seeds: Sequence[int],
    build_model: Callable[[int], keras.Model],
    metrics: Sequence[Any] | None,
) -> tuple[keras.Model, list[keras.Model]]:
    """The seeds' members, each built as `train_member` builds it, and the compiled fused model holding them."""
    from replicate import fused

    members = [_seeded_model(build_model, seed) for seed in seeds]
    layout = recipe["train"].get("fused_layout", "auto")
    model = compile_model(fused.fuse(members[0], len(seeds), layout), recipe["train"], metrics=metrics)
    fused.pack(model, members)
    return model, members


def _save_fused_member(member, seeds: Sequence[int], k: int, recipe: dict, run_dir: Path, train_data, metrics) -> dict:
    """Save member k of a trained fused group as `train_member` saves a member, with its own columns of the
    group's history as its history; returns its manifest entry so far."""
    # The fused model's own optimizer state stays with the group; each member is saved compiled afresh.
    compile_model(member, recipe["train"], metrics=metrics)
    entry = _save_member(member, recipe, seeds[k], run_dir, train_data)
    members_folder = run_dir / "members"
    _write_member_history(
        members_folder / f"{_training_name(seeds)}.history.csv",
        k,
        members_folder / f"{member_name(seeds[k])}.history.csv",
    )
    return entry


def fused_refusal(recipe: dict) -> str:
    """Why a recipe whose members have their own callbacks cannot train them fused: their state (best epoch,
    learning-rate plateaus, early stopping) is per member, and the fused members share one optimizer step."""
    return (
        f"train.fused = {recipe['train'].get('fused')}: this recipe keeps per-member callbacks (best epoch, "
        "ReduceLROnPlateau, early stopping), which members trained as one fused model cannot run; set "
        "train.fused = 1"
    )


def _member_logs(logs: dict, k: int) -> dict:
    """Member k's values among a fused model's logs ("member_k_loss" → "loss", "val_member_k_x" → "val_x")."""
    prefix = f"member_{k}_"
    own = {}
    for key, values in logs.items():
        validation = key.startswith("val_")
        bare = key[4:] if validation else key
        if bare.startswith(prefix):
            own[("val_" if validation else "") + bare[len(prefix) :]] = float(values[-1])
    return own


def _write_member_history(group_path: Path, k: int, path: Path) -> None:
    """Member k's columns of a fused group's CSV history, as a member's own history file."""
    import csv

    with open(group_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ["epoch", *_member_logs({key: [0] for key in rows[0] if key != "epoch"}, k)] if rows else ["epoch"]
    prefix = f"member_{k}_"
    with files.atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [row["epoch"]]
                + [row[f"val_{prefix}{c[4:]}" if c.startswith("val_") else f"{prefix}{c}"] for c in columns[1:]]
            )


def _fit(
    model,
    epoch_data,
    recipe,
    run_dir: Path,
    seeds: Sequence[int],
    *,
    validation_data,
    callbacks,
    verbose,
    log: Callable[[str], None],
    first_callbacks: Sequence[keras.callbacks.Callback] = (),
):
    """`model.fit` for the recipe's epochs, from the last checkpoint if there is one, with the run folder's
    checkpoints, history and TensorBoard logs (named by `_training_name(seeds)`).

    Args:
        epoch_data: epoch (scalar int64 tensor) → that epoch's dataset (`_epoch_stream`).
        seeds: the seeds being trained (one, or a fused group's), named by a non-finite loss.
        first_callbacks: the member's own callbacks, run before the checkpoint, which saves their state.

    Returns:
        (Keras history of this session, seconds, the epoch timer, the `checkpoint.Checkpoint`).
    """
    name = _training_name(seeds)
    epochs = recipe["train"]["epochs"]
    history_path = run_dir / "members" / f"{name}.history.csv"
    history_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_lib.Checkpoint(
        run_dir / "checkpoints" / name, history_path, first_callbacks, epochs=epochs, log=log
    )
    first_epoch = checkpoint.restore(model)
    dataset, steps = _epoch_stream(epoch_data, first_epoch, epochs, name)
    timer = _EpochTimer()
    started = time.perf_counter()
    history = model.fit(
        dataset,
        epochs=epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=steps,
        validation_data=validation_data,
        shuffle=False,  # every epoch's order comes from the dataset, a function of (seed, epoch)
        verbose=verbose,
        callbacks=[
            _StopOnNonFiniteLoss(seeds),
            *first_callbacks,  # before the checkpoint: their scores reach the history, their state is saved
            checkpoint,
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard" / name)),
            timer,
            *callbacks,
        ],
    )
    return history, time.perf_counter() - started, timer, checkpoint


def _training_name(seeds: Sequence[int]) -> str:
    """What a training session's files are named after: `seed-XX` for one member, `fused-XX-YY` for a fused
    group."""
    if len(seeds) == 1:
        return member_name(seeds[0])
    return "fused-" + "-".join(f"{seed:02d}" for seed in seeds)


def _epoch_stream(epoch_data, first_epoch: int, epochs: int, name: str):
    """The epochs still to train as one prefetched stream, `Dataset.range(first, epochs).flat_map(epoch_data)`,
    and the number of batches of an epoch (`steps_per_epoch`), so an epoch's batches do not depend on where
    the run started."""
    import tensorflow as tf

    steps = int(epoch_data(tf.constant(0, tf.int64)).cardinality())
    if steps <= 0:
        raise ValueError(
            f"{name}: an epoch of training data must have a known, non-zero number of batches, got {steps} "
            "(-2: unknown, e.g. after `filter`; -1: infinite)"
        )
    # With every epoch done (or stopped early) no batch is read; the last epoch stands in for an empty stream,
    # which a distribution strategy could not peek at to build the model.
    dataset = tf.data.Dataset.range(min(first_epoch, epochs - 1), epochs).flat_map(epoch_data)
    return dataset.prefetch(tf.data.AUTOTUNE), steps


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite with an error naming the seed and the epoch
    (`keras.callbacks.TerminateOnNaN` stops quietly, and the member would then be saved as finished)."""

    def __init__(self, seeds: Sequence[int]):
        super().__init__()
        self.seeds = list(seeds)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or np.isfinite(loss):
            return
        if len(self.seeds) == 1:
            who = f"seed {self.seeds[0]}"
        else:  # a fused group logs each member's loss as member_<k>_loss
            bad = [s for k, s in enumerate(self.seeds) if not np.isfinite(logs.get(f"member_{k}_loss", np.nan))]
            bad = bad or self.seeds
            who = f"seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} (fused group of {self.seeds})"
        members = "the member is" if len(self.seeds) == 1 else "the members are"
        raise NonFiniteLossError(
            f"{who}: the training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}; "
            f"training stopped and {members} not saved (lower train.learning_rate, or check the inputs for "
            "non-finite values)"
        )


def _save_member(model, recipe: dict, seed: int, run_dir: Path, train_data) -> dict:
    """Recalibrate BatchNormalization if the recipe says so, save `members/seed-XX.keras` atomically."""
    member_path = run_dir / "members" / f"{member_name(seed)}.keras"
    recalibrated = 0
    if recipe["train"].get("recalibrate_batchnorm", False):
        recalibrated = recalibrate_batchnorm(model, train_data(seed, 0))
    with files.atomic_path(member_path, suffix=".keras") as temporary:
        loadable_anywhere(model).save(temporary)
    return {
        "seed": seed,
        "file": str(member_path.relative_to(run_dir)),
        "epochs": recipe["train"]["epochs"],
        "batchnorm_recalibration_batches": recalibrated,
    }


def loadable_anywhere(model: keras.Model) -> keras.Model:
    """The model to save as an ensemble member, so that plain Keras loads it in safe mode.

    A model compiled with Keras's own optimizer and loss is saved as it is (compiled, with its optimizer's
    state). One compiled with an optimizer or a loss of this package (`replicate.optimizers`,
    `replicate.losses`) is saved uncompiled, as the same layers and weights: Keras rebuilds the training
    configuration when loading and could only find those with the package imported, and prediction does not
    need them. The checkpoints of unfinished members keep the optimizer (they resume inside the package).
    """
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under mixed_float16: a LossScaleOptimizer
    loss = getattr(model, "loss", None)
    if type(optimizer) not in optimizers.OPTIMIZERS.values() and type(loss).__module__ != losses.__name__:
        return model
    return keras.Model(model.inputs, model.outputs, name=model.name)


class BestEpoch(keras.callbacks.Callback):
    """Score the model on held-out data every few epochs, log the scores, and keep the best epoch's weights.

    The sources chose their final weights by a validation score that Keras cannot compute as a streaming
    metric (person-level macro F1, UAR, AUC/pAUC per machine ID), so the score is any function of the model.
    The values go into the epoch's logs, where the CSV history, ReduceLROnPlateau and EarlyStopping read them
    (`train_member` runs member callbacks first for that reason). At the end of training the best weights
    are put back. The best score, its epoch and its weights are the callback's state (`state_attributes`),
    saved with every checkpoint, so a member resumed after a kill still ends with the best epoch of the
    whole run.

    Args:
        score: model → {name: value}, e.g. `lambda model: {"val_uar": ...}`; must include `monitor`.
        monitor: the value that decides the best epoch.
        mode: "max" (higher is better) or "min".
        every: score every `every` epochs (and always after the last epoch). On the other epochs the values
            named in `keys` are logged as NaN, so the CSV history has them; a callback that watches one of
            them counts those epochs as no progress.
        keys: the names `score` returns (default: just `monitor`).

    Example:
        >>> best = BestEpoch(lambda model: {"val_uar": uar(model)}, monitor="val_uar")
        >>> model.fit(dataset, epochs=150, callbacks=[best])   # the model now has the best epoch's weights
        >>> best.best_epoch, best.best                           # e.g. (87, 0.7305)
    """

    state_attributes = ("best", "best_epoch", "best_weights")

    def __init__(self, score, *, monitor: str, mode: str = "max", every: int = 1, keys=()):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.score = score
        self.monitor = monitor
        self.mode = mode
        self.every = every
        self.keys = tuple(keys) or (monitor,)
        self.best: float | None = None
        self.best_epoch = 0  # 1-based; 0 until an epoch was scored
        self.best_weights: list | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every and not last:
            if logs is not None:
                logs.update(dict.fromkeys(self.keys, float("nan")))
            return
        scores = {key: float(value) for key, value in self.score(self.model).items()}
        if self.monitor not in scores:
            raise ValueError(f"the score function returned {sorted(scores)}, without the monitored {self.monitor!r}")
        if logs is not None:
            logs.update(scores)
        if self._better(scores[self.monitor]):
            self.best, self.best_epoch = scores[self.monitor], epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


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
    trained_from: Mapping[str, Any],
    retrain: bool = False,
    log: Callable[[str], None] = print,
    **member_arguments: Any,
) -> dict:
    """Train every seed's member in turn (or `train.fused` of them at a time), keeping members that an
    earlier run finished from the same set-up.

    The run folder is locked (`runner.lock_run_dir`) meanwhile. Members are kept, resumed, trained again or
    refused by their records (the module docstring says how); `run.executor` decides where the others train
    ("local" or "ray": `_train_groups`), and this process alone writes the records and the manifest.

    Args:
        recipe: the resolved recipe.
        seeds: one member per seed.
        run_dir: the run folder.
        manifest: what inference needs besides the members (task, features, normalisation, class names).
        trained_from: what the members learn from besides the recipe, by name: the training data (a cache's
            `checksums`, or arrays, hashed by content), the normalisation statistics, the split... Small
            JSON-able values or numpy arrays; a large array is better named by its cache's checksums than
            hashed on every run.
        retrain: remove the members trained from another set-up and train them again, instead of stopping.
        log: where progress lines go.
        member_arguments: passed to `train_member` (build_model, train_data, validation_data, ...).

    Returns:
        The manifest, with its `members` list.

    Raises:
        runner.RunFolderError: members of another set-up, without `retrain`.
        runner.TrainingFailedError: on Ray, members that failed every retry (after the others finished and were
            recorded); the message names their seeds and errors.
        files.LockedError: another process uses the run folder.
    """
    run_dir = Path(run_dir)
    with runner.lock_run_dir(run_dir):
        setup = training_setup(recipe, trained_from)
        trained = _kept_members(run_dir, seeds, setup, retrain, log)
        manifest = {**manifest, "members": [], "environment": environment()}
        width = recipe["train"].get("fused", 1)
        pending = [seed for seed in seeds if seed not in trained]
        groups = [tuple(pending[start : start + width]) for start in range(0, len(pending), width)]
        for seed in pending:  # before any checkpoint: an interrupted member is known to be of this set-up
            _write_record(run_dir, seed, {"state": "training", "trained_from": setup})
        finished = functools.partial(_record_finished, run_dir, setup, seeds, trained, manifest)
        _train_groups(recipe, groups, _group_names(groups, seeds), finished, run_dir, log, member_arguments)
        manifest["members"] = [trained[seed] for seed in seeds]
        files.write_json(run_dir / MANIFEST, manifest)
    return manifest


def _group_names(groups: Sequence[tuple[int, ...]], seeds: Sequence[int]) -> dict[tuple[int, ...], str]:
    """How the log names each group, e.g. "members 1/4 (seed 0), 2/4 (seed 1)"."""
    return {
        group: ("member " if len(group) == 1 else "members ")
        + ", ".join(f"{seeds.index(seed) + 1}/{len(seeds)} (seed {seed})" for seed in group)
        for group in groups
    }


def _record_finished(
    run_dir: Path,
    setup: dict,
    seeds: Sequence[int],
    trained: dict[int, dict],
    manifest: dict,
    group: tuple[int, ...],
    entries: list[dict],
) -> None:
    """Record a group's finished members ("trained", with their file's SHA-256 and manifest entry), add them
    to `trained`, and rewrite the manifest with every member trained so far."""
    for seed, entry in zip(group, entries, strict=True):
        record = {"state": "trained", "trained_from": setup, "sha256": files.sha256(run_dir / entry["file"])}
        _write_record(run_dir, seed, {**record, "entry": entry})
        trained[seed] = entry
    manifest["members"] = [trained[seed] for seed in seeds if seed in trained]
    manifest["peak_memory_mb"] = peak_memory_mb()
    files.write_json(run_dir / MANIFEST, manifest)


def _train_groups(
    recipe: dict,
    groups: Sequence[tuple[int, ...]],
    names: Mapping[tuple[int, ...], str],
    finished: Callable[[tuple[int, ...], list[dict]], None],
    run_dir: Path,
    log: Callable[[str], None],
    member_arguments: Mapping[str, Any],
) -> None:
    """Train the groups where `run.executor` says: "local" (the default) one group after another in this
    process; "ray" each group as a task of a Ray cluster (`replicate.ray_executor`), side by side as its
    resources allow. Either way this process alone writes the records and the manifest (`finished`, called
    with each group and its entries), and each member's files are those `train_member` writes.

    Raises:
        runner.TrainingFailedError: on Ray, groups that failed every retry, after the others finished.
    """
    executor = recipe.get("run", {}).get("executor", "local")
    failed = {}
    if executor == "ray":
        from replicate import ray_executor

        failed = ray_executor.train_groups(
            recipe, groups, run_dir=run_dir, names=names, finished=finished, log=log, **member_arguments
        )
    elif executor == "local":
        for group in groups:
            log(f"{names[group]}: training" + (" as one fused model" if len(group) > 1 else ""))
            finished(group, train_group(recipe, group, run_dir=run_dir, log=log, **member_arguments))
    else:
        raise ValueError(f"run.executor must be 'local' or 'ray', got {executor!r}")
    if failed:
        errors = "; ".join(f"{names[group]} failed: {error}" for group, error in failed.items())
        raise runner.TrainingFailedError(
            f"{run_dir}: {errors}; the members trained so far are kept (running the same command again trains "
            "the others)"
        )


def train_group(recipe: dict, seeds: Sequence[int], *, run_dir: str | Path, **member_arguments: Any) -> list[dict]:
    """Train one member (`train_member`) or a fused group of them (`train_fused`): one unit of work of an
    executor. Returns their manifest entries."""
    if len(seeds) == 1:
        return [train_member(recipe, seeds[0], run_dir=run_dir, **member_arguments)]
    return train_fused(recipe, seeds, run_dir=run_dir, **member_arguments)


def _kept_members(
    run_dir: Path, seeds: Sequence[int], setup: dict, retrain: bool, log: Callable[[str], None]
) -> dict[int, dict]:
    """The finished members of this set-up to keep (seed → manifest entry). Members of another set-up stop
    the run (`runner.RunFolderError`) or, with `retrain`, are removed; damaged ones are removed (said)."""
    records = _read_records(run_dir)
    stale = {
        seed: changes
        for seed, record in records.items()
        if record is not None and (changes := setup_changes(record["trained_from"], setup))
    }
    if stale and not retrain:
        raise runner.RunFolderError(_refusal(run_dir, stale))
    for seed, changes in stale.items():
        log(f"seed {seed}: trained from another set-up ({', '.join(changes)}); removed (--retrain)")
        _discard_member(run_dir, seed)
        del records[seed]
    kept = {}
    for position, seed in enumerate(seeds, start=1):
        which = f"member {position}/{len(seeds)} (seed {seed})"
        problem = _member_problem(run_dir, seed, records)
        if problem is None:
            kept[seed] = records[seed]["entry"]
            log(f"{which}: already trained, kept")
        elif problem:
            log(f"{which}: {problem}: training again")
            _discard_member(run_dir, seed)
    return kept


def training_setup(recipe: Mapping[str, Any], trained_from: Mapping[str, Any]) -> dict:
    """What a member is trained from, as its record keeps it: the recipe's values by dotted key (all but
    `NOT_IN_SETUP`) and a content hash of each part of `trained_from` (see `train_ensemble`)."""
    return {"recipe": _setup_values(recipe), "data": {name: _content_hash(part) for name, part in trained_from.items()}}


def setup_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two `training_setup`s, one line each: "train.epochs: 3 → 5", "other targets".

    An engine option a record lacks (written before the recipe had it) counts as its default
    (`recipe.ENGINE_DEFAULTS`), so members trained before the engine declared it are kept."""
    defaults = {
        f"{section}.{key}": value
        for section, table in recipe_lib.ENGINE_DEFAULTS.items()
        for key, value in table.items()
    }
    changes = []
    for key in sorted(set(recorded["recipe"]) | set(current["recipe"])):
        old = recorded["recipe"].get(key, defaults.get(key, _ABSENT))
        new = current["recipe"].get(key, defaults.get(key, _ABSENT))
        if old != new:
            changes.append(f"{key}: {_shown(old)} → {_shown(new)}")
    for name in sorted(set(recorded["data"]) | set(current["data"])):
        if recorded["data"].get(name) != current["data"].get(name):
            changes.append(f"other {name}")
    return changes


_ABSENT = object()


def _shown(value: Any, width: int = 40) -> str:
    text = "(none)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _setup_values(recipe: Mapping[str, Any], prefix: str = "") -> dict:
    values = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if dotted in NOT_IN_SETUP:
            continue
        if isinstance(value, Mapping):
            values.update(_setup_values(value, f"{dotted}."))
        else:
            values[dotted] = value
    if prefix:
        return values
    return json.loads(json.dumps(values, default=_plain))  # as it reads back from a record: tuples are lists


def _plain(value: Any) -> Any:
    """A JSON form of a recipe value that a task put in as an object (DCASE's learning-rate schedule)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if hasattr(value, "get_config"):
        return keras.saving.serialize_keras_object(value)
    raise TypeError(f"cannot record a {type(value).__name__} in a member's set-up")


def _content_hash(value: Any) -> str:
    """A SHA-256 of JSON-able data in which numpy arrays stand for their dtype, shape and bytes."""

    def plain(item: Any) -> Any:
        if isinstance(item, np.ndarray):
            array = np.ascontiguousarray(item)
            digest = hashlib.sha256(memoryview(array).cast("B")).hexdigest()
            return {"dtype": array.dtype.str, "shape": list(array.shape), "sha256": digest}
        return _plain(item)

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=plain).encode()).hexdigest()


def _record_path(run_dir: Path, seed: int) -> Path:
    return run_dir / "members" / f"{member_name(seed)}.json"


def _write_record(run_dir: Path, seed: int, record: dict) -> None:
    files.write_json(_record_path(run_dir, seed), {"seed": seed, **record})


def _read_records(run_dir: Path) -> dict[int, dict | None]:
    """Every member record in the run folder: seed → record, or None for a record that cannot be read."""
    records = {}
    for path in sorted((run_dir / "members").glob("seed-*.json")):
        try:
            seed = int(path.stem.removeprefix("seed-"))
        except ValueError:  # not a record of ours
            continue
        try:
            records[seed] = files.read_json(path)
        except ValueError:
            records[seed] = None
    return records


def _member_problem(run_dir: Path, seed: int, records: Mapping[int, dict | None]) -> str | None:
    """None for a finished member to keep; "" for one to train (new, or interrupted: resumed); otherwise
    why its files cannot be kept."""
    name = member_name(seed)
    if seed in records and records[seed] is None:
        return f"members/{name}.json is damaged"
    record = records.get(seed)
    if record is None:  # a new member, unless an earlier version or a crash left files of it
        leftovers = _member_paths(run_dir, seed)
        if not leftovers:
            return ""
        model = run_dir / "members" / f"{name}.keras"
        shown = model if model in leftovers else leftovers[0]
        return f"{shown.relative_to(run_dir).as_posix()} has no record of its set-up"
    if record["state"] != "trained":  # interrupted: resumed from its checkpoint, unless it was saved meanwhile
        saved = (run_dir / "members" / f"{name}.keras").is_file()
        return f"members/{name}.keras was saved but not recorded (the run was killed in between)" if saved else ""
    return damaged_member(run_dir, record["entry"]["file"], record["sha256"])


def damaged_member(run_dir: str | Path, file: str, sha256: str) -> str | None:
    """What is wrong with a member's file (relative to `run_dir`) by the SHA-256 in its record; None if whole."""
    path = Path(run_dir) / file
    if not path.is_file():
        return f"{file} is missing"
    if files.sha256(path) != sha256:
        record = Path(file).with_suffix(".json").as_posix()
        return f"{file} is damaged (its SHA-256 differs from {record})"
    return None


def export_members(
    group_dir: str | Path, export: Callable[[keras.Model], keras.Model], what: str, log: Callable[[str], None] = print
) -> None:
    """Make every member of a trained group an inference model (idempotent, crash-safe; DCASE's export).

    `train_member` saves the trained model as `members/seed-XX.keras`; it is kept as `training/seed-XX.keras`
    (resume, inspection, fine-tuning) and the member file becomes `export(trained model)`. The manifest entry
    records `exported` and `training_file`, and the member's record takes the new entry and the file's new
    SHA-256. `what` says what the exported model is, for the log line.
    """
    group_dir = Path(group_dir)
    manifest_path = group_dir / MANIFEST
    manifest = files.read_json(manifest_path)
    for entry in manifest["members"]:
        if entry.get("exported"):
            continue
        member_path = group_dir / entry["file"]
        training_path = group_dir / "training" / member_path.name
        if not training_path.is_file():
            with files.atomic_path(training_path, suffix=".keras") as temporary:
                os.replace(member_path, temporary)  # the member file is the trained model at this point
        model = keras.models.load_model(training_path, safe_mode=True)
        with files.atomic_path(member_path, suffix=".keras") as temporary:
            export(model).save(temporary)
        entry.update(exported=True, training_file=str(training_path.relative_to(group_dir)))
        record_path = _record_path(group_dir, entry["seed"])
        record = files.read_json(record_path)
        files.write_json(record_path, {**record, "sha256": files.sha256(member_path), "entry": entry})
        files.write_json(manifest_path, manifest)
        log(f"member {member_path.name}: exported ({what})")


def _member_paths(run_dir: Path, seed: int) -> list[Path]:
    """Everything of a member in the run folder's subfolders (model, record, history, checkpoints, logs:
    names `seed-XX` or `seed-XX.*`), and of any fused group it trained in (`fused-XX-YY...`)."""
    name, number = member_name(seed), f"{seed:02d}"
    found = []
    for folder in sorted(path for path in run_dir.iterdir() if path.is_dir()) if run_dir.is_dir() else ():
        for path in sorted(folder.iterdir()):
            stem = path.name.split(".")[0]
            if stem == name or (stem.startswith("fused-") and number in stem.split("-")[1:]):
                found.append(path)
    return found


def _discard_member(run_dir: Path, seed: int) -> None:
    for path in _member_paths(run_dir, seed):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _refusal(run_dir: Path, stale: Mapping[int, list[str]]) -> str:
    seeds = sorted(stale)
    changes = list(dict.fromkeys(change for seed in seeds for change in stale[seed]))
    if len(seeds) == 1:
        who, them = f"the member of seed {seeds[0]} was", "it"
    else:
        who, them = f"the members of seeds {task.listing(seeds)} were", "them"
    return (
        f"{run_dir}: {who} trained from another set-up ({task.listing(changes, limit=8)}); use another --run-dir, "
        f"or --retrain to train {them} again"
    )


def peak_memory_mb() -> dict:
    """Peak resident memory so far of this process, in MiB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # ru_maxrss: KiB on Linux, bytes on macOS
    return {"process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)}


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
        "machine": report.machine(),
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


class _EpochTimer(keras.callbacks.Callback):
    """Steps per second over the epochs after the session's first (which includes graph tracing)."""

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.seconds = 0.0
        self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch  # a resumed run starts later
        self.started = time.perf_counter()
        self.epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.epoch_steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.first_epoch and self.params.get("epochs", 1) > epoch + 1:
            return
        self.seconds += time.perf_counter() - self.started
        self.steps += self.epoch_steps

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0
