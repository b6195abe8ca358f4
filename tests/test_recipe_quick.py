"""`make recipe-<name>` as a user runs it: each quick demo must learn (slow: minutes each; `make test-all`)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from replicate import files
from tests.conftest import ROOT
from tests.test_dcase import read_result_csv


def make_recipe(name: str, tmp_path) -> tuple:
    """Run `make recipe-<name>` on fresh synthetic data, cache and run folders; return (run folder, scores)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "make",
            f"recipe-{name}",
            f"SYNTH_DIR={tmp_path / 'synth'}",
            f"ARGS=--run-dir {run_dir} --set run.cache_dir='{tmp_path / 'cache'}' --no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.splitlines()[-1]  # "done: <headline score> — report ..., submission ..."
    assert last.startswith("done: ") and f" — report {run_dir / 'report.md'}" in last
    return run_dir, files.read_json(run_dir / "scores.json"), result.stdout


@pytest.mark.slow
def test_dacon_quick_recipe_beats_the_prior_and_the_mean_member(tmp_path):
    run_dir, scores, stdout = make_recipe("dacon", tmp_path)
    assert f"submission {run_dir / 'submission.csv'}" in stdout
    test = scores["evaluations"]["test (synthetic answers)"]
    ensemble = test["ensemble_kl_by_size"][str(len(test["member_kl"]))]
    assert ensemble < np.mean(test["member_kl"])
    assert ensemble < 0.95 * test["prior_kl"]


@pytest.mark.slow
def test_maic_quick_recipe_beats_the_majority_class(tmp_path):
    run_dir, scores, stdout = make_recipe("maic", tmp_path)
    assert f"submission {run_dir / 'submission.csv'}" in stdout
    test = scores["evaluations"]["test (synthetic answers)"]
    ensemble = test["ensemble_macro_f1_by_size"][str(len(test["member_macro_f1"]))]
    assert ensemble > 2 * test["majority_macro_f1"]
    assert np.mean(test["member_macro_f1"]) > 2 * test["majority_macro_f1"]


@pytest.mark.slow
def test_aicup_quick_recipe_is_well_above_chance_and_multimodal_beats_audio_only(tmp_path):
    run_dir, scores, stdout = make_recipe("aicup", tmp_path)
    assert f"submission {run_dir / 'submission.csv'}" in stdout
    modalities = scores["modalities"]
    for split in ("public", "private"):  # held-out synthetic persons
        multimodal = modalities["multimodal"]["splits"][split]["ensemble"]["uar"]
        audio_only = modalities["audio_only"]["splits"][split]["ensemble"]["uar"]
        assert audio_only > 0.3 and multimodal > 0.45  # chance is 0.2
        assert multimodal > audio_only
    assert len((run_dir / "submission.csv").read_text().splitlines()) == 300


@pytest.mark.slow
def test_dcase_quick_recipe_beats_chance_on_every_machine_type(tmp_path):
    run_dir, scores, _ = make_recipe("dcase", tmp_path)
    evaluation = scores["groups"][scores["final_group"]]["dev"][scores["method"]]["ensemble"]
    assert len(evaluation["types"]) == 6
    for machine_type, values in evaluation["types"].items():
        assert values["auc"] > 0.6, (machine_type, values)
    parsed = read_result_csv(run_dir / "dev" / "result.csv")
    assert sorted(parsed) == sorted(evaluation["types"])
    assert len(list((run_dir / "eval").glob("anomaly_score_*_id_*.csv"))) == 6
