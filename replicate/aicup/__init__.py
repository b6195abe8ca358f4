"""AI CUP 2023 multimodal pathological-voice classification (6th private): the task package.

    python -m replicate.aicup --data /path/to/aicup2023                       # five n_mfcc variants, multimodal
    python -m replicate.aicup --data ... --set model.clinical=false           # audio only
    python -m replicate.aicup --data ... --set ensemble.seeds=3               # 5 variants × 3 seeds
    python -m replicate.aicup --data data/synth/aicup --profile quick         # the synthetic demo

`data` reads and checks the layout, `clinical` encodes the clinical fields, `splits` draws each variant's
split and class weights, `scoring` holds the vote and the scores, `task` the hooks (`AicupTask`: features,
one seed ensemble per modality and variant, the submission, inference), `report` the report's parts; the
engine (`replicate.runner`) runs them. docs/aicup.md describes the source and the recipe.
"""

from replicate.aicup.clinical import ClinicalEncoder
from replicate.aicup.data import (
    CLASS_NAMES,
    FIELD_NAMES,
    FIELDS,
    AicupData,
    Split,
    load_data,
    normalize_column,
    read_table,
)
from replicate.aicup.scoring import classification_scores, vote
from replicate.aicup.splits import Fold, class_weights, fold_split, split_summary, variant_folds
from replicate.aicup.task import TASK, AicupTask, build_model, feature_spec, model_inputs
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = [
    "CLASS_NAMES",
    "FIELDS",
    "FIELD_NAMES",
    "TASK",
    "AicupData",
    "AicupTask",
    "ClinicalEncoder",
    "DataError",
    "Fold",
    "Split",
    "build_model",
    "class_weights",
    "classification_scores",
    "feature_spec",
    "fold_split",
    "load_data",
    "load_recipe",
    "main",
    "model_inputs",
    "normalize_column",
    "read_table",
    "run",
    "split_summary",
    "variant_folds",
    "vote",
]
