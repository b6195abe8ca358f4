"""The registry of tasks: every source the package runs, imported by name in code (nothing is looked up by
a string the data supply). The engine finds a run's hooks here from its manifest's "task".

Adding a source: its package's `TASK` goes into `TASKS` below.

MAIC and AI CUP are still single modules with their own run (`run`, `write_report`); until each is
ported to the protocol, an `Unported` adapter gives the engine what it needs of them: the README's results
block, model inputs for audio files where the module has them, and the benchmark member.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from replicate import aicup, dacon, dcase, files, maic, runner
from replicate.task import BenchmarkMember, Run, Task


class UnportedError(ValueError):
    """What a task not yet ported to the protocol cannot do; the message names the task."""


class Unported(Task):
    """A source not yet ported to the protocol: its module keeps its own command line and run; the engine
    uses its `results_table(run_dir)`, its `inference_features(paths, manifest)` and `benchmark`.

    Args:
        module: the task module.
        benchmark: recipe → its `BenchmarkMember`.
    """

    def __init__(self, module: ModuleType, benchmark: Callable[[dict], BenchmarkMember]):
        self.module = module
        self.name = module.__name__.rpartition(".")[2]
        self.rules = module.RULES
        self._benchmark = benchmark

    def load_recipe(self, profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
        return self.module.load_recipe(profile, overrides, path)

    def inference_inputs(self, manifest: dict, paths: Sequence[str | os.PathLike]):
        return self.module.inference_features(paths, manifest)

    def predict(self, ensemble, inputs: Sequence[str]):
        raise UnportedError(
            f"{ensemble.run_dir}: predicting from a {self.name} run is not available until the {self.name} task "
            "is ported to the task protocol (replicate.task)"
        )

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        return self._benchmark(recipe)


def _aicup_member(recipe: dict) -> BenchmarkMember:
    """The n_mfcc = 13 variant (the first of the five), multimodal as the recipe's default."""
    n_mfcc = recipe["features"]["n_mfcc"][0]
    return BenchmarkMember(
        functools.partial(aicup.build_model, recipe, n_mfcc, recipe["model"]["clinical"]), recipe["train"]
    )


def _maic_member(recipe: dict) -> BenchmarkMember:
    # 21 sub-classes occur in the real data (the recipe derives them from the data)
    return BenchmarkMember(functools.partial(maic.build_model, recipe, 21), recipe["train"])


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        dacon.TASK,
        Unported(maic, _maic_member),
        dcase.TASK,
        Unported(aicup, _aicup_member),
    )
}


def get(name: str) -> Task:
    """The task of this name (a manifest's "task", a recipe's `task`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the package has {', '.join(TASKS)}")
    return TASKS[name]


def results_block(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(task name, the README's results block) of a finished run folder."""
    run_dir = Path(run_dir)
    name = files.read_json(run_dir / runner.MANIFEST)["task"]
    task = get(name)
    if isinstance(task, Unported):
        return name, task.module.results_table(run_dir)
    return name, runner.results_table(Run.read(run_dir, task))
