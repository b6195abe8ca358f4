"""The MAIC recipe: the competition layout and its errors, token cache, sub-classes, masking, voting,
crops, splits, and the whole recipe end to end on a tiny data set."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from replicate import files, maic, pipeline
from replicate.maic import task as maic_task
from replicate.maic import tokens as maic_tokens
from replicate.task import DataError
from tests.conftest import ROOT

TOKENS = [(0, 10), (12, 40), (45, 120)]  # (start, end) columns, end exclusive


def write_person(
    folder: Path,
    person_id: str,
    *,
    sex="M",
    age=60.0,
    diagnosis="Normal",
    frames=130,
    tokens=TOKENS,
    skip=(),
    single_json=False,
    seed=0,
):
    """A handmade person: a random (128, frames) CSV and its metadata + annotation JSON(s)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(seed).uniform(-80, 0, size=(128, frames))
    np.savetxt(folder / f"{person_id}.csv", values, fmt="%.2f", delimiter=",")
    metadata = {"wav_code": person_id, "source_type": "test", "age": age, "sex": sex}
    if diagnosis is not None:
        metadata["diagnosis"] = diagnosis
    annotation = {
        "tokens": [
            {
                "token_no": number,
                "token_skip": "skip" if number in skip else "normal",
                "token_pronounce": "normal",
                "startFrame": start,
                "endFrame": end,
            }
            for number, (start, end) in enumerate(tokens, start=1)
        ]
    }
    if single_json:
        (folder / f"{person_id}.json").write_text(json.dumps({**metadata, **annotation}))
    else:
        (folder / f"{person_id}.json").write_text(json.dumps(metadata))
        (folder / f"{person_id}_annotation.json").write_text(json.dumps(annotation))


def _store(persons, tmp_path, name="t", end_frame_inclusive=False, log=print):
    data = {"mel_bins": 128, "drop_skipped": True, "end_frame_inclusive": end_frame_inclusive}
    return maic.token_store(persons, data, cache_dir=tmp_path / "cache", name=name, progress=False, log=log)


# --- loader --------------------------------------------------------------------------------------


def test_one_or_two_json_files_per_person(tmp_path):
    write_person(tmp_path / "train", "a", skip=(2,))
    write_person(tmp_path / "train", "b", sex="F", age=40.5, diagnosis="Nodules", single_json=True)
    data = maic.load_data(tmp_path)
    assert [p.person_id for p in data.train] == ["a", "b"] and data.test == [] and data.test_answers is None
    a, b = data.train
    assert (a.sex, a.age, a.diagnosis, len(a.json_paths)) == ("M", 60.0, "Normal", 2)
    assert (b.sex, b.age, b.diagnosis, len(b.json_paths)) == ("F", 40.5, "Nodules", 1)
    assert [(t.start, t.end, t.skip) for t in a.tokens] == [(0, 10, False), (12, 40, True), (45, 120, False)]
    assert a.annotation == tmp_path / "train" / "a_annotation.json" and b.annotation == tmp_path / "train" / "b.json"


def test_skipped_tokens_are_dropped_and_counted(tmp_path):
    write_person(tmp_path / "train", "a", skip=(2,))
    store = _store(maic.load_data(tmp_path).train, tmp_path)
    assert store.lengths.tolist() == [10, 75] and store.token_no.tolist() == [1, 3]
    assert store.counts["tokens_skipped"] == 1 and store.counts["tokens_kept"] == 2
    mel = np.loadtxt(tmp_path / "train" / "a.csv", delimiter=",")
    # The CSV's decimal text read as float32 (the store, through pandas' float64 parser) and as float64: at most
    # one float32 rounding (2⁻²⁴ relative) plus a double rounding's last float32 bit apart: 2⁻²³ relative.
    frames = store.frames[store.offsets[1] : store.offsets[1] + 75].T
    np.testing.assert_allclose(frames, mel[:, 45:120], rtol=np.finfo(np.float32).eps, atol=0)


def test_the_end_frame_reading_cuts_the_tokens_and_keys_the_cache(tmp_path):
    write_person(tmp_path / "train", "a", tokens=[(0, 10), (12, 12), (45, 129)])
    persons = maic.load_data(tmp_path).train
    inclusive = _store(persons, tmp_path, end_frame_inclusive=True)
    assert inclusive.lengths.tolist() == [11, 1, 85]  # endFrame is the last column: 130 columns reach 129
    with pytest.raises(DataError, match=r"a_annotation.json: token 2 has no frames \(12..12 with data.end_frame_incl"):
        _store(persons, tmp_path)  # one past the last column: token 2 is empty (not the inclusive store's cache)
    write_person(tmp_path / "train", "a", tokens=[(0, 10), (45, 131)])
    with pytest.raises(DataError, match=r"a.csv: token 2 spans frames 45..130 but the CSV has 130 columns"):
        _store(maic.load_data(tmp_path).train, tmp_path)
    write_person(tmp_path / "train", "a", tokens=[(0, 10), (45, 44)])
    with pytest.raises(DataError, match=r"a_annotation.json: token 2: frames 45..44 are negative or reversed"):
        maic.load_data(tmp_path)


def test_the_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    write_person(tmp_path / "train", "a")
    persons = maic.load_data(tmp_path).train
    first = _store(persons, tmp_path)
    monkeypatch.setattr(
        maic_tokens, "read_mel_csv", lambda *a: (_ for _ in ()).throw(AssertionError("CSV parsed again"))
    )
    second = _store(persons, tmp_path)
    np.testing.assert_array_equal(np.asarray(first.frames), np.asarray(second.frames))
    write_person(tmp_path / "train", "a", seed=1)  # the file changed: parsed anew
    with pytest.raises(AssertionError, match="CSV parsed again"):
        _store(maic.load_data(tmp_path).train, tmp_path)


@pytest.mark.parametrize("damaged", ["frames.npy", "index.npz", "meta.json"])
def test_a_damaged_token_cache_is_detected_and_parsed_again(tmp_path, damaged):
    write_person(tmp_path / "train", "a")
    persons = maic.load_data(tmp_path).train
    first = _store(persons, tmp_path)
    expected = np.array(first.frames)
    (cache,) = (tmp_path / "cache").glob("t-*")
    content = (cache / damaged).read_bytes()
    middle = len(content) // 2
    (cache / damaged).write_bytes(content[:middle] + bytes(16) + content[middle + 16 :])  # same size, other bytes
    logged = []
    again = _store(persons, tmp_path, log=logged.append)
    problem = (
        "meta.json is not valid JSON"
        if damaged == "meta.json"
        else f"bytes 0..{len(content) - 1} of {damaged} differ from their checksum"
    )
    assert logged == [f"token cache {cache} is damaged ({problem}); computing it again"]
    np.testing.assert_array_equal(np.asarray(again.frames), expected)
    assert again.checksums == first.checksums and again.offsets.tolist() == first.offsets.tolist()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: _drop_field(d / "a.json", "age"), r"missing field\(s\) age for person a"),
        (lambda d: _drop_field(d / "a.json", "diagnosis"), r"missing field\(s\) diagnosis for person a"),
        (lambda d: _set_field(d / "a.json", "sex", "X"), r"a.json: sex must be 'M' or 'F', got 'X'"),
        (lambda d: _set_field(d / "a.json", "diagnosis", "Flu"), r"a.json: diagnosis 'Flu' is not one of"),
        (lambda d: _set_field(d / "a.json", "age", "old"), r"a.json: age must be a number"),
        (lambda d: (d / "a_annotation.json").unlink(), r"no token annotation .* for person a"),
        (lambda d: _token_field(d, "endFrame", None), r"a_annotation.json: token 1: missing field\(s\) endFrame"),
        (lambda d: _token_field(d, "token_skip", "maybe"), r"token 1: token_skip must be 'normal' or 'skip'"),
        (lambda d: (d / "a.json").unlink(), r"a_annotation.json: missing field\(s\) sex, age, diagnosis for person a"),
        (lambda d: [p.unlink() for p in d.glob("*.json")], r"a.csv: no JSON for this person"),
        (lambda d: (d / "zz.json").write_text("{}"), r"1 JSON files belong to no <id>.csv: zz.json"),
        (lambda d: (d / "a.json").write_text("{not json"), r"a.json: not valid JSON"),
    ],
)
def test_json_errors_name_the_file_and_field(tmp_path, breakage, message):
    write_person(tmp_path / "train", "a")
    breakage(tmp_path / "train")
    with pytest.raises(DataError, match=message):
        maic.load_data(tmp_path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: _rewrite_csv(p, rows=127), r"a.csv: 127 rows, expected 128"),
        (lambda p: _rewrite_csv(p, cell="abc"), r"a.csv: non-numeric cell 'abc' at row 3, column 5"),
        (lambda p: _rewrite_csv(p, cell="inf"), r"a.csv: 1 empty or non-finite cells, the first at row 3, column 5"),
        (lambda p: _rewrite_csv(p, cell=""), r"a.csv: 1 empty or non-finite cells, the first at row 3, column 5"),
        (lambda p: _rewrite_csv(p, frames=100), r"a.csv: token 3 spans frames 45..119 but the CSV has 100 columns"),
    ],
)
def test_csv_errors_name_the_file_and_cell(tmp_path, breakage, message):
    write_person(tmp_path / "train", "a")
    breakage(tmp_path / "train" / "a.csv")
    with pytest.raises(DataError, match=message):
        _store(maic.load_data(tmp_path).train, tmp_path)


def _link_loop(folder):
    (folder / "b.csv").symlink_to("b.csv")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_link_loop, r"train: b.csv not a readable file \(a folder, a broken link or a link loop\)$"),
        (lambda d: (d / "a_notes.json").mkdir(), r"train: a_notes.json not a readable file"),
    ],
)
def test_a_file_that_is_no_file_is_one_line_on_stderr(tmp_path, capsys, breakage, message):
    write_person(tmp_path / "train", "a")
    breakage(tmp_path / "train")
    arguments = ["--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert maic.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error.strip())


def test_an_unreadable_json_is_a_data_error(tmp_path, monkeypatch):
    write_person(tmp_path / "train", "a")
    path = tmp_path / "train" / "a.json"

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: cannot read the file \(Permission denied\)"):
        maic.read_person(tmp_path / "train" / "a.csv", [path], labelled=True)


def test_test_answers_with_two_rows_for_a_person_name_the_lines(tmp_path):
    write_person(tmp_path / "train", "a")
    write_person(tmp_path / "test", "t1", diagnosis=None)
    write_person(tmp_path / "test", "t2", diagnosis=None)
    (tmp_path / "test_answer.csv").write_text("wav_code,diagnosis\nt1,Normal\nt2,Cancer\nt1,Nodules\n")
    with pytest.raises(
        DataError, match=r"test_answer.csv: more than one answer for t1 on lines 2, 4 \(Normal, Nodules\)"
    ):
        maic.load_data(tmp_path)
    (tmp_path / "test_answer.csv").write_text("wav_code,diagnosis\nt1,Normal\nt2,Cancer\nt1,Normal\n")
    with pytest.raises(DataError, match=r"more than one answer for t1 on lines 2, 4 \(Normal, Normal\)"):
        maic.load_data(tmp_path)
    (tmp_path / "test_answer.csv").write_text("wav_code,diagnosis\nt1,Normal\nt2,Cancer\n")
    assert maic.load_data(tmp_path).test_answers == {"t1": "Normal", "t2": "Cancer"}


def test_constant_training_tokens_are_a_data_error(tmp_path):
    write_person(tmp_path / "train", "a")
    np.savetxt(tmp_path / "train" / "a.csv", np.full((128, 130), -80.0), fmt="%.2f", delimiter=",")
    store = _store(maic.load_data(tmp_path).train, tmp_path)
    with pytest.raises(DataError, match=r"every mel value of the training tokens is the same"):
        maic.fit_normalization(store, np.arange(len(store)), "zscore")
    with pytest.raises(DataError, match=r"no training tokens"):
        maic.fit_normalization(store, np.arange(0), "zscore")


def test_non_finite_token_predictions_name_the_seed(tmp_path):
    import keras

    from replicate.ensemble import Ensemble, PredictionError

    write_person(tmp_path / "train", "a")
    persons = maic.load_data(tmp_path).train
    store = _store(persons, tmp_path)
    mel, aux = keras.Input((128, 8, 1), name="mel"), keras.Input((2,), name="aux")
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model({"mel": mel, "aux": aux}, dense(keras.layers.Concatenate()([keras.layers.Flatten()(mel), aux])))
    manifest = {
        "schema_version": 1,
        "preprocessing": {
            "inputs": maic.Inputs(8, 0.0, 1.0, 100.0).to_config(),
            "inference": {"crop_seed": 0, "batch_size": 4},
        },
        "members": [{"seed": 5}, {"seed": 6}],
    }
    rows = np.arange(len(store))
    healthy = Ensemble(tmp_path / "run", manifest, [model, model])
    assert np.isfinite(maic_task.token_predictions(healthy, store, persons, rows)).all()
    poisoned = keras.models.clone_model(model)
    poisoned.set_weights([np.full_like(weight, np.nan) for weight in model.get_weights()])
    with pytest.raises(PredictionError, match=r"run: the member\(s\) of seed\(s\) 6 predict NaN"):
        maic_task.token_predictions(Ensemble(tmp_path / "run", manifest, [model, poisoned]), store, persons, rows)


def test_runs_from_before_the_manifest_schema_keep_their_inference_settings():
    """A run made before the schema kept the inputs and sub-classes at the top of its manifest and the recipe's
    data and inference tables under "recipe"; inference reads them from there."""
    inputs, subclasses = maic.Inputs(64, -52.7, 16.6, 100.0).to_config(), {"entries": [], "age_threshold": 55.0}
    data, inference = {"mel_bins": 128, "end_frame_inclusive": False, "drop_skipped": True}, {"crop_seed": 0}
    old = {"inputs": inputs, "subclasses": subclasses, "recipe": {"data": data, "inference": inference}}
    settings = maic_task.inference_settings(old)
    assert (settings["inputs"], settings["subclasses"], settings["data"], settings["inference"]) == (
        inputs,
        subclasses,
        data,
        inference,
    )
    new = {"schema_version": 1, "preprocessing": {"inputs": inputs}}
    assert maic_task.inference_settings(new) == {"inputs": inputs}


def _drop_field(path, key):
    content = json.loads(path.read_text())
    del content[key]
    path.write_text(json.dumps(content))


def _set_field(path, key, value):
    content = json.loads(path.read_text())
    content[key] = value
    path.write_text(json.dumps(content))


def _token_field(folder, key, value):
    path = folder / "a_annotation.json"
    content = json.loads(path.read_text())
    if value is None:
        del content["tokens"][0][key]
    else:
        content["tokens"][0][key] = value
    path.write_text(json.dumps(content))


def _rewrite_csv(path, rows=128, frames=130, cell=None):
    lines = path.read_text().splitlines()[:rows]
    lines = [",".join(line.split(",")[:frames]) for line in lines]
    if cell is not None:
        row = lines[2].split(",")
        row[4] = cell
        lines[2] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")


# --- sub-classes, masking and voting -------------------------------------------------------------


def _person(diagnosis, sex, age, identifier="p"):
    return maic.Person(identifier, Path(f"{identifier}.csv"), [], sex, age, diagnosis)


def test_sub_classes_are_derived_from_the_data_and_masked_by_group():
    persons = [
        _person("Normal", "M", 70),
        _person("Cancer", "M", 60),
        _person("Normal", "M", 30),
        _person("Normal", "F", 54.9),
        _person("Nodules", "F", 30),
        _person("Cancer", "M", 61),  # same combination again: no new sub-class
    ]
    table = maic.SubclassTable.from_persons(persons)
    assert table.entries == (
        ("Normal", "M", "55+"),
        ("Cancer", "M", "55+"),
        ("Normal", "M", "<55"),
        ("Normal", "F", "<55"),
        ("Nodules", "F", "<55"),
    )
    assert table.labels == ["L1", "L2", "L3", "L4", "L5"] and table.diagnosis_index.tolist() == [0, 1, 0, 0, 3]
    assert [table.subclass_of(p) for p in persons] == [0, 1, 2, 3, 4, 1]
    assert table.mask("M", 55.0).tolist() == [True, True, False, False, False]  # 55 is "55 and over"
    assert table.mask("F", 20.0).tolist() == [False, False, False, True, True]
    assert table.mask("F", 80.0).all()  # no sub-class of women 55+ in the data: nothing masked
    assert maic.SubclassTable.from_config(table.to_config()) == table
    with pytest.raises(ValueError, match="not a sub-class"):
        table.subclass_of(_person("Paralysis", "F", 30))
    plain = maic.SubclassTable.from_persons(persons, subdivide=False)
    assert [entry[0] for entry in plain.entries] == ["Normal", "Cancer", "Nodules"] and plain.mask("F", 80).all()


def test_masking_changes_the_vote():
    table = maic.SubclassTable((("Normal", "M", "55+"), ("Cancer", "M", "55+"), ("Nodules", "F", "<55")))
    woman = _person(None, "F", 30)
    # Two tokens prefer Cancer (impossible for a young woman), one prefers Nodules.
    probabilities = np.array([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    person = np.zeros(3, dtype=int)
    unmasked, _ = maic.person_predictions(probabilities, person, [woman], table, masking=False)
    masked, person_probabilities = maic.person_predictions(probabilities, person, [woman], table, masking=True)
    assert maic.DIAGNOSES[unmasked[0]] == "Cancer" and maic.DIAGNOSES[masked[0]] == "Nodules"
    np.testing.assert_allclose(person_probabilities[0, maic.DIAGNOSES.index("Nodules")], 1.0)


def test_votes_and_the_tie_rule():
    # Diagnosis probabilities of four tokens: two vote Normal (0), two vote Cancer (1) → a tie.
    tokens = np.zeros((4, 6))
    tokens[0, [0, 1]] = [0.55, 0.45]
    tokens[1, [0, 1]] = [0.55, 0.45]
    tokens[2, [0, 1]] = [0.05, 0.95]
    tokens[3, [0, 1]] = [0.40, 0.60]
    winner, votes = maic.vote(tokens, "probability")
    assert votes.tolist() == [2, 2, 0, 0, 0, 0]
    assert winner == 1  # Cancer: summed probability 2.45 against 1.55
    assert maic.vote(tokens, "first")[0] == 0  # the first tied diagnosis in DIAGNOSES order
    assert maic.vote(tokens[:3], "probability")[0] == 0  # a clear majority needs no tie rule
    with pytest.raises(ValueError, match="tie_rule"):
        maic.vote(tokens, "coin")


# --- crops, splits -------------------------------------------------------------------------------


@pytest.fixture
def long_tokens(tmp_path):
    write_person(tmp_path / "train", "a", frames=400, tokens=[(0, 300), (300, 330), (330, 400)])
    persons = maic.load_data(tmp_path).train
    store = _store(persons, tmp_path)
    inputs = maic.Inputs(frames=64, mean=0.0, std=1.0, age_scale=100.0)
    return store, persons, inputs


def _mel(dataset):
    return np.concatenate([batch["mel"] for batch, _ in dataset])


def test_training_crops_differ_across_epochs_and_repeat_for_the_seed(long_tokens):
    store, persons, inputs = long_tokens
    labels = np.eye(2, dtype=np.float32)[np.zeros(len(store), dtype=int)]

    def epochs(seed):
        return [
            _mel(pipeline.from_columns(inputs.columns(store, persons), labels, batch_size=3, seed=seed, epoch=epoch))
            for epoch in (0, 1)
        ]

    first, second = epochs(5)
    assert first.shape == (3, 128, 64, 1)
    assert not np.array_equal(first[0], second[0])  # the 300-frame token: a new crop each epoch
    np.testing.assert_array_equal(first[1, :, 30:], 0.0)  # the 30-frame token: zero-padded at the end
    np.testing.assert_array_equal(first[1, :, :30, 0], store.frames[store.offsets[1] : store.offsets[1] + 30].T)
    again = epochs(5)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    crop = first[0, :, :, 0]  # the crop is a contiguous 64-frame window of the token
    token = np.asarray(store.frames[:300]).T
    assert any(np.array_equal(token[:, start : start + 64], crop) for start in range(300 - 64 + 1))


def test_inference_crops_are_identical_for_the_seed(long_tokens):
    store, persons, inputs = long_tokens
    starts = maic.crop_offsets(store.lengths, 64, seed=0)
    assert starts[1] == 0 and 0 <= starts[0] <= 300 - 64 and 0 <= starts[2] <= 70 - 64
    assert np.array_equal(starts, maic.crop_offsets(store.lengths, 64, seed=0))
    assert not np.array_equal(maic.crop_offsets(np.full(50, 300), 64, 0), maic.crop_offsets(np.full(50, 300), 64, 1))

    def batches(batch_size):
        dataset = pipeline.from_columns(inputs.columns(store, persons, crop_seed=0), batch_size=batch_size)
        return [np.concatenate([batch["mel"] for batch in dataset]) for _ in range(2)]

    one, two = batches(1)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(batches(3)[0], one)  # whatever the batching
    np.testing.assert_array_equal(one[0, :, :, 0], store.frames[starts[0] : starts[0] + 64].T)  # crop_offsets' start


def test_token_inputs_are_normalised_then_zero_padded_with_their_persons_aux(long_tokens):
    store, persons, _ = long_tokens
    inputs = maic.Inputs(frames=64, mean=-40.0, std=8.0, age_scale=100.0)
    [batch] = pipeline.from_columns(inputs.columns(store, persons, crop_seed=0), batch_size=3)
    token = np.asarray(store.frames[store.offsets[1] : store.offsets[1] + 30], dtype=np.float32)
    np.testing.assert_array_equal(batch["mel"][1, :, :30, 0], ((token - np.float32(-40.0)) / np.float32(8.0)).T)
    np.testing.assert_array_equal(batch["mel"][1, :, 30:], 0.0)  # the padding stays 0 (the mean level)
    np.testing.assert_array_equal(batch["aux"], np.tile(np.float32([1.0, 0.6]), (3, 1)))  # a man of 60


def test_person_split_has_no_person_on_both_sides(tmp_path):
    diagnoses = ["Normal"] * 10 + ["Cancer"] * 4 + ["Paralysis"] * 6
    for index, diagnosis in enumerate(diagnoses):
        write_person(tmp_path / "train", f"p{index:02d}", diagnosis=diagnosis, frames=130, seed=index)
    persons = maic.load_data(tmp_path).train
    store = _store(persons, tmp_path)
    recipe = maic.load_recipe(overrides=["split.by=person", "split.validation_fraction=0.2"])
    train_rows, validation_rows = maic.split_rows(store, persons, recipe)
    train_persons, validation_persons = set(store.person[train_rows]), set(store.person[validation_rows])
    assert train_persons.isdisjoint(validation_persons) and train_persons | validation_persons == set(range(20))
    assert {persons[p].diagnosis for p in validation_persons} == {"Normal", "Cancer", "Paralysis"}
    token_recipe = maic.load_recipe()
    train_rows, validation_rows = maic.split_rows(store, persons, token_recipe)
    assert len(validation_rows) == round(0.05 * len(store)) and not set(train_rows) & set(validation_rows)


def test_recipe_rules():
    from replicate.recipe import RecipeError

    assert maic.load_recipe()["train"]["loss_options"] == {"alpha": 0.25, "gamma": 2.0}
    with pytest.raises(RecipeError, match="split.by"):
        maic.load_recipe(overrides=["split.by=speaker"])
    with pytest.raises(RecipeError, match="stage_strides"):
        maic.load_recipe(overrides=["model.stage_strides=[1]"])


def test_the_recipe_builds_the_diagram_and_batch_norm_is_an_option():
    import keras

    def batch_norms(model):
        return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)

    diagram = maic.build_model(maic.load_recipe(), 21)
    assert diagram.count_params() == 3_530_005 and batch_norms(diagram) == 0  # as in test_models_maic
    assert diagram.get_layer("stage2_block2_out").output.shape == (None, 64, 16, 256)
    normalised = maic.build_model(maic.load_recipe(overrides=["model.batch_norm=true"]), 21)
    assert batch_norms(normalised) == 11  # stem, 8 block convolutions, 2 projections


def _focal_loss(overrides=()):
    """The loss object the recipe compiles its model with."""
    import keras

    from replicate import train

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(21, activation="softmax")])
    return train.compile_model(model, maic.load_recipe(overrides=overrides)["train"]).loss


def test_focal_alpha_one_is_the_figures_loss_four_times_the_default():
    """Keras multiplies each class's term by α after the focal factor: going from α = 0.25 to 1 multiplies
    every product, every sum and the batch mean by 4, a power of two, which floating point does exactly (no
    term here is anywhere near float32's subnormal range), so the two losses compare bit for bit."""
    default, figure = _focal_loss(), _focal_loss(["train.loss_options.alpha=1.0"])
    assert (default.alpha, default.gamma, figure.alpha, figure.gamma) == (0.25, 2.0, 1.0, 2.0)
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(16, 21))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    targets = np.eye(21, dtype=np.float32)[rng.integers(0, 21, 16)]
    scaled, unscaled = np.float32(default(targets, probabilities)), np.float32(figure(targets, probabilities))
    assert unscaled > 0 and unscaled == 4 * scaled


def test_the_loss_scale_note():
    recipe = maic.load_recipe()
    note = maic.loss_scale_note(recipe["train"], recipe["source"])
    assert "alpha=0.25, gamma=2" in note and "4× smaller" in note and "0.5732" in note
    figure = maic.load_recipe(overrides=["train.loss_options.alpha=1.0"])
    assert "on the figure's scale" in maic.loss_scale_note(figure["train"], figure["source"])
    cross_entropy = maic.load_recipe(overrides=["train.loss=CategoricalCrossentropy"])
    assert maic.loss_scale_note(cross_entropy["train"], cross_entropy["source"]) == ""


# --- end to end ----------------------------------------------------------------------------------

TINY = [
    "model.resized_mel_bins=128",
    "model.stem_filters=4",
    "model.stage_filters=[4, 8]",
    "model.dense_units=[8, 8]",
    "split.validation_fraction=0.2",
    "split.by=person",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from replicate.synth import maic as synth

    out = tmp_path_factory.mktemp("maic-data")
    synth.generate(out, n_train=14, n_test=6, seed=2, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_run(synthetic, tmp_path_factory):
    """One member, two epochs, the tiny network, a person split: (run folder, arguments, stdout)."""
    folder = tmp_path_factory.mktemp("maic-run")
    arguments = ["--data", str(synthetic), "--run-dir", str(folder / "run"), "--seeds", "1", "--epochs", "2"]
    arguments += ["--no-progress", "--set", f"run.cache_dir='{folder / 'cache'}'"]
    arguments += [argument for setting in TINY for argument in ("--set", setting)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert maic.main(arguments) == 0
    return folder / "run", arguments, stdout.getvalue()


def test_recipe_end_to_end_and_resume(tiny_run, synthetic, tmp_path, capsys):
    run_dir, arguments, stdout = tiny_run
    scores = files.read_json(run_dir / "scores.json")
    f1 = scores["evaluations"]["test (synthetic answers)"]["ensemble_macro_f1_by_size"]
    assert stdout.splitlines()[-1] == (
        f"done: test persons macro F1 {f1['1']:.4f} (1-member ensemble; source: single model 0.5759 on the real "
        f"hidden test set) — report {run_dir / 'report.md'}, submission {run_dir / 'submission.csv'}"
    )
    submission = (run_dir / "submission.csv").read_text().splitlines()
    assert submission[0] == "wav_code,diagnosis," + ",".join(f"p_{name}" for name in maic.DIAGNOSES)
    assert len(submission) == 7
    test = scores["evaluations"]["test (synthetic answers)"]
    assert test["persons"] == 6 and len(test["member_macro_f1"]) == 1 and 0 <= test["majority_macro_f1"] < 0.2
    assert set(scores["evaluations"]) == {"test (synthetic answers)", "validation persons"}
    report = (run_dir / "report.md").read_text()
    for heading in ("## Sub-classes", "## Label masking", "confusion matrix", "0.5759", "0.7346", "4× smaller"):
        assert heading in report
    for plot in ("confusion_test.png", "val_macro_f1.png", "ensemble_size_test.png", "training_curves.png"):
        assert (run_dir / plot).is_file()
    manifest = files.read_json(run_dir / "manifest.json")
    assert manifest["schema_version"] == 1 and manifest["inputs"] == {"mel": [128, 64, 1], "aux": [2]}
    assert manifest["data"]["unit"] == "tokens" and manifest["data"]["splits"]["test"] == 101
    assert set(manifest["preprocessing"]) == {"inputs", "subclasses", "diagnoses", "inference", "data"}
    assert manifest["members"][0]["best_epoch"] in (1, 2)
    history = (run_dir / "members" / "seed-00.history.csv").read_text()
    assert "val_macro_f1" in history.splitlines()[0]
    from replicate.ensemble import Ensemble

    with pytest.raises(NotImplementedError, match="the maic task predicts from train/ and test/ with <id>.csv"):
        Ensemble.load(run_dir).features([synthetic / "test" / "test_0000.csv"])
    # Again: the member is kept, the tokens come from the cache.
    assert maic.main(arguments) == 0
    assert "already trained, kept" in capsys.readouterr().out
    from replicate import report as report_lib
    from replicate import tasks

    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:maic -->\n<!-- /results:maic -->\n")
    name, block = tasks.results_block(run_dir)
    assert name == "maic" and report_lib.update_readme(readme, name, block)
    assert "ours: majority class (Normal)" in readme.read_text() and "1 members, at most 2 epochs" in block


def test_the_predict_command_diagnoses_persons_and_names_a_bad_file_in_one_line(tiny_run, synthetic, tmp_path):
    run_dir, _, _ = tiny_run
    out = tmp_path / "diagnoses.csv"
    predict = [sys.executable, "-m", "replicate.predict", str(run_dir)]
    result = subprocess.run(
        [*predict, str(synthetic / "test"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"predictions: {out} (6 rows, 1 members)\n"
    table = pd.read_csv(out, dtype=str)
    written = pd.read_csv(run_dir / "submission.csv", dtype=str)
    assert (
        table.columns.tolist() == written.columns.tolist()
        and table["wav_code"].tolist() == written["wav_code"].tolist()
    )
    assert table["diagnosis"].tolist() == written["diagnosis"].tolist()
    # The same members on the same tokens in the same batches: the run's own token probabilities, voted as the
    # run voted, written with the same 8 decimals.
    saved = np.load(run_dir / "test_predictions.npz")
    preprocessing = files.read_json(run_dir / "manifest.json")["preprocessing"]
    _, probabilities = maic.person_predictions(
        saved["probabilities"].mean(axis=0),
        saved["person"],
        maic.load_data(synthetic).test,
        maic.SubclassTable.from_config(preprocessing["subclasses"]),
        masking=preprocessing["inference"]["label_masking"],
        tie_rule=preprocessing["inference"]["tie_rule"],
    )
    assert table.iloc[:, 2:].to_numpy().tolist() == [[f"{value:.8f}" for value in row] for row in probabilities]

    write_person(tmp_path / "persons", "x", diagnosis=None)
    _rewrite_csv(tmp_path / "persons" / "x.csv", rows=100)
    for bad in (tmp_path / "persons", synthetic / "test" / "test_0000.csv"):
        result = subprocess.run(
            [*predict, str(bad), "--out", str(tmp_path / "none.csv")], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr[-3000:]
        assert errors[0] == (
            f"error: {tmp_path / 'persons' / 'x.csv'}: 100 rows, expected 128 (one per mel band)"
            if bad.is_dir()
            else f"error: {bad}: no such folder (expected a folder of <id>.csv + <id>.json per person)"
        )
    assert not (tmp_path / "none.csv").exists()


def test_predicting_the_same_person_from_two_folders_is_refused(tiny_run, synthetic, tmp_path):
    from replicate.ensemble import Ensemble

    run_dir, _, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (synthetic / "test").glob("test_0000*"):
        (copy / path.name).write_bytes(path.read_bytes())
    folders = [str(synthetic / "test"), str(copy)]
    with pytest.raises(DataError, match=re.escape(f"{', '.join(folders)}: the folders share the persons test_0000")):
        Ensemble.load(run_dir).predict_table(folders)


def test_a_bad_data_folder_is_one_line_on_stderr(tmp_path, capsys):
    write_person(tmp_path / "train", "a")
    _rewrite_csv(tmp_path / "train" / "a.csv", rows=100)
    arguments = ["--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert maic.main([*arguments, "--set", f"run.cache_dir='{tmp_path / 'cache'}'"]) == 2
    assert capsys.readouterr().err.strip().endswith("a.csv: 100 rows, expected 128 (one per mel band)")
