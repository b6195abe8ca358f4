"""The synthetic AI CUP 2023 data: the competition's layout, its proportions, and class signal in voice and fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from replicate import aicup
from replicate.aicup.data import FIELDS
from replicate.synth import aicup as synth


def test_class_proportions_are_the_competitions():
    assert synth.class_counts(1000) == [536, 220, 168, 44, 32]
    assert sum(synth.class_counts(123)) == 123
    assert min(synth.class_counts(20)) >= 1  # every class present even in a tiny data set


def test_layout_header_and_answers(tmp_path):
    summary = synth.generate(tmp_path, n_train=24, n_public=6, n_private=5, seed=3, progress=False)
    header = (tmp_path / "Training_Dataset" / "training_datalist.csv").read_text().splitlines()[0].split(",")
    assert len(header) == 28 and header[0] == "ID" and header[-1] == "Disease category"
    assert "Onset of dysphonia " in header  # the real header's trailing space
    test_header = (tmp_path / "Public_Testing_Dataset" / "test_datalist_public.csv").read_text().splitlines()[0]
    assert test_header.split(",") == header[:-1]
    data = aicup.load_data(tmp_path)  # the package's own loader accepts it
    assert len(data.train.ids) == 24 and [s.name for s in data.tests] == ["public", "private"]
    assert len(set(data.train.ids) | set(data.tests[0].ids) | set(data.tests[1].ids)) == 35  # IDs unique overall
    assert all(len(identifier) == 7 for identifier in data.train.ids)
    assert np.bincount(data.train.labels, minlength=6)[1:].tolist() == summary["train_classes"]
    assert data.tests[1].labels is not None and len(data.tests[1].labels) == 5
    samples, rate = sf.read(data.train.paths[0])
    assert rate == 44_100 and samples.ndim == 1 and 0.7 * rate <= len(samples) <= 1.6 * rate
    assert sf.info(data.train.paths[0]).subtype == "PCM_16"


def test_same_seed_same_files(tmp_path):
    synth.generate(tmp_path / "a", n_train=20, n_public=0, n_private=0, seed=1, progress=False)
    synth.generate(tmp_path / "b", n_train=20, n_public=0, n_private=0, seed=1, progress=False)
    table = "Training_Dataset/training_datalist.csv"
    assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes()
    first = pd.read_csv(tmp_path / "a" / table, dtype={"ID": str})["ID"][0]
    wav = f"Training_Dataset/training_voice_data/{first}.wav"
    assert (tmp_path / "a" / wav).read_bytes() == (tmp_path / "b" / wav).read_bytes()
    assert not (tmp_path / "a" / "Public_Testing_Dataset").exists()


def _rows(category: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(category)
    return pd.DataFrame([synth.clinical_row(category, rng) for _ in range(n)])


def test_clinical_fields_are_plausible_per_class():
    neoplasm, phonotrauma, normal = _rows(4), _rows(1), _rows(5)
    assert neoplasm["Age"].mean() > phonotrauma["Age"].mean() + 15
    assert (neoplasm["Sex"] == 1).mean() > 0.7 and (phonotrauma["Sex"] == 2).mean() > 0.6  # 1 male, 2 female
    assert neoplasm["Smoking"].isin([1, 2]).mean() > 2 * phonotrauma["Smoking"].isin([1, 2]).mean()
    assert phonotrauma["Occupational vocal demand"].mean() > normal["Occupational vocal demand"].mean() + 0.4
    vhi = "Voice handicap index - 10"
    assert normal[vhi].mean() < 8 < phonotrauma[vhi].mean()
    assert normal[vhi].isna().any() and normal["PPD"].isna().any()  # empty cells, as the real lists have
    for field in FIELDS:  # every value inside the competition's code ranges
        values = pd.concat([neoplasm, phonotrauma, normal])[field.name].dropna()
        assert values.between(field.low, field.high).all(), field.name


def test_voice_profiles_perturb_in_the_clinical_direction():
    rng = np.random.default_rng(0)
    voices = {c: [synth.person_voice(c, "M", 50, rng) for _ in range(50)] for c in (1, 2, 3, 4, 5)}

    def mean(category, name):
        return np.mean([getattr(v, name) for v in voices[category]])

    assert mean(4, "jitter") > 3 * mean(5, "jitter") and mean(4, "hnr_db") < mean(5, "hnr_db") - 10
    assert mean(2, "open_quotient") > mean(5, "open_quotient") + 0.1  # breathy: incomplete closure
    assert mean(3, "diplophonia") > 0.03 and mean(5, "diplophonia") == 0 and mean(3, "breaks_per_s") > 0.5


@pytest.mark.parametrize("arguments", [{"n_train": 5}, {"n_public": -1}])
def test_bad_sizes_are_refused(tmp_path, arguments):
    with pytest.raises(ValueError):
        synth.generate(tmp_path, **{"n_train": 20, "n_public": 0, "n_private": 0, **arguments}, progress=False)
