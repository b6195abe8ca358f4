"""The synthetic MAIC data: the competition's layout, exact token frames, class profiles and demographics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replicate.synth import maic


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("maic-synth")
    summary = maic.generate(out, n_train=7, n_test=6, seed=3, progress=False)
    return out, summary


def test_layout_csv_and_json_per_person(written):
    out, summary = written
    assert summary["unit"] == "persons" and sum(summary["train_counts"].values()) == 7
    csvs = sorted((out / "train").glob("*.csv"))
    assert len(csvs) == 7 and len(list((out / "test").glob("*.csv"))) == 6
    metadata = json.loads((out / "train" / f"{csvs[0].stem}.json").read_text())
    assert set(metadata) == {"wav_code", "source_type", "diagnosis", "age", "sex"}
    test_metadata = json.loads(next((out / "test").glob("*[0-9].json")).read_text())
    assert "diagnosis" not in test_metadata
    answers = (out / "test_answer.csv").read_text().splitlines()
    assert answers[0] == "wav_code,diagnosis" and len(answers) == 7


def test_tokens_have_exact_frames_inside_the_128_row_csv(written):
    out, _ = written
    for csv in sorted((out / "train").glob("*.csv"))[:3]:
        mel = np.loadtxt(csv, delimiter=",")
        assert mel.shape[0] == 128 and -80.01 <= mel.min() and mel.max() <= 0.0
        tokens = json.loads((out / "train" / f"{csv.stem}_annotation.json").read_text())["tokens"]
        assert [token["token_no"] for token in tokens] == list(range(1, 18))
        for token in tokens:
            assert 0 <= token["startFrame"] < token["endFrame"] <= mel.shape[1]
            assert token["token_skip"] in ("normal", "skip") and token["token_pronounce"] in ("normal", "abnormal")
        voiced = np.mean([mel[:, t["startFrame"] : t["endFrame"]].mean() for t in tokens])
        gaps = [mel[:, a["endFrame"] + 2 : b["startFrame"] - 2] for a, b in zip(tokens, tokens[1:], strict=False)]
        silent = np.mean([gap.mean() for gap in gaps if gap.shape[1]])
        assert voiced > silent + 10  # the annotated frames are where the voice is


def test_single_json_holds_metadata_and_annotation(tmp_path):
    maic.generate(tmp_path, n_train=6, n_test=6, seed=1, single_json=True, progress=False)
    assert not list((tmp_path / "train").glob("*_annotation.json"))
    content = json.loads(next((tmp_path / "train").glob("*.json")).read_text())
    assert {"sex", "age", "diagnosis", "tokens"} <= set(content)


def test_class_counts_follow_the_source_proportions():
    counts = maic.class_counts(639)
    assert counts == maic.SOURCE_COUNTS
    small = maic.class_counts(50)
    assert sum(small.values()) == 50 and min(small.values()) >= 1 and max(small, key=small.get) == "Normal"
    with pytest.raises(ValueError, match="at least 6"):
        maic.class_counts(5)


def test_demographics_leave_combinations_empty():
    rng = np.random.default_rng(0)
    cancer = [maic.draw_person("Cancer", rng) for _ in range(300)]
    assert {sex for sex, _ in cancer} == {"M"}
    nodules = [maic.draw_person("Nodules", rng) for _ in range(300)]
    assert all(age < 55 for sex, age in nodules if sex == "M") and any(sex == "M" for sex, _ in nodules)


def test_normal_voices_are_inside_clinical_norms_and_pathology_goes_beyond():
    rng = np.random.default_rng(0)
    normal = [maic.person_voice("Normal", "F", 40.0, rng)[0] for _ in range(200)]
    assert max(v.jitter for v in normal) < 0.01 and max(v.shimmer for v in normal) < 0.035
    assert min(v.hnr_db for v in normal) >= 18.0
    for diagnosis in ("Cancer", "Paralysis"):
        voices = [maic.person_voice(diagnosis, "M", 60.0, rng)[0] for _ in range(200)]
        assert np.mean([v.jitter > 0.01 or v.hnr_db < 18 for v in voices]) > 0.8
    cysts = [maic.person_voice("Cyst_and_Polyp", "M", 50.0, rng)[0] for _ in range(200)]
    assert 0.4 < np.mean([v.diplophonia > 0 for v in cysts]) < 0.8
    functional = [maic.person_voice("Functional_dysphonia", "F", 40.0, rng)[0] for _ in range(200)]
    assert all(3.0 <= v.tremor_hz <= 8.0 for v in functional if v.tremor_depth > 0)
    assert min(v.breaks_per_s for v in functional) > 0


def test_same_seed_same_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        maic.generate(folder, n_train=6, n_test=6, seed=9, progress=False)
    for path in sorted((first / "train").iterdir()):
        assert path.read_bytes() == (second / "train" / path.name).read_bytes()
