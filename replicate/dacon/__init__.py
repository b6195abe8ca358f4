"""DACON overlapping-speech classification (3rd place): the task package.

    python -m replicate.dacon --data /path/to/dacon                      # the source recipe
    python -m replicate.dacon --data data/synth/dacon --profile quick    # the synthetic demo
    python -m replicate.dacon --data ... --seeds 3 --epochs 20 --set train.batch_size=32

`data` reads and checks the layout, `task` holds the hooks (`DaconTask`: features, normalisation, the seed
ensemble, the submission, inference), `report` the report's parts; the engine (`replicate.runner`) runs
them. docs/dacon.md describes the source and the recipe.
"""

from replicate.dacon.data import DaconData, load_data, match_files, read_answers
from replicate.dacon.task import TASK, DaconTask, build_model, feature_spec
from replicate.task import DataError

load_recipe, run, main = TASK.load_recipe, TASK.run, TASK.main

__all__ = [
    "TASK",
    "DaconData",
    "DaconTask",
    "DataError",
    "build_model",
    "feature_spec",
    "load_data",
    "load_recipe",
    "main",
    "match_files",
    "read_answers",
    "run",
]
