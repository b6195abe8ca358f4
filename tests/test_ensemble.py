"""Ensembles of members with several named inputs and a dict of outputs, loaded in a fresh process."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from replicate import files, runner
from replicate.ensemble import Ensemble, PredictionError
from tests.conftest import run_python

ROWS = 5


def _two_input_member(seed: int, aux_width: int = 2) -> keras.Model:
    """A member of inputs "mel" (4, 3, 1) and "aux", outputs {"probabilities", "embedding"} (as DCASE's)."""
    keras.utils.set_random_seed(seed)
    mel, aux = keras.Input((4, 3, 1), name="mel"), keras.Input((aux_width,), name="aux")
    joined = keras.layers.Concatenate(name="joined")([keras.layers.Flatten(name="flat")(mel), aux])
    embedding = keras.layers.Dense(6, name="embedding")(joined)
    probabilities = keras.layers.Dense(3, activation="softmax", name="probabilities")(embedding)
    return keras.Model([mel, aux], {"probabilities": probabilities, "embedding": embedding}, name=f"member{seed}")


def _run_folder(tmp_path, members) -> tuple:
    """A run folder of saved members (records left out: files are checked against records where they exist)."""
    entries = []
    for seed, member in enumerate(members):
        member.save(tmp_path / f"members/seed-{seed:02d}.keras")
        entries.append({"seed": seed, "file": f"members/seed-{seed:02d}.keras", "group": ""})
    files.write_json(tmp_path / "manifest.json", {"task": "dacon", "class_names": ["a", "b", "c"], "members": entries})
    rng = np.random.default_rng(0)
    inputs = {"mel": rng.random((ROWS, 4, 3, 1), dtype=np.float32), "aux": rng.random((ROWS, 2), dtype=np.float32)}
    return tmp_path, inputs


def test_members_get_the_inputs_they_name_and_the_output_asked_for(tmp_path):
    (tmp_path / "members").mkdir()
    run_dir, inputs = _run_folder(tmp_path, [_two_input_member(0), _two_input_member(1)])
    ensemble = Ensemble.load(run_dir)
    expected = [member.predict(inputs, verbose=0) for member in ensemble.members]
    probabilities = ensemble.predict_members({**inputs, "unused": np.zeros(ROWS)}, output="probabilities")
    assert probabilities.shape == (2, ROWS, 3)
    for member, outputs in zip(probabilities, expected, strict=True):
        np.testing.assert_array_equal(member, outputs["probabilities"])
    embeddings = ensemble.predict(inputs, output="embedding")  # the members' mean, as every source averaged
    np.testing.assert_array_equal(embeddings, np.mean([outputs["embedding"] for outputs in expected], axis=0))
    with pytest.raises(ValueError, match=r"the members return the outputs \['embedding', 'probabilities'\]: choose"):
        ensemble.predict_members(inputs)
    with pytest.raises(ValueError, match=r"takes inputs \['mel', 'aux'\]; not given: \['aux'\]"):
        ensemble.predict_members({"mel": inputs["mel"]}, output="probabilities")


def test_a_member_with_one_input_of_a_dict_gets_that_array(tmp_path):
    (tmp_path / "members").mkdir()
    mel = keras.Input((4, 3, 1), name="mel")
    only_mel = keras.Model(mel, keras.layers.Dense(3, name="out")(keras.layers.Flatten()(mel)))
    run_dir, inputs = _run_folder(tmp_path, [only_mel])
    ensemble = Ensemble.load(run_dir)
    np.testing.assert_array_equal(ensemble.predict(inputs), only_mel.predict(inputs["mel"], verbose=0))
    with pytest.raises(ValueError, match=r"output='embedding' names an output, but the members have a single one"):
        ensemble.predict(inputs, output="embedding")


def test_a_two_input_dict_output_ensemble_predicts_in_a_fresh_process(tmp_path):
    (tmp_path / "members").mkdir()
    run_dir, inputs = _run_folder(tmp_path, [_two_input_member(0), _two_input_member(1)])
    np.savez(tmp_path / "inputs.npz", **inputs)
    expected = Ensemble.load(run_dir).predict(inputs, output="probabilities")
    run_python(
        "import numpy as np\n"
        "from replicate.ensemble import Ensemble\n"
        f"inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))\n"
        f"ensemble = Ensemble.load({str(run_dir)!r})\n"
        f"np.save({str(tmp_path / 'fresh.npy')!r}, ensemble.predict(inputs, output='probabilities'))\n"
    )
    np.testing.assert_array_equal(np.load(tmp_path / "fresh.npy"), expected)


def test_a_member_predicting_nan_is_named_and_a_folder_without_manifest_is_one_line(tmp_path):
    (tmp_path / "members").mkdir()
    poisoned = _two_input_member(1)
    poisoned.get_layer("embedding").kernel.assign(np.full((14, 6), np.nan, dtype=np.float32))
    run_dir, inputs = _run_folder(tmp_path, [_two_input_member(0), poisoned])
    with pytest.raises(PredictionError, match=r"the member\(s\) of seed\(s\) 1 predict NaN"):
        Ensemble.load(run_dir).predict(inputs, output="probabilities")
    with pytest.raises(runner.RunFolderError, match=r"nowhere/manifest.json: no manifest; is .* a finished run"):
        Ensemble.load(tmp_path / "nowhere")


def test_the_first_n_members_of_each_group_load_and_a_group_is_an_ensemble_of_its_own(tmp_path):
    (tmp_path / "members").mkdir()
    run_dir, inputs = _run_folder(tmp_path, [_two_input_member(seed) for seed in range(4)])
    manifest = files.read_json(run_dir / "manifest.json")
    for entry, group in zip(manifest["members"], ["a", "a", "b", "b"], strict=True):
        entry["group"] = group  # two groups of two seeds, e.g. two AI CUP variants
    files.write_json(run_dir / "manifest.json", manifest)
    assert Ensemble.load(run_dir).seeds == [0, 1, 2, 3]
    ensemble = Ensemble.load(run_dir, 1)  # `predict --members 1`: one member of each group, not of the first
    assert [(entry["group"], entry["seed"]) for entry in ensemble.manifest["members"]] == [("a", 0), ("b", 2)]
    group = ensemble.group("b")
    assert group.seeds == [2] and group.members[0] is ensemble.members[1]
    np.testing.assert_array_equal(
        group.predict(inputs, output="probabilities"), group.members[0].predict(inputs, verbose=0)["probabilities"]
    )
    with pytest.raises(runner.RunFolderError, match=r"no member of the group 'c' is loaded"):
        ensemble.group("c")


def test_the_predict_command_refuses_fewer_than_one_member(tmp_path, capsys):
    from replicate import predict

    with pytest.raises(SystemExit) as exited:
        predict.main([str(tmp_path), "clip.wav", "--members", "0"])
    assert exited.value.code == 2 and "--members 0: must be at least 1" in capsys.readouterr().err


def test_members_and_first_k_ensembles_are_scored_under_the_metrics_name():
    from replicate.ensemble import score_members

    members = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    targets = np.array([0, 1])

    def accuracy(targets, probabilities):
        return float(np.mean(probabilities.argmax(axis=1) == targets))

    # first 2 averaged: [[0.5, 0.5], [0, 1]] → argmax [0, 1]; first 3: [[1/3, 2/3], [1/3, 2/3]] → [1, 1]
    expected = {"member": [1.0, 0.5, 0.0], "ensemble_by_size": {"1": 1.0, "2": 1.0, "3": 0.5}}
    assert score_members(members, targets, accuracy) == expected
    named = score_members(members, targets, accuracy, name="accuracy")
    assert named == {"member_accuracy": expected["member"], "ensemble_accuracy_by_size": expected["ensemble_by_size"]}
