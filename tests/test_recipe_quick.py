"""`make recipe-dacon` as a user runs it: the quick demo must learn (slow: minutes; `make test-all`)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from replicate import files
from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_recipe_beats_the_prior_and_the_mean_member(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "make",
            "recipe-dacon",
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
    ensemble = scores["ensemble_kl_by_size"][str(len(scores["member_kl"]))]
    assert ensemble < np.mean(scores["member_kl"])
    assert ensemble < 0.95 * scores["prior_kl"]
