"""The DACON recipe: the competition layout and its errors, and the whole recipe end to end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from replicate import dacon, features, files, runner
from replicate.recipe import RecipeError
from tests.conftest import ROOT, run_python


@pytest.fixture
def data(dacon_data, tmp_path):
    """A private copy of the tiny data set, to break."""
    return shutil.copytree(dacon_data, tmp_path / "data")


def test_layout_is_read_and_files_are_matched_by_id(dacon_data):
    data = dacon.load_data(dacon_data)
    assert len(data.class_names) == 30 and data.class_names[0] == "zero"
    assert len(data.train_paths) == 24 and len(data.test_paths) == 8
    assert all(path.stem == identifier for path, identifier in zip(data.train_paths, data.train_ids, strict=True))
    np.testing.assert_allclose(data.train_targets.sum(axis=1), 1.0, atol=1e-5)
    assert data.test_targets is not None and data.submission_columns[0] == "id"


def test_missing_and_extra_files_list_the_ids(data):
    (data / "train" / "3.wav").unlink()
    (data / "train" / "7.wav").unlink()
    shutil.copy(data / "test" / "0.wav", data / "train" / "999.wav")
    with pytest.raises(dacon.DataError) as error:
        dacon.load_data(data)
    message = str(error.value)
    assert "2 ids of train_answer.csv have no train/<id>.wav: 3, 7" in message
    assert "1 wav files in" in message and "have no row in train_answer.csv: 999" in message


def test_label_rows_are_checked(data):
    answers = pd.read_csv(data / "train_answer.csv", dtype={"id": str})
    answers.loc[2, "five"] += 0.5
    answers = answers.astype({"six": object})
    answers.loc[4, "six"] = "abc"
    answers.to_csv(data / "train_answer.csv", index=False)
    with pytest.raises(
        dacon.DataError, match=r"train_answer.csv: non-numeric, empty or non-finite values in the rows of ids 4"
    ):
        dacon.load_data(data)
    answers.loc[4, "six"] = 0
    answers.to_csv(data / "train_answer.csv", index=False)
    with pytest.raises(dacon.DataError, match=r"rows must sum to 1 .* ids 2(, 4)?$"):
        dacon.load_data(data)


def test_the_answers_must_have_the_templates_columns(data):
    template = pd.read_csv(data / "submission.csv", dtype={"id": str})
    template.rename(columns={"nine": "nein"}).to_csv(data / "submission.csv", index=False)
    with pytest.raises(
        dacon.DataError,
        match=r"train_answer.csv: the columns after 'id' must be submission.csv's 30 classes in its order; "
        r"extra columns nine; missing nein$",
    ):
        dacon.load_data(data)


def test_an_extra_numeric_column_in_the_answers_is_not_a_31st_class(data):
    answers = pd.read_csv(data / "train_answer.csv", dtype={"id": str})
    answers.assign(speaker=0).to_csv(data / "train_answer.csv", index=False)
    with pytest.raises(
        dacon.DataError, match=r"train_answer.csv: .* submission.csv's 30 classes .*; extra columns speaker$"
    ):
        dacon.load_data(data)


@pytest.mark.parametrize("table", ["train_answer.csv", "submission.csv"])
def test_a_table_with_only_its_header_is_an_error(data, table, capsys):
    pd.read_csv(data / table, dtype={"id": str}).iloc[:0].to_csv(data / table, index=False)
    assert dacon.main(["--data", str(data), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {data / table}: no rows (only the header)\n"


def test_missing_table_and_folder(data, tmp_path):
    with pytest.raises(dacon.DataError, match=r"nowhere: data folder not found"):
        dacon.load_data(tmp_path / "nowhere")
    shutil.rmtree(data / "test")
    with pytest.raises(dacon.DataError, match=r"test: folder not found"):
        dacon.load_data(data)
    (data / "train_answer.csv").unlink()
    with pytest.raises(dacon.DataError, match=r"train_answer.csv: file not found"):
        dacon.load_data(data)


def test_a_bad_wav_stops_the_run_naming_the_file(data, tmp_path):
    (data / "train" / "5.wav").write_bytes(b"RIFF....WAVEgarbage")

    sf.write(data / "test" / "2.wav", np.zeros(16000, dtype=np.float32), 8000)
    recipe = dacon.load_recipe("quick", [f"run.cache_dir={str(tmp_path / 'cache')!r}", "run.workers=1"])
    with pytest.raises(features.FeatureCacheError, match=r"1 of 24 audio files cannot be used:\n  .*5\.wav"):
        dacon.run(recipe, data, tmp_path / "run", progress=False, log=lambda _: None)


def test_pad_mode_keys_the_cache_and_travels_to_inference(dacon_data, tmp_path):
    data = dacon.load_data(dacon_data)
    cache = {"cache_dir": tmp_path / "cache", "workers": 1, "progress": False}
    reflect = dacon.load_recipe()
    constant = dacon.load_recipe(overrides=["features.pad_mode='constant'"])
    assert reflect["features"]["pad_mode"] == "reflect"  # the source's (librosa <= 0.8)
    reflect_spec, constant_spec = dacon.feature_spec(reflect), dacon.feature_spec(constant)
    reflected, reflect_meta = reflect_spec.cached(data.test_paths, name="dacon-test", **cache)
    zeros, constant_meta = constant_spec.cached(data.test_paths, name="dacon-test", **cache)
    assert reflect_meta["key"] != constant_meta["key"]
    assert not np.array_equal(reflected[:, :, 0], zeros[:, :, 0])  # the edge frames differ, the middle not
    np.testing.assert_array_equal(reflected[:, :, 50], zeros[:, :, 50])

    normalizer = features.Normalizer.fit([reflected], "global")
    manifest = {  # what the run's manifest says of its features (`runner.MANIFEST_SCHEMA_VERSION` 1)
        "schema_version": 1,
        "features": {"log_mel": reflect_spec.to_manifest()},
        "preprocessing": {"normalization": normalizer.to_config()},
    }
    np.testing.assert_array_equal(dacon.TASK.inference_inputs(manifest, data.test_paths), normalizer(reflected))
    before_the_schema = {  # a run of an earlier version, from before `features.pad_mode`: it padded with zeros
        "recipe": {
            "data": reflect["data"],
            "features": {k: v for k, v in reflect["features"].items() if k != "pad_mode"},
        },
        "normalization": normalizer.to_config(),
    }
    np.testing.assert_array_equal(dacon.TASK.inference_inputs(before_the_schema, data.test_paths), normalizer(zeros))
    with pytest.raises(RecipeError, match=r"features.pad_mode = 'edge': must be one of"):
        dacon.load_recipe(overrides=["features.pad_mode='edge'"])


def _quick(tmp_path) -> list[str]:
    return [
        "--profile",
        "quick",
        "--no-progress",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"run.cache_dir={str(tmp_path / 'cache')!r}",
        "--set",
        "run.workers=1",
    ]


def test_silent_clips_are_one_line_naming_the_split(data, tmp_path, capsys):
    for path in [*(data / "train").glob("*.wav"), *(data / "test").glob("*.wav")]:
        sf.write(path, np.zeros(16000, dtype=np.int16), 16000, subtype="PCM_16")
    assert dacon.main(["--data", str(data), *_quick(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {data / 'train'} + {data / 'test'}: feature channel(s) [0, 1, 2, 3] have the")
    assert "are the clips silent?" in error and error.count("\n") == 1


def test_a_float_wav_at_1e30_stops_the_run_naming_the_file(data, tmp_path, capsys):
    samples, _ = sf.read(data / "train" / "4.wav", dtype="float32")
    samples[100] = 1e30
    sf.write(data / "train" / "4.wav", samples, 16000, subtype="FLOAT")
    assert dacon.main(["--data", str(data), *_quick(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: 1 of 24 audio files cannot be used:")
    assert f"{data / 'train' / '4.wav'}: a sample of magnitude 1e+30 is 600 dB above full scale" in error
    assert "Traceback" not in error and not (tmp_path / "run" / "submission.csv").exists()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_non_finite_statistics_are_an_error_naming_the_split():
    power = np.ones((3, 4, 5, 2), dtype=np.float32)
    power[1, 2, 3, 1] = np.inf
    with pytest.raises(dacon.DataError, match=r"^dacon-test: the normalisation statistics are not finite"):
        features.Normalizer.fit([power], "per_clip", name="dacon-test")
    power[1, 2, 3, 1] = np.nan
    with pytest.raises(dacon.DataError, match=r"^dacon-test: the normalisation statistics are not finite"):
        features.Normalizer.fit([power], "global", name="dacon-test")


def test_non_finite_predictions_write_no_submission(dacon_data, tmp_path):
    """A member that predicts NaN stops the run before submission.csv, naming its seed."""
    import keras

    from replicate.dacon.task import Arrays
    from replicate.ensemble import PredictionError
    from replicate.task import Prepared, Run

    data = dacon.load_data(dacon_data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    members = []
    for seed, poisoned in ((3, False), (4, True)):
        inputs = keras.Input((2, 3, 1))
        dense = keras.layers.Dense(30, activation="softmax")
        model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
        if poisoned:
            dense.kernel.assign(np.full((6, 30), np.nan, dtype=np.float32))
        model.save(run_dir / f"seed-{seed:02d}.keras")
        members.append({"seed": seed, "file": f"seed-{seed:02d}.keras"})
    files.write_json(run_dir / "manifest.json", {"class_names": data.class_names, "members": members})
    power = np.random.default_rng(0).random((8, 2, 3, 1), dtype=np.float32)
    arrays = Arrays(power, power, features.Normalizer.fit([power], "global"), np.arange(8), np.array([], int))
    prepared = Prepared(data.class_names, {"log_mel": [2, 3, 1]}, "clips", {}, state=arrays)
    run = Run(dacon.TASK, dacon.load_recipe("quick"), run_dir)
    with pytest.raises(PredictionError, match=r"the member\(s\) of seed\(s\) 4 predict NaN or infinite values \(of 2"):
        dacon.TASK.evaluate(run, data, prepared)
    assert not (run_dir / "submission.csv").exists() and not (run_dir / "test_predictions.npz").exists()


def test_the_command_line_turns_the_packages_own_errors_into_exit_2_and_keeps_other_tracebacks(capsys, tmp_path):
    from replicate.features import FeatureCacheError

    def run_raising(error):
        def run(*args, **kwargs):
            raise error

        return run

    arguments = {"prog": "p", "description": "d", "data_help": "h", "load_recipe": lambda *args: {}}
    damaged = FeatureCacheError("cache/maic-train-1234: frames.npy is truncated; delete the folder")
    assert runner.command_line(["--data", "x", "--run-dir", str(tmp_path)], run=run_raising(damaged), **arguments) == 2
    assert capsys.readouterr().err == "error: cache/maic-train-1234: frames.npy is truncated; delete the folder\n"
    with pytest.raises(ValueError, match="a bug"):
        runner.command_line(
            ["--data", "x", "--run-dir", str(tmp_path)], run=run_raising(ValueError("a bug")), **arguments
        )
    with pytest.raises(KeyError):
        runner.command_line(
            ["--data", "x", "--run-dir", str(tmp_path)], run=run_raising(KeyError("train")), **arguments
        )


def test_cli_rejects_a_bad_override_with_exit_code_2(dacon_data):
    result = subprocess.run(
        [sys.executable, "-m", "replicate.dacon", "--data", str(dacon_data), "--set", "train.epochs=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error: train.epochs = -1: must be > 0" in result.stderr


@pytest.fixture(scope="module")
def trained_run(dacon_data, tmp_path_factory):
    """A tiny quick-profile run (2 members × 1 epoch) made by the command line: (run folder, its result)."""
    tmp_path = tmp_path_factory.mktemp("dacon-run")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "replicate.dacon",
            "--data",
            str(dacon_data),
            "--profile",
            "quick",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--run-dir",
            str(run_dir),
            "--set",
            f"run.cache_dir={str(tmp_path / 'cache')!r}",
            "--set",
            "train.batch_size=8",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"},  # the package's
    )
    return run_dir, result


def test_recipe_end_to_end_and_inference_in_a_fresh_process(trained_run, dacon_data, tmp_path, capsys):
    run_dir, result = trained_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuInit" not in result.stderr  # TensorFlow's start-up noise on a machine without a GPU driver
    kl = files.read_json(run_dir / "scores.json")["evaluations"]["test (synthetic answers)"]["ensemble_kl_by_size"]
    assert result.stdout.splitlines()[-1] == (
        f"done: test KL {kl['2']:.4f} (2-model average; source: 15-model average 0.3920 on the real data, private "
        f"leaderboard (3rd place)) — report {run_dir / 'report.md'}, submission {run_dir / 'submission.csv'}"
    )

    manifest = files.read_json(run_dir / "manifest.json")
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    assert manifest["schema_version"] == 1 and manifest["inputs"] == {"log_mel": [64, 101, 4]}
    assert manifest["preprocessing"]["normalization"]["reference"] == "global"
    assert {resolution["pad_mode"] for resolution in manifest["features"]["log_mel"]["resolutions"]} == {"reflect"}
    assert manifest["data"]["unit"] == "clips" and manifest["data"]["splits"] == {
        "train": 24,
        "validation": 0,
        "test": 8,
    }
    assert (run_dir / "recipe.toml").is_file() and (run_dir / "training_curves.png").stat().st_size > 1000

    submission = pd.read_csv(run_dir / "submission.csv", dtype={"id": str})
    template = pd.read_csv(dacon_data / "submission.csv", dtype={"id": str})
    assert list(submission.columns) == list(template.columns)
    assert submission["id"].tolist() == template["id"].tolist()
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)

    scores = files.read_json(run_dir / "scores.json")["evaluations"]["test (synthetic answers)"]
    assert len(scores["member_kl"]) == 2 and scores["prior_kl"] > 0
    report = (run_dir / "report.md").read_text()
    assert "source: 15-model average" in report and "0.3920" in report and "our synthetic data" in report

    # A fresh process, without importing the package first: the member loads with plain Keras, and the
    # Ensemble computes features from the wav files exactly as the run did.
    test_files = sorted((dacon_data / "test").glob("*.wav"), key=lambda p: int(p.stem))
    run_python(
        "import numpy as np, keras\n"
        f"model = keras.models.load_model({str(run_dir / 'members/seed-00.keras')!r}, safe_mode=True)\n"
        "assert model.name == 'dacon_mish_resnet'\n"
        "from replicate.ensemble import Ensemble\n"
        f"ensemble = Ensemble.load({str(run_dir)!r})\n"
        f"paths = {[str(p) for p in test_files]!r}\n"
        f"np.save({str(tmp_path / 'files.npy')!r}, ensemble.predict_files(paths))\n"
    )
    saved = np.load(run_dir / "test_predictions.npz")
    np.testing.assert_allclose(np.load(tmp_path / "files.npy"), saved["probabilities"].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), saved["probabilities"].mean(axis=0), atol=1e-6)

    # Running the same command again resumes: every member is kept.
    again = subprocess.run(result.args, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("already trained, kept") == 2

    # Other clips under the same names: the members were trained from other features, and the command says so.
    other = shutil.copytree(dacon_data, tmp_path / "other")
    shutil.copy(other / "train" / "1.wav", other / "train" / "0.wav")
    assert dacon.main([*result.args[3:4], str(other), *result.args[5:]]) == 2
    assert re.fullmatch(
        rf"error: {re.escape(str(run_dir))}: the members of seeds 0, 1 were trained from another set-up "
        r"\(other features, .*\); use another --run-dir, or --retrain to train them again\n",
        capsys.readouterr().err,
    )
    assert [m["seed"] for m in files.read_json(run_dir / "manifest.json")["members"]] == [0, 1]  # left as it was


def test_the_predict_command_writes_word_shares_and_names_a_bad_file_in_one_line(trained_run, dacon_data, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "predictions.csv"
    predict = [sys.executable, "-m", "replicate.predict", str(run_dir)]
    result = subprocess.run(
        [*predict, str(dacon_data / "test"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"predictions: {out} (8 rows, 2 members)\n"
    table = pd.read_csv(out, dtype=str)
    assert list(table.columns) == ["file", *dacon.load_data(dacon_data).class_names]
    # The same inputs (the cache's bits) through the same members: the run's averaged test probabilities,
    # written with the same 8 decimals, in the order of the folder's file names.
    saved = np.load(run_dir / "test_predictions.npz")
    by_id = dict(zip(saved["ids"].tolist(), saved["probabilities"].mean(axis=0), strict=True))
    assert [Path(name).parent for name in table["file"]] == [dacon_data / "test"] * 8
    expected = [[f"{value:.8f}" for value in by_id[Path(name).stem]] for name in table["file"]]
    assert table.iloc[:, 1:].to_numpy().tolist() == expected

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEgarbage")
    result = subprocess.run(
        [*predict, str(dacon_data / "test" / "0.wav"), str(bad), "--out", str(tmp_path / "none.csv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: 1 of 2 audio files cannot be used: {bad}: ")
    assert not (tmp_path / "none.csv").exists()


def test_default_run_folder_is_shared_by_seed_counts_only(tmp_path):
    three = dacon.load_recipe("quick", ["ensemble.seeds=3"])
    five = dacon.load_recipe("quick", ["ensemble.seeds=5"])
    longer = dacon.load_recipe("quick", ["train.epochs=9"])
    assert runner.default_run_id(three, tmp_path) == runner.default_run_id(five, tmp_path)  # grows the ensemble
    assert runner.default_run_id(three, tmp_path) != runner.default_run_id(longer, tmp_path)
    assert runner.default_run_id(three, tmp_path) != runner.default_run_id(three, tmp_path / "other")
    assert runner.default_run_id(three, tmp_path).startswith("quick-")


def _hold(lock_code: str) -> subprocess.Popen:
    """A child process that runs `lock_code` (entering a lock) and then waits to be killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"import time\n{lock_code}\nprint('locked', flush=True)\ntime.sleep(600)\n"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_run_folder_in_use_exits_2_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold(f"from replicate import runner\nlock = runner.lock_run_dir({str(run_dir)!r})\nlock.__enter__()")
    # No data folder: the lock is taken before the data are read, and without it the run stops at once.
    arguments = ["--data", str(tmp_path / "nowhere"), "--profile", "quick", "--run-dir", str(run_dir)]
    try:
        assert dacon.main(arguments) == 2
        assert capsys.readouterr().err == (
            f"error: run folder {run_dir} is in use by process {holder.pid}; wait for it to finish, or choose "
            "another --run-dir\n"
        )
        with pytest.raises(files.LockedError, match=f"in use by process {holder.pid}"):  # the library call too
            from replicate import train

            train.train_ensemble({}, [0], run_dir=run_dir, manifest={}, trained_from={})
    finally:
        holder.kill()  # SIGKILL: the holder never releases its lock itself
        holder.wait()
    # The dead holder's lock file is still there, and blocks nothing: the run gets as far as the data.
    assert (run_dir.parent / ".run.lock").read_text() == f"{holder.pid}\n"
    assert dacon.main(arguments) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: data folder not found\n"


def test_retrain_reaches_the_run_under_the_run_folders_lock(tmp_path):
    calls = []

    def run(recipe, data_root, run_dir, *, progress, retrain):
        other = run_python(  # another process cannot take the run folder while the command runs
            "from replicate import files, runner\n"
            "try:\n"
            f"    runner.lock_run_dir({str(run_dir)!r}).__enter__()\n"
            "except files.LockedError as error:\n"
            "    print(error)\n"
        )
        assert f"is in use by process {os.getpid()}" in other.stdout
        calls.append((run_dir, progress, retrain))
        return run_dir

    common = dict(prog="p", description="d", data_help="h", load_recipe=dacon.load_recipe, run=run)
    arguments = ["--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert runner.command_line([*arguments, "--retrain"], **common) == 0
    assert runner.command_line(arguments, **common) == 0
    assert calls == [(tmp_path / "run", False, True), (tmp_path / "run", False, False)]
