"""DCASE 2020 Task 2 (anomalous machine sounds) by machine-ID classification: the task package.

`data` reads and checks the official layout, `task` holds the hooks (`DcaseTask`), `members` what a member
is (its data, schedule, selection, export and clip-level outputs), `scoring` the anomaly scores, AUC/pAUC and
the official CSVs, `report` the report's parts; the engine (`replicate.runner`) runs them. docs/dcase.md
describes the source, the recipe and the command line (`python -m replicate.dcase`).
"""

from replicate.dcase.data import DcaseData, load_data
from replicate.dcase.task import TASK, DcaseTask
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = ["TASK", "DataError", "DcaseData", "DcaseTask", "load_data", "load_recipe", "main", "run"]
