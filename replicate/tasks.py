"""The registry of tasks: every source the package runs, imported by name in code (nothing is looked up by
a string the data supply). The engine finds a run's hooks here from its manifest's "task".

Adding a source: its package's `TASK` goes into `TASKS` below.
"""

from __future__ import annotations

import os
from pathlib import Path

from replicate import aicup, dacon, dcase, files, maic, runner
from replicate.task import Run, Task

TASKS: dict[str, Task] = {task.name: task for task in (dacon.TASK, maic.TASK, dcase.TASK, aicup.TASK)}


def get(name: str) -> Task:
    """The task of this name (a manifest's "task", a recipe's `task`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the package has {', '.join(TASKS)}")
    return TASKS[name]


def results_block(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(task name, the README's results block) of a finished run folder."""
    run_dir = Path(run_dir)
    name = files.read_json(run_dir / runner.MANIFEST)["task"]
    return name, runner.results_table(Run.read(run_dir, get(name)))
