"""`make recipe-maic` as a user runs it: the quick demo must beat the majority class (slow; `make test-all`)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from replicate import files
from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_recipe_beats_the_majority_class(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "make",
            "recipe-maic",
            f"SYNTH_DIR={tmp_path / 'synth'}",
            f"ARGS=--run-dir {run_dir} --set run.cache_dir='{tmp_path / 'cache'}' --no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: report {run_dir / 'report.md'}, submission {run_dir / 'submission.csv'}" in result.stdout
    scores = files.read_json(run_dir / "scores.json")["evaluations"]["test (synthetic answers)"]
    ensemble = scores["ensemble_macro_f1_by_size"][str(len(scores["member_macro_f1"]))]
    assert ensemble > 2 * scores["majority_macro_f1"]
    assert np.mean(scores["member_macro_f1"]) > 2 * scores["majority_macro_f1"]
