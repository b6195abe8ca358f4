"""`make recipe-aicup` as a user runs it: the quick demo must learn, and the clinical fields must help
(slow: minutes; `make test-all`)."""

from __future__ import annotations

import subprocess

import pytest

from replicate import files
from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_recipe_is_well_above_chance_and_multimodal_beats_audio_only(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "make",
            "recipe-aicup",
            f"SYNTH_DIR={tmp_path / 'synth'}",
            f"ARGS=--run-dir {run_dir} --set run.cache_dir='{tmp_path / 'cache'}' --no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: report {run_dir / 'report.md'}, submission {run_dir / 'submission.csv'}" in result.stdout
    modalities = files.read_json(run_dir / "scores.json")["modalities"]
    for split in ("public", "private"):  # held-out synthetic persons
        multimodal = modalities["multimodal"]["splits"][split]["ensemble"]["uar"]
        audio_only = modalities["audio_only"]["splits"][split]["ensemble"]["uar"]
        assert audio_only > 0.3 and multimodal > 0.45  # chance is 0.2
        assert multimodal > audio_only
    assert len((run_dir / "submission.csv").read_text().splitlines()) == 300
