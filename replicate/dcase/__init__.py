"""DCASE 2020 Task 2 (anomalous machine sounds) by machine-ID classification: the task package.

`data` reads and checks the official layout, `task` holds the hooks (`DcaseTask`), `members` what a member
is (its data, schedule, selection, export and clip-level outputs), `scoring` the anomaly scores, AUC/pAUC and
the official CSVs, `report` the report's parts; the engine (`replicate.runner`) runs them. docs/dcase.md
describes the source, the recipe and the command line (`python -m replicate.dcase`).
"""

from replicate.dcase.data import Clip, DcaseData, load_data, parse_name
from replicate.dcase.members import ensemble_scores, to_windows, window_starts
from replicate.dcase.scoring import (
    SCORE_METHODS,
    evaluate_scores,
    fit_reference,
    reference_scores,
    softmax_scores,
    write_result_csv,
    write_score_files,
)
from replicate.dcase.task import LIBROSA_DEFINITION, TASK, DcaseTask, build_model, feature_spec, mel_resolution
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = [
    "LIBROSA_DEFINITION",
    "SCORE_METHODS",
    "TASK",
    "Clip",
    "DataError",
    "DcaseData",
    "DcaseTask",
    "build_model",
    "ensemble_scores",
    "evaluate_scores",
    "feature_spec",
    "fit_reference",
    "load_data",
    "load_recipe",
    "main",
    "mel_resolution",
    "parse_name",
    "reference_scores",
    "run",
    "softmax_scores",
    "to_windows",
    "window_starts",
    "write_result_csv",
    "write_score_files",
]
