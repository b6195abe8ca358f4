"""DCASE 2020 Task 2 recipe: file-name parsing, layout errors, metrics, official files, scores, a tiny run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from sklearn import metrics as sk_metrics
from threadpoolctl import threadpool_limits

from replicate import dcase, files, metrics
from replicate.audio import read_audio
from replicate.dcase.data import Clip, parse_name
from replicate.dcase.members import ensemble_scores
from replicate.dcase.scoring import (
    SCORE_METHODS,
    evaluate_scores,
    fit_reference,
    reference_scores,
    softmax_scores,
    write_result_csv,
    write_score_files,
)
from replicate.dcase.task import LIBROSA_DEFINITION, feature_spec, mel_resolution
from replicate.ensemble import to_windows, window_starts
from replicate.features import FeatureCacheError, MelResolution, Normalizer, melspectrogram
from replicate.recipe import RecipeError
from replicate.task import DataError
from tests.conftest import ROOT, run_python


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two machine types, one development and one evaluation ID each, 0.5 s clips."""
    from replicate.synth import dcase as synth

    out = tmp_path_factory.mktemp("dcase-data")
    synth.generate(
        out,
        machine_types=["fan", "valve"],
        dev_ids=2,
        eval_ids=1,
        train_per_id=6,
        test_per_id=3,
        seconds=0.5,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def one_type_data(tmp_path_factory) -> Path:
    """The smallest data set a fine-tuned run needs: one machine type with two IDs (one dev, one eval)."""
    from replicate.synth import dcase as synth

    out = tmp_path_factory.mktemp("dcase-one-type")
    synth.generate(
        out, machine_types=["valve"], dev_ids=1, eval_ids=1, train_per_id=8, test_per_id=3, seconds=0.5, progress=False
    )
    return out


def _copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def test_ids_and_labels_come_from_the_file_name_only():
    tricky = Path("/data/id_03/normal_id_05/dev_data/fan/test/anomaly_id_02_00000001.wav")
    assert parse_name(tricky, labelled=True) == (1, "02")
    assert parse_name(Path("/x/anomaly_id_07/normal_id_00_00000123.wav"), labelled=True) == (0, "00")
    assert parse_name(Path("/normal_id_01/id_05_00000003.wav"), labelled=False) == (None, "05")
    for name, labelled in (
        ("normal_00_00000001.wav", True),
        ("id_05_00000003.wav", True),
        ("anomaly_id_1.wav", True),
        ("normal_id_05_00000003.wav", False),
    ):
        with pytest.raises(DataError, match="does not parse"):
            parse_name(Path("/d") / name, labelled=labelled)


def test_machine_ids_have_two_digits(tiny_data, tmp_path):
    for name, labelled in (("normal_id_0_00000003.wav", True), ("id_123_00000003.wav", False)):
        with pytest.raises(DataError, match=r"machine ID '(0|123)' must have two digits, as in the official layout"):
            parse_name(Path("/d") / name, labelled=labelled)
    root = _copy(tiny_data, tmp_path)
    shutil.copy(root / "dev_data/fan/train/normal_id_00_00000000.wav", root / "dev_data/fan/train/normal_id_0_3.wav")
    with pytest.raises(DataError, match=r"fan/train/normal_id_0_3\.wav: machine ID '0' must have two digits"):
        dcase.load_data(root)


def test_ground_truth_with_two_rows_for_a_file_names_the_lines(tiny_data, tmp_path):
    root = _copy(tiny_data, tmp_path)
    truth = (root / "eval_ground_truth.csv").read_text().splitlines()
    machine_type, name, label = truth[3].split(",")
    (root / "eval_ground_truth.csv").write_text("\n".join([*truth, f"{machine_type},{name},{1 - int(label)}"]) + "\n")
    with pytest.raises(  # read with the layout (`load_data`), before anything is computed
        DataError,
        match=rf"eval_ground_truth\.csv: more than one row for {machine_type}/{name} on lines 4, {len(truth) + 1} "
        rf"\(labels {label}, {1 - int(label)}\); one label per file",
    ):
        dcase.load_data(root)


def test_silent_clips_are_one_line_naming_the_training_clips(one_type_data, tmp_path, capsys):
    root = _copy(one_type_data, tmp_path)
    for path in root.rglob("*.wav"):
        sf.write(path, np.zeros(8000, np.int16), 16000, subtype="PCM_16")
    arguments = ["--data", str(root), "--profile", "quick", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    arguments += ["--set", f"run.cache_dir='{tmp_path / 'cache'}'", "--set", "data.clip_samples=8000"]
    assert dcase.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: the training clips of {root} (<dataset>/<machine type>/train/): feature channel")
    assert error.count("\n") == 1 and "are the clips silent?" in error


def test_non_finite_member_outputs_name_the_seed_before_any_score(one_type_data, tmp_path):
    import keras

    from replicate.ensemble import Ensemble, PredictionError

    data = dcase.load_data(one_type_data)
    power = np.random.default_rng(0).random((len(data.dev_test), 4, 6, 1), dtype=np.float32) + 0.1
    inputs = keras.Input((4, 6, 1))
    embedding = keras.layers.Dense(3, name="embedding")(keras.layers.Flatten()(inputs))
    probabilities = keras.layers.Dense(len(data.class_names), activation="softmax", name="probabilities")(embedding)
    model = keras.Model(inputs, {"probabilities": probabilities, "embedding": embedding})
    model.get_layer("embedding").kernel.assign(np.full((24, 3), np.nan, np.float32))
    ensemble = Ensemble(tmp_path, {"class_names": data.class_names, "members": [{"seed": 9}]}, [model])
    with pytest.raises(
        PredictionError, match=rf"{re.escape(str(tmp_path))}: the member\(s\) of seed\(s\) 9 predict NaN"
    ):
        ensemble_scores(ensemble, data.dev_test, data.class_names, power, 6, {"softmax": [{}], "centroid": [{}]})


def test_layout_is_read_with_types_ids_labels_and_ground_truth(tiny_data):
    data = dcase.load_data(tiny_data)
    assert data.machine_types == ["fan", "valve"]
    assert data.class_names == ["fan/id_00", "fan/id_01", "fan/id_02", "valve/id_00", "valve/id_01", "valve/id_02"]
    assert len(data.train) == 6 * 6 and len(data.dev_test) == 2 * 2 * 6 and len(data.eval_test) == 2 * 6
    assert {clip.label for clip in data.dev_test} == {0, 1} and {clip.label for clip in data.eval_test} == {None}
    assert data.eval_labels.sum() == len(data.eval_labels) // 2


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: shutil.rmtree(root / "dev_data"), r"dev_data: folder not found"),
        (
            lambda root: (root / "dev_data/fan/train/normal_id_00_00000000.wav").rename(
                root / "dev_data/fan/train/fan_00.wav"
            ),
            r"fan_00\.wav: file name does not parse",
        ),
        (
            lambda root: shutil.copy(
                root / "dev_data/fan/test/anomaly_id_00_00000000.wav",
                root / "dev_data/fan/train/anomaly_id_00_00000009.wav",
            ),
            r"anomaly_id_00_00000009\.wav: an anomalous clip in a training folder",
        ),
        (
            lambda root: (
                [path.unlink() for path in (root / "dev_data/valve/train").glob("*.wav")]
                + [shutil.rmtree(root / "eval_data/valve/train")]
            ),
            r"machine type 'valve' has no training files",
        ),
        (
            lambda root: [path.unlink() for path in (root / "dev_data/fan/train").glob("normal_id_02_*.wav")],
            r"anomaly_id_02_00000000\.wav: machine ID 02 of fan has no training files",
        ),
        (
            lambda root: (root / "eval_ground_truth.csv").write_text(
                "machine_type,file,label\nfan,id_01_00000000.wav,0\n"
            ),
            r"eval_ground_truth\.csv: no row for 11 evaluation test files",
        ),
    ],
)
def test_bad_layouts_are_errors_that_name_the_file(tiny_data, tmp_path, breakage, message):
    root = _copy(tiny_data, tmp_path)
    breakage(root)
    with pytest.raises(DataError, match=message):
        dcase.load_data(root)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_bytes(b"RIFF....not a wav"), r"normal_id_00_00000001\.wav: cannot read audio"),
        (
            lambda path: sf.write(path, np.zeros(4000, np.float32), 8000),
            r"normal_id_00_00000001\.wav: sample rate is 8000 Hz",
        ),
    ],
)
def test_unreadable_or_wrongly_sampled_audio_stops_the_run_with_its_name(tiny_data, tmp_path, write, message):
    root = _copy(tiny_data, tmp_path)
    write(root / "dev_data/fan/train/normal_id_00_00000001.wav")
    data = dcase.load_data(root)
    recipe = dcase.load_recipe(
        "quick", [f"run.cache_dir='{tmp_path / 'cache'}'", "data.clip_samples=8000", "run.workers=1"]
    )
    with pytest.raises(FeatureCacheError, match=message):
        feature_spec(recipe).cached(
            [clip.path for clip in data.train], cache_dir=tmp_path / "cache", name="train", workers=1, progress=False
        )


def _mcclish_partial_auc(labels, scores, max_fpr):
    """The standardised partial AUC written out: area under the ROC up to max_fpr, rescaled to [0.5, 1]."""
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
    stop = np.searchsorted(fpr, max_fpr, "right")
    x = np.append(fpr[:stop], max_fpr)
    y = np.append(tpr[:stop], np.interp(max_fpr, fpr, tpr))
    area = np.trapezoid(y, x)
    minimum, maximum = max_fpr**2 / 2, max_fpr
    return 0.5 * (1 + (area - minimum) / (maximum - minimum))


def test_pauc_equals_sklearn_and_the_mcclish_formula():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    scores = rng.normal(size=100) + labels
    expected = sk_metrics.roc_auc_score(labels, scores, max_fpr=0.1)
    assert metrics.partial_auc(labels, scores, 0.1) == pytest.approx(expected)
    assert expected == pytest.approx(_mcclish_partial_auc(labels, scores, 0.1), abs=1e-9)


def _clip(machine_type, machine_id, label, index):
    prefix = {0: "normal_", 1: "anomaly_", None: ""}[label]
    return Clip(Path(f"/d/{prefix}id_{machine_id}_{index:08d}.wav"), machine_type, machine_id, label, "dev", "test")


def read_result_csv(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Parse an official `result.csv` back: {machine type: {ID or "Average": (AUC, pAUC)}}, failing on any line
    out of the format (per type its name, `id,AUC,pAUC`, one row per ID, `Average`, a blank line)."""
    result: dict[str, dict[str, tuple[float, float]]] = {}
    current = None
    expect_header = False
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        cells = line.split(",")
        if not line:
            current = None
        elif current is None:
            if len(cells) != 1:
                raise AssertionError(f"{path}, line {number}: expected a machine type, found {line!r}")
            current, expect_header = cells[0], True
            result[current] = {}
        elif expect_header:
            if cells != ["id", "AUC", "pAUC"]:
                raise AssertionError(f"{path}, line {number}: expected the header id,AUC,pAUC, found {line!r}")
            expect_header = False
        else:
            if len(cells) != 3:
                raise AssertionError(f"{path}, line {number}: expected id,AUC,pAUC values, found {line!r}")
            result[current][cells[0]] = (float(cells[1]), float(cells[2]))
    return result


def test_evaluation_result_csv_and_score_files_have_the_official_format(tmp_path):
    clips = [
        _clip(t, i, label, k) for t in ("fan", "pump") for i in ("00", "02") for k, label in enumerate([0, 0, 1, 1])
    ]
    labels = np.array([clip.label for clip in clips])
    scores = np.array([0.1, 0.4, 0.3, 0.9] * 4)
    evaluation = evaluate_scores(clips, labels, scores, 0.1)
    assert evaluation["types"]["fan"]["ids"]["00"]["auc"] == pytest.approx(0.75)
    assert evaluation["mean_auc"] == pytest.approx(0.75)
    write_result_csv(tmp_path / "result.csv", evaluation)
    lines = (tmp_path / "result.csv").read_text().splitlines()
    pauc = sk_metrics.roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.3, 0.9], max_fpr=0.1)
    assert lines[:5] == ["fan", "id,AUC,pAUC", f"00,0.75,{pauc}", f"02,0.75,{pauc}", f"Average,0.75,{pauc}"]
    assert lines[5] == "" and lines[6] == "pump"
    assert read_result_csv(tmp_path / "result.csv")["pump"]["Average"] == (0.75, pytest.approx(pauc))
    written = write_score_files(tmp_path / "dev", clips, scores)
    assert sorted(path.name for path in written) == [
        "anomaly_score_fan_id_00.csv",
        "anomaly_score_fan_id_02.csv",
        "anomaly_score_pump_id_00.csv",
        "anomaly_score_pump_id_02.csv",
    ]
    rows = (tmp_path / "dev" / "anomaly_score_fan_id_00.csv").read_text().splitlines()
    assert rows == [
        "normal_id_00_00000000.wav,0.10000000",
        "normal_id_00_00000001.wav,0.40000000",
        "anomaly_id_00_00000002.wav,0.30000000",
        "anomaly_id_00_00000003.wav,0.90000000",
    ]
    (tmp_path / "bad.csv").write_text("fan\nid,AUC\n")
    with pytest.raises(AssertionError, match=r"bad\.csv, line 2: expected the header id,AUC,pAUC"):
        read_result_csv(tmp_path / "bad.csv")


def test_the_per_type_table_has_a_dash_where_the_source_reported_no_number():
    from replicate.dcase.report import _type_table

    source = dcase.load_recipe()["source"]
    table = _type_table({"types": {"fan": {"auc": 0.9, "pauc": 0.8}, "drill": {"auc": 0.7, "pauc": 0.6}}}, source)
    fan_source = [f"{value:.2f}" for key in ("integrated_dev", "baseline_dev") for value in source[key]["fan"]]
    assert f"| fan | 90.00 | 80.00 | {' | '.join(fan_source)} |" in table
    assert "| drill | 70.00 | 60.00 | - | - | - | - |" in table  # a type outside DCASE 2020's six


def test_windows_cover_the_clip_and_scores_rank_outliers():
    assert window_starts(313, 313) == [0]
    assert window_starts(313, 100) == [0, 100, 200, 213]
    batch = np.arange(2 * 3 * 10, dtype=np.float32).reshape(2, 3, 10, 1)
    windows = to_windows(batch, 4)
    assert windows.shape == (2 * 3, 3, 4, 1)
    np.testing.assert_array_equal(windows[2], batch[0, :, 6:10])
    assert to_windows(batch, 12).shape == (2, 3, 12, 1)  # shorter clips are zero-padded
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(softmax_scores(probabilities, np.array([0, 1, 1])), [0.1, 0.2, 0.6])
    rng = np.random.default_rng(0)
    centre = rng.normal(size=8)
    train = centre + 0.1 * rng.normal(size=(40, 8))
    test = np.concatenate([centre + 0.1 * rng.normal(size=(10, 8)), -centre + 0.1 * rng.normal(size=(10, 8))])
    for method in ("centroid", "gmm", "lof"):
        reference = fit_reference(method, train, np.zeros(40, int), {"gmm_components": 1, "lof_neighbors": 5})
        scores = reference_scores(method, reference, test, np.zeros(20, int))
        assert sk_metrics.roc_auc_score(np.repeat([0, 1], 10), scores) == 1.0, method


def test_recipe_is_the_source_by_default_and_setup_is_an_alias():
    recipe = dcase.load_recipe()
    assert recipe["train"]["setup"] == "integrated" and recipe["model"]["head"] == "arcface"
    assert (recipe["model"]["scale"], recipe["model"]["margin"], recipe["model"]["blocks"]) == (
        30.0,
        0.05,
        [3, 4, 6, 3],
    )
    assert recipe["train"]["batch_size"] == 64 and recipe["train"]["learning_rate"] == 2e-4
    assert recipe["train"]["loss_options"] == {"label_smoothing": 0.05} and recipe["train"]["mixup_alpha"] == 1.0
    assert (recipe["train"]["warmup_epochs"], recipe["train"]["first_cycle_epochs"], recipe["train"]["cycle_mult"]) == (
        2,
        10,
        2,
    )
    assert (recipe["features"]["n_fft"], recipe["features"]["hop_length"], recipe["features"]["n_mels"]) == (
        1024,
        512,
        128,
    )
    # torchaudio.transforms.MelSpectrogram's defaults, where the write-up is silent
    assert mel_resolution(recipe["features"]) == MelResolution(1024, 1024, 512, 128, "reflect", "htk", "none")
    with pytest.raises(RecipeError, match=r"features.mel_scale = 'mel': must be one of 'slaney', 'htk'"):
        dcase.load_recipe(overrides=["features.mel_scale=mel"])
    assert dcase.load_recipe(overrides=["setup=per_machine"])["train"]["setup"] == "per_machine"
    assert dcase.load_recipe(overrides=["model.head=cosface"])["model"]["head"] == "cosface"
    assert dcase.load_recipe(overrides=["train.precision=mixed_bfloat16"])["train"]["precision"] == "mixed_bfloat16"
    with pytest.raises(RecipeError, match=r"train.setup = 'both': must be one of"):
        dcase.load_recipe(overrides=["setup=both"])
    with pytest.raises(RecipeError, match=r"model.head = 'sphere': must be one of"):
        dcase.load_recipe(overrides=["model.head=sphere"])
    with pytest.raises(RecipeError, match=r"warmup_epochs = 10.0 must be shorter"):
        dcase.load_recipe(overrides=["train.warmup_epochs=10"])


def test_features_are_torchaudios_definition_keyed_by_it_and_recomputed_so_at_inference(tiny_data, tmp_path):
    clips = dcase.load_data(tiny_data).train[:4]
    paths = [clip.path for clip in clips]
    settings = ["data.clip_samples=8000", "run.workers=1", f"run.cache_dir='{tmp_path / 'cache'}'"]
    source = dcase.load_recipe(overrides=settings)
    librosa_defaults = dcase.load_recipe(
        overrides=[*settings, "features.pad_mode=constant", "features.mel_scale=slaney", "features.mel_norm=slaney"]
    )

    def cached(recipe):
        return feature_spec(recipe).cached(paths, cache_dir=tmp_path / "cache", name="t", progress=False)

    power, meta = cached(source)
    audio = np.stack([read_audio(path, 16000, num_samples=8000, fix_length=True)[0] for path in paths])
    with threadpool_limits(1):  # the cache's BLAS setting (more threads change the product's last bit)
        expected = melspectrogram(
            audio, 16000, n_fft=1024, hop_length=512, n_mels=128, pad_mode="reflect", mel_scale="htk", mel_norm="none"
        )
    np.testing.assert_array_equal(power[..., 0], expected)

    old_power, old_meta = cached(librosa_defaults)
    assert old_meta["key"] != meta["key"]  # another definition: not the same cache
    with threadpool_limits(1):
        np.testing.assert_array_equal(old_power[..., 0], melspectrogram(audio, 16000, n_fft=1024, hop_length=512))

    for recipe, power_of_recipe in ((source, power), (librosa_defaults, old_power)):
        normalizer = Normalizer.fit([power_of_recipe], recipe["features"]["db_reference"], recipe["features"]["top_db"])
        manifest = {  # what the run records
            "schema_version": 1,
            "features": {"log_mel": feature_spec(recipe).to_manifest()},
            "preprocessing": {"normalization": normalizer.to_config()},
        }
        inputs = dcase.TASK.inference_inputs(manifest, paths)
        np.testing.assert_array_equal(inputs, normalizer(power_of_recipe))
    # A run from before the manifest schema and the definition keys computed librosa's defaults, and so does
    # its inference.
    old_manifest = {
        "normalization": normalizer.to_config(),
        "recipe": {
            "data": librosa_defaults["data"],
            "features": {
                key: value for key, value in librosa_defaults["features"].items() if key not in LIBROSA_DEFINITION
            },
        },
    }
    np.testing.assert_array_equal(dcase.TASK.inference_inputs(old_manifest, paths), normalizer(old_power))


TINY_RUN = [
    "model.width=4",
    "model.blocks=[1, 1, 1, 1]",
    "model.embedding_dim=8",
    "train.epochs=2",
    "train.batch_size=16",
    "finetune.epochs=2",
    "data.clip_samples=8000",
    "run.workers=1",
]


@pytest.mark.parametrize(
    ("setup", "head", "precision"),
    [
        # the default suite's run is the source's set-up in mixed precision: training, fine-tuning, the export
        # to built-in layers and predict all take bfloat16 members (float32: the slow runs and test_resume)
        ("finetune", "arcface", "mixed_bfloat16"),
        pytest.param("per_machine", "cosface", "float32", marks=pytest.mark.slow),
        pytest.param("integrated", "softmax", "float32", marks=pytest.mark.slow),
    ],
)
def test_tiny_run_writes_official_files_and_members_that_load_alone(
    one_type_data, tmp_path, capsys, setup, head, precision
):
    run_dir = tmp_path / "run"
    arguments = ["--data", str(one_type_data), "--profile", "quick", "--seeds", "1", "--run-dir", str(run_dir)]
    arguments += ["--no-progress", "--set", f"setup={setup}", "--set", f"run.cache_dir='{tmp_path / 'cache'}'"]
    arguments += ["--set", f"model.head={head}", "--set", f"train.precision={precision}"]
    for item in TINY_RUN:
        arguments += ["--set", item]
    assert dcase.main(arguments) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    scores = files.read_json(run_dir / "scores.json")
    result = scores["groups"][setup]["eval"][scores["method"]]["ensemble"]
    assert last.startswith(
        f"done: evaluation AUC {100 * result['mean_auc']:.2f} / pAUC {100 * result['mean_pauc']:.2f} (1-member "
        f"average, {scores['method']} score; source: "
    )
    assert last.endswith(f"on the real data) — report {run_dir / 'report.md'}")
    assert sorted(path.name for path in (run_dir / "dev").glob("*.csv")) == [
        "anomaly_score_valve_id_00.csv",
        "result.csv",
    ]
    assert sorted(path.name for path in (run_dir / "eval").glob("*.csv")) == [
        "anomaly_score_valve_id_01.csv",
        "result.csv",
    ]
    assert len((run_dir / "eval" / "anomaly_score_valve_id_01.csv").read_text().splitlines()) == 6
    parsed = read_result_csv(run_dir / "dev" / "result.csv")
    assert sorted(parsed) == ["valve"] and sorted(parsed["valve"]) == ["00", "Average"]
    assert scores["final_group"] == setup and sorted(scores["groups"][setup]["dev"]) == sorted(SCORE_METHODS)
    for name in ("report.md", "roc_dev.png", "embeddings_dev.png", "training_curves.png"):
        assert (run_dir / name).is_file(), name
    member = run_dir / (setup if setup == "integrated" else f"{setup}/valve") / "members" / "seed-00.keras"
    history = (member.parent / "seed-00.history.csv").read_text().splitlines()
    assert "dev_score" in history[0] and history[2].split(",")[3] != "nan"  # scored at epoch 2
    run_python(
        "import keras\n"
        f"member = keras.models.load_model({str(member)!r}, safe_mode=True)\n"
        "assert sorted(member.output.keys()) == ['embedding', 'probabilities'], member.output\n"
        "walk = lambda layer: [layer] + [inner for sub in getattr(layer, 'layers', []) for inner in walk(sub)]\n"
        "policies = {layer.dtype_policy.name for layer in walk(member) if isinstance(layer, keras.layers.Conv2D)}\n"
        f"assert policies == {{{precision!r}}}, policies\n",
        cwd=tmp_path,
    )
    assert dcase.main(arguments) == 0  # again: everything is kept
    output = capsys.readouterr().out
    assert "already trained, kept" in output and ": training\n" not in output
    _predict_scores_the_test_clips_as_the_run_did(run_dir, one_type_data, tmp_path)


def _predict_scores_the_test_clips_as_the_run_did(run_dir: Path, data_root: Path, tmp_path: Path) -> None:
    """`python -m replicate.predict` in a fresh process: the anomaly scores of the official files (the same
    cached bits through the same members and the run's saved score reference, written with the same 8
    decimals); a file whose name does not parse is one line naming it, exit 2."""
    out, test = tmp_path / "predictions.csv", data_root / "dev_data" / "valve" / "test"
    predict = [sys.executable, "-m", "replicate.predict", str(run_dir)]
    result = subprocess.run([*predict, str(test), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"predictions: {out} (6 rows, 1 members)\n"
    table = pd.read_csv(out, dtype=str)
    assert list(table.columns) == ["file", "machine_type", "machine_id", "anomaly_score"]
    assert set(table["machine_type"]) == {"valve"} and set(table["machine_id"]) == {"00"}
    official = (run_dir / "dev" / "anomaly_score_valve_id_00.csv").read_text().splitlines()
    rows = zip(table["file"], table["anomaly_score"], strict=True)
    assert [f"{Path(name).name},{score}" for name, score in rows] == official

    bad = tmp_path / "valve" / "test" / "valve_00.wav"
    bad.parent.mkdir(parents=True)
    shutil.copy(next(test.glob("*.wav")), bad)
    result = subprocess.run(
        [*predict, str(bad), "--out", str(tmp_path / "none.csv")], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = "normal_id_<ID>_<index>.wav, anomaly_id_… or id_<ID>_<index>.wav"
    assert errors == [f"error: {bad}: file name does not parse; expected {expected}"]
    assert not (tmp_path / "none.csv").exists()
