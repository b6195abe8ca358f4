"""`make recipe-dcase` as a user runs it: the quick demo must detect anomalies of every machine type (slow)."""

from __future__ import annotations

import subprocess

import pytest

from replicate import dcase, files
from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_recipe_beats_chance_on_every_machine_type(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "make",
            "recipe-dcase",
            f"SYNTH_DIR={tmp_path / 'synth'}",
            f"ARGS=--run-dir {run_dir} --set run.cache_dir='{tmp_path / 'cache'}' --no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: report {run_dir / 'report.md'}" in result.stdout
    scores = files.read_json(run_dir / "scores.json")
    evaluation = scores["groups"][scores["final_group"]]["dev"][scores["method"]]["ensemble"]
    assert len(evaluation["types"]) == 6
    for machine_type, values in evaluation["types"].items():
        assert values["auc"] > 0.6, (machine_type, values)
    parsed = dcase.read_result_csv(run_dir / "dev" / "result.csv")
    assert sorted(parsed) == sorted(evaluation["types"])
    assert len(list((run_dir / "eval").glob("anomaly_score_*_id_*.csv"))) == 6
