"""Checkpoints of an unfinished member, so that a killed run resumes as if it had never stopped.

At the end of every epoch `Checkpoint` writes everything that decides how training goes on: every variable
of the model (weights, BatchNormalization statistics, the random-seed states of its dropout layers, which
`save_weights` leaves out) and of the optimizer (step count, learning rate, moments), the state of the
member's stateful callbacks (`CALLBACK_STATE`: best epoch and its weights, ReduceLROnPlateau and
EarlyStopping counters), whether training stopped early, and the history so far. The input pipelines draw
every epoch's order, crops and mixing from (seed, epoch) (`replicate.pipeline`), so on the same machine a
member killed at any point and resumed ends with exactly the weights and history of an uninterrupted run.

A member's folder (`checkpoints/<member>/`) holds, after epoch 7:

    epoch-0007.npz     the arrays
    epoch-0007.json    what they are, the callbacks' state, the history, the arrays' SHA-256

Both are written atomically (temporary file + rename), the description last: a checkpoint without it does
not exist. The two newest are kept. A damaged one (a truncated, altered or missing file, or one that does
not fit the model) is said on the console and removed, and training resumes from the one before it, or
from the first epoch when none is left.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from replicate import files

FORMAT = 1
KEEP = 2
_NAME = re.compile(r"epoch-(\d{4,})\.json")

# The attributes that carry a Keras callback's state from one epoch to the next (what its `on_train_begin`
# resets). A callback of another class may list its own in a `state_attributes` class attribute; a list of
# arrays (best weights) travels in the arrays file, anything else must be a JSON value.
CALLBACK_STATE = {
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch", "best_weights"),
}


def state_attributes(callback: keras.callbacks.Callback) -> tuple[str, ...]:
    """The names of the attributes that make up `callback`'s state (empty for a stateless callback)."""
    own = getattr(callback, "state_attributes", None)
    if own is not None:
        return tuple(own)
    return next((names for kind, names in CALLBACK_STATE.items() if isinstance(callback, kind)), ())


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be used; the message says why."""


class Checkpoint(keras.callbacks.Callback):
    """Save the member's whole training state at the end of every epoch, restore it to resume, and keep
    the history file equal to the finished epochs.

    Usage (what `replicate.train` does):

        checkpoint = Checkpoint(folder, history_path, member_callbacks, epochs=30)
        start = checkpoint.restore(model)      # a compiled model; the number of epochs already done
        model.fit(..., initial_epoch=start, callbacks=[*member_callbacks, checkpoint, ...])
        ... save the member ...
        checkpoint.remove()

    Args:
        folder: the member's checkpoint folder.
        history_path: the CSV history (epoch, then the logged values in name order), rewritten whole after
            every epoch; removed when training starts from the first epoch.
        callbacks: the member's callbacks whose state is saved and restored (`state_attributes`). They
            must come before this callback in `fit`'s list: their end-of-epoch state and logs are saved,
            and their `on_train_begin` resets run before this one restores them.
        epochs: the number of epochs training runs to (a checkpoint beyond it is not used).
        log: where "resuming"/"damaged" lines go.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        history_path: str | os.PathLike,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        *,
        epochs: int,
        log: Callable[[str], None] = print,
    ):
        super().__init__()
        self.folder = Path(folder)
        self.history_path = Path(history_path)
        self.stateful = [callback for callback in callbacks if state_attributes(callback)]
        self.epochs = epochs
        self.log = log
        self.history: list[dict] = []
        self.stopped = False
        self._callback_states: list[dict] | None = None

    # --- resuming --------------------------------------------------------------------------------------

    def restore(self, model: keras.Model) -> int:
        """Load the newest usable checkpoint into `model` (compiled; its optimizer is built here if it is
        not yet) and keep the callbacks' state for `on_train_begin`.

        Returns:
            The epoch to start from: the number of finished epochs, or `epochs` if training had stopped
            early; 0 without a usable checkpoint.
        """
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        damaged = False
        for path in self._descriptions()[::-1]:
            try:
                finished = self._load(path, model)
            except DamagedCheckpoint as error:
                self.log(f"{path.with_suffix('')}: damaged checkpoint ({error}); removed")
                self._delete(path)
                damaged = True
                continue
            stopped = ", where training had stopped early" if self.stopped else ""
            self.log(f"{self.folder.name}: resuming after epoch {finished}{stopped} ({path.with_suffix('')})")
            return self.epochs if self.stopped else finished
        if damaged:
            self.log(f"{self.folder.name}: no usable checkpoint left; training from the first epoch")
        return 0

    def _load(self, path: Path, model: keras.Model) -> int:
        """Check the checkpoint whole, then put it into the model and this callback (nothing is changed
        when it is damaged); returns its number of finished epochs."""
        try:
            description = json.loads(path.read_text(encoding="utf-8"))
            if description["format"] != FORMAT:
                raise DamagedCheckpoint(f"format {description['format']}, this version reads {FORMAT}")
            finished, stopped = int(description["epochs_done"]), bool(description["stopped"])
            history, callback_states = list(description["history"]), list(description["callbacks"])
            classes = [state["class"] for state in callback_states]
            data = path.with_suffix(".npz").read_bytes()
        except DamagedCheckpoint:
            raise
        except FileNotFoundError as error:
            raise DamagedCheckpoint(f"{Path(error.filename).name} is missing") from error
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DamagedCheckpoint(f"unreadable description: {error!r}") from error
        if hashlib.sha256(data).hexdigest() != description.get("sha256"):
            raise DamagedCheckpoint(f"{path.with_suffix('.npz').name} does not match its SHA-256 (truncated, altered)")
        if finished > self.epochs:
            raise DamagedCheckpoint(f"it is after epoch {finished}, beyond the {self.epochs} epochs of this run")
        if classes != [type(callback).__name__ for callback in self.stateful]:
            raise DamagedCheckpoint("its callbacks are not this run's")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            arrays = dict(arrays)
        assignments = []
        for group, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            values = [arrays.get(f"{group}/{index:05d}") for index in range(len(variables))]
            if [None if value is None else list(value.shape) for value in values] != _shapes(variables):
                raise DamagedCheckpoint(f"its {group} variables do not have this model's shapes")
            assignments += zip(variables, values, strict=True)
        for index, state in enumerate(callback_states):
            for name, count in state["arrays"].items():
                state["values"][name] = [arrays[f"callback{index}/{name}/{k:05d}"] for k in range(count)]
        for variable, value in assignments:
            variable.assign(value)
        self.history, self.stopped, self._callback_states = history, stopped, callback_states
        return finished

    def on_train_begin(self, logs=None):
        for callback, state in zip(self.stateful, self._callback_states or [], strict=False):
            for name, value in state["values"].items():
                setattr(callback, name, value)
        if self.history:
            self._write_history()
        else:
            with contextlib.suppress(FileNotFoundError):
                self.history_path.unlink()  # a member that starts over gets a new history

    # --- saving ----------------------------------------------------------------------------------------

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"epoch": epoch, **{key: _plain(value) for key, value in (logs or {}).items()}})
        self.stopped = bool(self.model.stop_training)
        self.save(epoch + 1)
        self._write_history()

    def save(self, finished: int) -> Path:
        """Write the checkpoint after `finished` epochs, then remove all but the `KEEP` newest."""
        model = self.model
        arrays = {}
        description = {"format": FORMAT, "epochs_done": finished, "stopped": self.stopped}
        for group, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            description[group] = _shapes(variables)
            arrays.update({f"{group}/{index:05d}": np.asarray(v) for index, v in enumerate(variables)})
        description["callbacks"] = []
        for index, callback in enumerate(self.stateful):
            state = {"class": type(callback).__name__, "values": {}, "arrays": {}}
            for name in state_attributes(callback):
                value = getattr(callback, name, None)
                if value and isinstance(value, list) and all(isinstance(item, np.ndarray) for item in value):
                    state["arrays"][name] = len(value)
                    arrays.update({f"callback{index}/{name}/{k:05d}": item for k, item in enumerate(value)})
                else:
                    state["values"][name] = _plain(value)
            description["callbacks"].append(state)
        description["history"] = self.history
        path = self.folder / f"epoch-{finished:04d}.json"
        with files.atomic_path(path.with_suffix(".npz"), suffix=".npz") as temporary:
            np.savez(temporary, **arrays)
            description["sha256"] = _sha256(temporary)  # of what was written, read back in pieces
        files.write_json(path, description)
        for older in self._descriptions()[:-KEEP]:
            self._delete(older)
        return path

    def _write_history(self) -> None:
        columns = sorted({key for row in self.history for key in row} - {"epoch"})
        with files.atomic_path(self.history_path, suffix=".csv") as temporary, open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *columns])
            writer.writerows([row["epoch"], *(row.get(column, "NA") for column in columns)] for row in self.history)

    # --- the folder ------------------------------------------------------------------------------------

    def final_logs(self) -> dict:
        """The last finished epoch's logged values (without "epoch"), over every session of the member."""
        return {key: value for key, value in (self.history[-1] if self.history else {}).items() if key != "epoch"}

    def remove(self) -> None:
        """Delete the folder (the member is saved: nothing is left to resume)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _descriptions(self) -> list[Path]:
        """The checkpoints' descriptions, oldest first. What a kill left half-done goes: temporary files,
        and an arrays file whose description was not written yet."""
        if not self.folder.is_dir():
            return []
        found = {}
        for path in self.folder.iterdir():
            if match := _NAME.fullmatch(path.name):
                found[int(match[1])] = path
        for path in self.folder.iterdir():
            if path.name.startswith(".") or path.suffix == ".npz" and not path.with_suffix(".json").exists():
                path.unlink()
        return [found[number] for number in sorted(found)]

    @staticmethod
    def _delete(description: Path) -> None:
        for path in (description, description.with_suffix(".npz")):  # without its description, a leftover
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _shapes(variables) -> list[list[int]]:
    """The variables' shapes, in order: what identifies them (their names depend on what else the process
    built before, so a resumed process may give the same layers other names)."""
    return [list(variable.shape) for variable in variables]


def _plain(value):
    """A JSON value for a logged or stateful number (numpy scalars become Python ones, exactly)."""
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        return value.item()
    return value
