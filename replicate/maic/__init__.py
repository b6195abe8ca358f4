"""MAIC 2021 Voice AI Challenge (1st place): per-person mel CSVs → tokens → sub-classes → mini-ResNet →
label-masked token votes per person. The task package.

    python -m replicate.maic --data /path/to/maic                      # the source recipe
    python -m replicate.maic --data data/synth/maic --profile quick    # the synthetic demo
    python -m replicate.maic --data ... --set split.by=person --seeds 15
    python -m replicate.predict runs/maic/<run> persons/ --out diagnoses.csv

`data` reads and checks the layout, `tokens` cuts the CSVs into cached tokens and makes model inputs of
them, `labels` holds the sub-classes, masking, votes and person-level scores, `task` the hooks (`MaicTask`),
`report` the report's parts; the engine (`replicate.runner`) runs them. docs/maic.md describes the source
and the recipe.
"""

from replicate.maic.data import DIAGNOSES, MaicData, Person, load_data, read_person
from replicate.maic.labels import SubclassTable, person_predictions, vote
from replicate.maic.report import loss_scale_note
from replicate.maic.task import TASK, MaicTask, build_model, split_rows
from replicate.maic.tokens import Inputs, crop_offsets, fit_normalization, token_store
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = [
    "DIAGNOSES",
    "TASK",
    "DataError",
    "Inputs",
    "MaicData",
    "MaicTask",
    "Person",
    "SubclassTable",
    "build_model",
    "crop_offsets",
    "fit_normalization",
    "load_data",
    "load_recipe",
    "loss_scale_note",
    "main",
    "person_predictions",
    "read_person",
    "run",
    "split_rows",
    "token_store",
    "vote",
]
