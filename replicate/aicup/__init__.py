"""AI CUP 2023 multimodal pathological-voice classification (6th private): the task package.

    python -m replicate.aicup --data /path/to/aicup2023                       # five n_mfcc variants, multimodal
    python -m replicate.aicup --data ... --set model.clinical=false           # audio only
    python -m replicate.aicup --data data/synth/aicup --profile quick         # the synthetic demo

`data` reads and checks the layout, `clinical` encodes the clinical fields, `splits` draws each variant's
split and class weights, `scoring` holds the vote and the scores, `task` the hooks, `report` the report's
parts; the engine (`replicate.runner`) runs them. docs/aicup.md describes the source and the recipe.
"""

from replicate.aicup.clinical import ClinicalEncoder
from replicate.aicup.data import CLASS_NAMES, load_data, read_table
from replicate.aicup.scoring import vote
from replicate.aicup.task import TASK, feature_spec, model_inputs
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = [
    "CLASS_NAMES",
    "TASK",
    "ClinicalEncoder",
    "DataError",
    "feature_spec",
    "load_data",
    "load_recipe",
    "main",
    "model_inputs",
    "read_table",
    "run",
    "vote",
]
