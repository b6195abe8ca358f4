"""The AI CUP 2023 recipe: the competition layout and its errors, the clinical encoder, MFCCs, the training
pieces (class weights, split, loss wiring), metrics, and the whole recipe end to end on tiny synthetic data."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import keras
import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from sklearn import metrics as sk_metrics

from replicate import aicup, files, predict, runner, tasks, train
from replicate.aicup import data as layout
from replicate.aicup import scoring, splits
from replicate.aicup.task import Arrays
from replicate.features import FeatureCacheError
from replicate.losses import DoubleSoftmaxCrossentropy
from replicate.recipe import RecipeError
from replicate.synth import aicup as synth
from replicate.task import Prepared, Run, stratified_fold_rows
from tests.conftest import run_predict, run_python

TRAIN_CSV = "Training_Dataset/training_datalist.csv"


@pytest.fixture(scope="module")
def aicup_data(tmp_path_factory):
    """A tiny AI CUP-format data set: 40 training persons, 8 public and 8 private test persons."""
    out_dir = tmp_path_factory.mktemp("aicup-data")
    synth.generate(out_dir, n_train=40, n_public=8, n_private=8, seed=7, progress=False)
    return out_dir


@pytest.fixture
def data(aicup_data, tmp_path):
    """A private copy of the tiny data set, to break."""
    return shutil.copytree(aicup_data, tmp_path / "data")


def _table(data) -> pd.DataFrame:
    return pd.read_csv(data / TRAIN_CSV, dtype=str, keep_default_na=False)


def _write(data, table: pd.DataFrame) -> None:
    table.to_csv(data / TRAIN_CSV, index=False)


# --- layout and table checks --------------------------------------------------------------------


def test_columns_are_matched_after_normalisation(data):
    assert "Onset of dysphonia " in _table(data).columns  # the real header's trailing space
    table = _table(data).rename(columns={"Onset of dysphonia ": "onset  of Dysphonia", "PND": " PND"})
    _write(data, table)
    clinical, labels, _ = aicup.read_table(data / TRAIN_CSV, labelled=True)
    assert list(clinical.columns) == ["ID", *layout.FIELD_NAMES]
    assert "Onset of dysphonia" in clinical.columns and labels.min() >= 1 and labels.max() <= 5
    assert layout.normalize_column("Onset of dysphonia ") == layout.normalize_column("onset_of_dysphonia")


def test_unknown_and_missing_columns_are_named(data):
    _write(data, _table(data).drop(columns=["Choking"]).rename(columns={"CVA": "Stroke"}))
    with pytest.raises(aicup.DataError, match=r"missing columns 'Choking', 'CVA'; unknown columns 'Stroke'"):
        aicup.load_data(data)


def test_folders_with_spaces_are_found(data):
    (data / "Training_Dataset" / "training_datalist.csv").rename(data / "Training_Dataset" / "training datalist.csv")
    (data / "Training_Dataset").rename(data / "Training Dataset")
    (data / "Public_Testing_Dataset").rename(data / "Public Testing Dataset")
    loaded = aicup.load_data(data)
    assert loaded.train.table.name == "training datalist.csv" and len(loaded.train.paths) == 40
    assert [split.name for split in loaded.tests] == ["public", "private"]


def test_empty_ppd_and_vhi_are_filled_and_counted(data):
    table = _table(data)
    table.loc[:2, "PPD"] = ""
    table.loc[:4, "Voice handicap index - 10"] = ""
    _write(data, table)
    loaded = aicup.load_data(data)
    assert loaded.train.empty_cells["PPD"] >= 3 and loaded.train.empty_cells["Voice handicap index - 10"] >= 5
    encoded = aicup.ClinicalEncoder.fit(loaded.train.clinical)(loaded.train.clinical)
    assert np.isfinite(encoded).all() and (encoded[:5, 19] == 0).all()  # VHI-10 / 40, filled with 0


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("Smoking", "", r"empty 'Smoking' on line 4 \(ID "),
        ("Smoking", "4", r"'Smoking' must be in 0\.\.3; line 4 \(ID \w+\) \(4\)"),
        ("Onset of dysphonia ", "1.5", r"'Onset of dysphonia' must be a whole-number code on line 4"),
        ("Age", "old", r"'Age' is not a number on line 4"),
        ("Voice handicap index - 10", "41", r"'Voice handicap index - 10' must be in 0\.\.40; line 4"),
        ("Disease category", "6", r"'Disease category' must be in 1\.\.5; line 4"),
    ],
)
def test_bad_cells_name_the_line_id_and_column(data, column, value, message):
    table = _table(data)
    table.loc[2, column] = value
    _write(data, table)
    with pytest.raises(aicup.DataError, match=message):
        aicup.load_data(data)


def test_duplicated_ids_and_missing_wavs_are_listed(data):
    table = _table(data)
    identifier = table.loc[3, "ID"]
    (data / "Training_Dataset" / "training_voice_data" / f"{identifier}.wav").unlink()
    with pytest.raises(aicup.DataError, match=rf"1 IDs of .*training_datalist.csv have no .*<ID>.wav: {identifier}"):
        aicup.load_data(data)
    table.loc[5, "ID"] = table.loc[6, "ID"]
    _write(data, table)
    with pytest.raises(aicup.DataError, match=rf"duplicated IDs {table.loc[6, 'ID']}"):
        aicup.load_data(data)


def test_missing_training_list_and_folder(data, tmp_path):
    with pytest.raises(aicup.DataError, match=r"nowhere: data folder not found"):
        aicup.load_data(tmp_path / "nowhere")
    shutil.rmtree(data / "Training_Dataset" / "training_voice_data")
    with pytest.raises(aicup.DataError, match=r"audio folder training_voice_data/ is not beside it"):
        aicup.load_data(data)
    (data / TRAIN_CSV).unlink()
    with pytest.raises(aicup.DataError, match=r"no training_datalist.csv"):
        aicup.load_data(data)


def test_a_second_training_list_is_an_error_not_a_silent_choice(data):
    shutil.copy(data / TRAIN_CSV, data / "training_datalist.csv")  # a stray copy at the top
    with pytest.raises(
        aicup.DataError,
        match=rf"{data}: training_datalist.csv is there 2 times \({data / 'training_datalist.csv'}, "
        rf"{data / TRAIN_CSV}\); keep one",
    ):
        aicup.load_data(data)


def test_a_training_split_without_a_class_is_one_line(data, tmp_path, capsys):
    table = _table(data)
    _write(data, table[table["Disease category"] != "4"])  # no Neoplasm (its wavs are extra, ignored)
    arguments = ["--data", str(data), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert aicup.main([*arguments, "--set", f"run.cache_dir='{tmp_path / 'cache'}'"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: {data / TRAIN_CSV}: the training persons of n_mfcc 13 (all but validation fold 0 of 4, split seed "
        "13) have no person of class 4 Neoplasm (0 in the table); every class needs training persons\n"
    )
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["recipe.toml"]  # refused before any feature
    assert not (tmp_path / "cache").exists()


def test_every_variants_split_must_hold_every_class(aicup_data):
    """Each variant trains on its own split: one that lacks a class cannot weight it by 1 / its count."""

    loaded = aicup.load_data(aicup_data)
    labels, rows = loaded.train.labels, np.arange(len(loaded.train.labels))
    folds = {13: splits.Fold(13, rows, rows[:5]), 17: splits.Fold(17, rows[labels != 4], rows[labels == 4])}
    data_recipe = aicup.load_recipe()["data"]
    with pytest.raises(
        aicup.DataError,
        match=rf"the training persons of n_mfcc 17 \(all but validation fold 0 of 4, split seed 17\) have no person "
        rf"of class 4 Neoplasm \({np.sum(labels == 4)} in the table\)",
    ):
        splits.check_training_classes(loaded.train, folds, data_recipe)
    splits.check_training_classes(loaded.train, {13: folds[13]}, data_recipe)  # every class among its training rows


def test_non_finite_predictions_write_no_submission(aicup_data, tmp_path):
    from replicate.ensemble import PredictionError

    data = aicup.load_data(aicup_data)
    rng = np.random.default_rng(0)
    inputs = {
        split.name: {"mfcc_13": rng.random((len(split.ids), 13, 4, 1), dtype=np.float32)}
        for split in [data.train, *data.tests]
    }
    group = tmp_path / "audio_only" / "mfcc13"
    group.mkdir(parents=True)
    members = []
    for seed, poisoned in ((0, False), (1, True)):
        mfcc = keras.Input((13, 4, 1), name="mfcc_13")
        dense = keras.layers.Dense(5, activation="softmax")
        model = keras.Model(mfcc, dense(keras.layers.Flatten()(mfcc)))
        if poisoned:
            dense.bias.assign(np.full(5, np.inf, np.float32))
        model.save(group / f"seed-{seed:02d}.keras")
        members.append({"seed": seed, "file": f"seed-{seed:02d}.keras"})
    files.write_json(group / "manifest.json", {"members": members})
    files.write_json(tmp_path / "manifest.json", {"class_names": list(aicup.CLASS_NAMES), "members": []})
    recipe = aicup.load_recipe(overrides=["model.clinical=false", "features.n_mfcc=[13]"])
    rows = np.arange(len(data.train.ids))
    prepared = Prepared([], {}, "persons", {}, state=Arrays(inputs, {13: splits.Fold(0, rows[5:], rows[:5])}))
    with pytest.raises(
        PredictionError,
        match=rf"^audio_only/mfcc13, the validation persons: {tmp_path}: the member\(s\) of seed\(s\) 1 predict NaN",
    ):
        aicup.TASK.evaluate(Run(aicup.TASK, recipe, tmp_path), data, prepared)
    assert not (tmp_path / "submission.csv").exists() and not (tmp_path / "predictions.npz").exists()


def test_extra_wavs_are_counted_not_fatal(data):
    folder = data / "Training_Dataset" / "training_voice_data"
    shutil.copy(next(folder.glob("*.wav")), folder / "unlisted.wav")
    assert aicup.load_data(data).train.extra_wavs == 1


# --- clinical encoder ----------------------------------------------------------------------------


def test_clinical_encoder_has_the_specs_44_inputs_and_values(aicup_data):
    loaded = aicup.load_data(aicup_data)
    encoder = aicup.ClinicalEncoder.fit(loaded.train.clinical)
    assert encoder.width == 44
    row = loaded.train.clinical.iloc[[0]].copy()
    row[["Sex", "Age", "Voice handicap index - 10", "Smoking", "frequency"]] = [2, 25.0, 10.0, 2, 0]
    row[["Onset of dysphonia", "Noise at work", "Diurnal pattern", "Occupational vocal demand"]] = [5, 1, 3, 4]
    encoded = encoder(row)[0]
    assert encoded.shape == (44,) and encoded.dtype == np.float32
    assert encoded[0] == 1.0 and encoded[1] == 0.5 and encoded[19] == 0.25  # Sex - 1, Age / 50, VHI-10 / 40
    one_hot = encoded[20:]
    assert one_hot.sum() == 6  # one code per categorical field
    # Smoking = 2, frequency = 0, Onset = 5, Noise = 1, Diurnal = 3, Demand = 4, each field's codes in turn
    expected_hot = [2, 4 + 0, 8 + 4, 13 + 0, 16 + 2, 20 + 3]
    assert np.flatnonzero(one_hot).tolist() == expected_hot


def test_clinical_encoder_is_deterministic_and_travels_as_json(aicup_data, tmp_path):
    loaded = aicup.load_data(aicup_data)
    encoder = aicup.ClinicalEncoder.fit(loaded.train.clinical)
    files.write_json(tmp_path / "encoder.json", encoder.to_config())
    restored = aicup.ClinicalEncoder.from_config(files.read_json(tmp_path / "encoder.json"))
    assert restored == encoder and restored == aicup.ClinicalEncoder.fit(loaded.train.clinical.sample(frac=1.0))
    np.testing.assert_array_equal(restored(loaded.tests[0].clinical), encoder(loaded.tests[0].clinical))
    # a test list that lacks some codes still gets the same 44 columns (the source's get_dummies would not)
    one_code = loaded.tests[0].clinical.assign(Smoking=0.0)
    assert encoder(one_code).shape == (len(one_code), 44)


# --- features -------------------------------------------------------------------------------------


def test_mfcc_shape_and_equality_with_librosa_clip_by_clip(aicup_data, tmp_path):
    loaded = aicup.load_data(aicup_data)
    recipe = aicup.load_recipe()
    short = tmp_path / "short.wav"
    sf.write(short, np.asarray(sf.read(loaded.train.paths[0])[0][:30_000]), 44_100, subtype="PCM_16")
    paths = [*loaded.train.paths[:3], short]
    for n_mfcc in (13, 50):
        values, meta = _cached(aicup.feature_spec(recipe, n_mfcc), paths, tmp_path, f"test-mfcc{n_mfcc}")
        assert values.shape == (4, n_mfcc, 126, 1)
        assert meta["notes"]["padded"] == 1 and meta["notes"]["cropped"] == 3
        for path, value in zip(paths, values, strict=True):
            signal, rate = librosa.load(path, sr=44_100)  # the source's make_mfcc
            signal = np.pad(signal[:44_100], (0, max(0, 44_100 - len(signal))))  # zero-padded (data.fix_length)
            expected = librosa.feature.mfcc(y=signal, sr=rate, n_fft=705, hop_length=352, n_mfcc=n_mfcc)
            np.testing.assert_allclose(value[..., 0], expected, rtol=1e-4, atol=1e-3)
    again, _ = _cached(aicup.feature_spec(recipe, 13), paths, tmp_path, "test-mfcc13")
    assert len(list(tmp_path.glob("test-mfcc13-*"))) == 1 and len(list(tmp_path.glob("test-mfcc50-*"))) == 1
    assert again.shape == (4, 13, 126, 1)  # read from its own cache


def _cached(spec, paths, cache_dir, name):
    return spec.cached(paths, cache_dir=cache_dir, name=name, workers=1, progress=False, log=lambda _: None)


def test_the_feature_cache_key_is_the_one_of_earlier_runs():
    """The spec's parameters and audio rules key the cache: caches made before the task package stay valid."""
    spec = aicup.feature_spec(aicup.load_recipe(), 17)
    assert spec.params() == {"kind": "mfcc", "sample_rate": 44100, "n_mfcc": 17, "n_fft": 705, "hop_length": 352}
    assert asdict(spec.audio) == {"sample_rate": 44100, "num_samples": 44100, "resample": True, "fix_length": True}


def test_unreadable_wav_names_the_file(data, tmp_path):
    loaded = aicup.load_data(data)
    loaded.train.paths[2].write_bytes(b"RIFF....WAVEgarbage")
    with pytest.raises(FeatureCacheError, match=rf"{loaded.train.paths[2].name}: cannot read audio"):
        _cached(aicup.feature_spec(aicup.load_recipe(), 13), loaded.train.paths, tmp_path / "cache", "bad")


# --- training pieces and metrics ------------------------------------------------------------------


def test_class_weights_are_inverse_counts():
    labels = np.array([1] * 6 + [2] * 3 + [3] * 2 + [4] + [5] * 4)
    np.testing.assert_allclose(splits.class_weights(labels), [1 / 6, 1 / 3, 1 / 2, 1, 1 / 4])
    with pytest.raises(ValueError, match=r"no person of class Neoplasm"):
        splits.class_weights(np.array([1, 2, 3, 5]))


def test_the_recipes_loss_is_the_sources_and_the_plain_cross_entropy_an_option():
    """Default: the source's CrossEntropyLoss on the softmax output (a second softmax), as PyTorch's weighted
    mean Σ wᵢ·lossᵢ / Σ wᵢ; option: the plain cross-entropy of the probabilities. Their values against the
    source's PyTorch network and loss: tests/test_models_aicup.py and tests/test_backends.py."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Softmax()])
    source = train.compile_model(model, aicup.load_recipe()["train"]).loss
    assert isinstance(source, DoubleSoftmaxCrossentropy) and source.reduction == "mean_with_sample_weight"
    plain = train.compile_model(model, aicup.load_recipe(overrides=["train.loss='CategoricalCrossentropy'"])["train"])
    assert plain.loss.get_config()["from_logits"] is False and plain.loss.reduction == "mean_with_sample_weight"
    one_hot = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 4]]
    weights = splits.class_weights(np.array([1, 1, 1, 2, 2, 3, 4, 5]))[[0, 1, 2, 3, 4, 4]]
    # Sure, right answers: 0 for the plain cross-entropy; log(1 + 4/e) ≈ 0.905 through a second softmax.
    assert float(plain.loss(one_hot, one_hot, sample_weight=weights)) < 1e-6
    # float32: log-sum-exp of 5 terms, a subtraction, a weighted mean of 6: at most ~20 roundings of 2⁻²⁴.
    rel = 32 * float(np.finfo(np.float32).eps) / 2
    assert float(source(one_hot, one_hot, sample_weight=weights)) == pytest.approx(np.log(1 + 4 / np.e), rel=rel)


def test_each_variant_draws_its_own_split_as_the_sources_notebooks_did():
    """Each notebook: StratifiedKFold(n_splits=4, shuffle=True), its fold 0; ours seeded split_seed + n_mfcc."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.repeat([1, 2, 3, 4, 5], [40, 20, 12, 4, 4])
    data_recipe = aicup.load_recipe()["data"]
    assert data_recipe["split_per_variant"] is True  # the default
    folds = splits.variant_folds(labels, data_recipe, [13, 17, 21, 30, 50])
    assert [fold.seed for fold in folds.values()] == [13, 17, 21, 30, 50]
    for fold in folds.values():
        splitter = StratifiedKFold(n_splits=4, shuffle=True, random_state=fold.seed)
        train_rows, validation_rows = next(iter(splitter.split(np.zeros(len(labels)), labels)))
        np.testing.assert_array_equal(fold.validation_rows, np.sort(validation_rows))
        np.testing.assert_array_equal(fold.train_rows, np.sort(train_rows))
    assert len({tuple(fold.validation_rows) for fold in folds.values()}) == 5  # five different splits
    # a variant's split does not depend on which other variants are trained (the quick profile's three)
    alone = splits.variant_folds(labels, data_recipe, [17])[17]
    np.testing.assert_array_equal(alone.validation_rows, folds[17].validation_rows)
    summary = splits.split_summary(labels, data_recipe, folds)
    assert summary["per_variant"] is True and summary["variants"]["21"]["seed"] == 21
    assert summary["variants"]["13"]["validation_persons"] == 20
    assert summary["variants"]["13"]["class_counts"]["validation"] == [10, 5, 3, 1, 1]
    np.testing.assert_allclose(summary["variants"]["13"]["class_weights"], [1 / 30, 1 / 15, 1 / 9, 1 / 3, 1 / 3])


def test_one_shared_split_is_an_option():
    labels = np.repeat([1, 2, 3, 4, 5], [40, 20, 12, 4, 4])
    data_recipe = aicup.load_recipe(overrides=["data.split_per_variant=false", "data.split_seed=3"])["data"]
    folds = splits.variant_folds(labels, data_recipe, [13, 17, 21])
    assert {fold.seed for fold in folds.values()} == {3}
    expected = stratified_fold_rows(labels, 4, 0, seed=3)[1]
    assert all(np.array_equal(fold.validation_rows, expected) for fold in folds.values())
    assert splits.split_summary(labels, data_recipe, folds)["per_variant"] is False


def test_uar_is_balanced_accuracy_and_scores_have_recall_and_confusion():
    rng = np.random.default_rng(3)
    labels, predicted = rng.integers(1, 6, 60), rng.integers(1, 6, 60)
    scores = scoring.classification_scores(labels, predicted)
    assert scores["uar"] == pytest.approx(sk_metrics.balanced_accuracy_score(labels, predicted))
    assert scores["uar"] == pytest.approx(np.mean(scores["recall"]))
    assert scores["macro_f1"] == pytest.approx(sk_metrics.f1_score(labels, predicted, average="macro"))
    assert np.array(scores["confusion"]).sum() == 60 and np.trace(scores["confusion"]) == np.sum(labels == predicted)


def test_vote_sums_member_probabilities_and_labels_one_to_five():
    members = np.array(
        [
            [[0.6, 0.4, 0, 0, 0], [0.1, 0, 0, 0, 0.9]],
            [[0.0, 0.9, 0, 0, 0.1], [0.2, 0, 0, 0, 0.8]],
        ]
    )
    # person 1: class 1 wins member 1 but the sum (0.6 vs 1.3) picks class 2
    assert aicup.vote(members).tolist() == [2, 5]


def test_recipe_checks(tmp_path):
    with pytest.raises(RecipeError, match=r"data.validation_fold = 4: must be below data.folds"):
        aicup.load_recipe(overrides=["data.validation_fold=4"])
    with pytest.raises(RecipeError, match=r"features.n_mfcc = \[13, 13\]: must not repeat a value"):
        aicup.load_recipe(overrides=["features.n_mfcc=[13, 13]"])
    with pytest.raises(RecipeError, match=r"features.n_mfcc = \[13, 1\]: must be a non-empty list of integers >= 2"):
        aicup.load_recipe(overrides=["features.n_mfcc=[13, 1]"])
    recipe = aicup.load_recipe("quick")
    assert recipe["features"]["n_mfcc"] == [13, 17, 21] and recipe["ensemble"]["compare_modalities"] is True
    full = aicup.load_recipe()
    assert full["features"]["n_mfcc"] == [13, 17, 21, 30, 50] and full["train"]["epochs"] == 150
    assert full["data"]["resample"] is True and full["data"]["fix_length"] is True  # make_mfcc's librosa.load


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(aicup_data, tmp_path_factory):
    """The recipe on the tiny data: n_mfcc 13 and 17, 2 epochs, multimodal and audio only."""
    run_dir = tmp_path_factory.mktemp("aicup-run") / "run"
    cache = run_dir.parent / "cache"
    overrides = [f"run.cache_dir='{cache}'", "run.workers=1", "train.epochs=2", "train.batch_size=8"]
    overrides.append("features.n_mfcc=[13, 17]")
    recipe = aicup.load_recipe("quick", overrides)
    lines = []
    aicup.run(recipe, aicup_data, run_dir, progress=False, log=lines.append)
    return run_dir, recipe, lines


def test_end_to_end_layout_manifest_and_submission(tiny_run, aicup_data):
    run_dir, _, _ = tiny_run
    scores = files.read_json(run_dir / "scores.json")
    assert scores["headline"] == (
        f"public UAR {scores['modalities']['multimodal']['splits']['public']['ensemble']['uar']:.4f} (MFCC + "
        "clinical, 2 variant(s) × 1 seed(s); source: 5-variant ensemble 0.6007 on the real data, public leaderboard "
        "(7/371))"
    )
    for name in (
        "report.md",
        "predictions.npz",
        "training_curves.png",
        "val_uar.png",
        "confusion_multimodal_public.png",
    ):
        assert (run_dir / name).is_file(), name
    manifest = files.read_json(run_dir / "manifest.json")
    assert manifest["task"] == "aicup" and manifest["schema_version"] == 1
    assert manifest["inputs"] == {"mfcc_13": [13, 126, 1], "mfcc_17": [17, 126, 1], "clinical": [44]}
    assert manifest["data"]["unit"] == "persons"
    assert manifest["data"]["splits"] == {"train": 30, "validation": 10, "public": 8, "private": 8}
    assert [(m["group"], m["seed"]) for m in manifest["members"]] == [
        ("multimodal/mfcc13", 0),
        ("multimodal/mfcc17", 0),
    ]
    assert manifest["members"][0]["file"] == "multimodal/mfcc13/members/seed-00.keras"
    assert all(1 <= m["best_epoch"] <= 2 for m in manifest["members"])
    assert aicup.ClinicalEncoder.from_config(manifest["preprocessing"]["clinical_encoder"]).width == 44
    audio_only = files.read_json(run_dir / "audio_only" / "mfcc17" / "manifest.json")  # trained, not in the ensemble
    assert audio_only["group"] == "audio_only/mfcc17" and audio_only["inputs"] == {"mfcc_17": [17, 126, 1]}

    lines = (run_dir / "submission.csv").read_text().splitlines()
    loaded = aicup.load_data(aicup_data)
    assert [line.split(",")[0] for line in lines] == loaded.tests[0].ids + loaded.tests[1].ids  # no header
    assert all(line.split(",")[1] in {"1", "2", "3", "4", "5"} and line.count(",") == 1 for line in lines)

    report = (run_dir / "report.md").read_text()
    assert "### Audio only vs multimodal" in report and "source: 5-variant ensemble" in report
    assert "0.6076" in report and "0.7305" in report and "0.6411" in report
    assert "| 0 | multimodal/mfcc17 | 2 |" in report  # the members table names each member's variant
    assert "Not in the submission ensemble. Its members' best epochs (by validation UAR): n_mfcc 13 seed 0" in report
    name, table = tasks.results_block(run_dir)
    assert name == "aicup" and "ours: MFCC + clinical, 2 variants × 1 seed(s)" in table and "ours: MFCC only" in table


def test_each_variant_trains_and_is_validated_on_its_own_split(tiny_run):
    run_dir, _, lines = tiny_run
    split = files.read_json(run_dir / "manifest.json")["data"]["split"]
    assert split["per_variant"] is True and {k: v["seed"] for k, v in split["variants"].items()} == {"13": 13, "17": 17}
    assert "n_mfcc 17: 30 training, 10 validation persons (split seed 17)" in lines
    scores = files.read_json(run_dir / "scores.json")["modalities"]["multimodal"]["splits"]
    # validation folds differ between the variants: each variant scored on its own, no ensemble score
    assert "ensemble" not in scores["validation"] and sorted(scores["validation"]["variant_uar"]) == ["13", "17"]
    assert scores["validation"]["persons"] == {"13": 10, "17": 10} and "ensemble" in scores["public"]
    predictions = np.load(run_dir / "predictions.npz")
    assert predictions["multimodal__validation_mfcc17"].shape == (1, 10, 5)
    assert predictions["multimodal__public"].shape == (2, 8, 5)
    report = (run_dir / "report.md").read_text()
    assert "No ensemble score: each variant was validated on its own fold" in report
    assert "fold 0 of a stratified 4-fold split per variant, as the source's notebooks drew them" in report
    _, table = tasks.results_block(run_dir)
    assert "each variant's own validation fold" in table
    assert "2 variants × 1 seed(s) | our synthetic data, validation" not in table


def test_with_one_shared_split_the_ensemble_is_scored_on_the_validation_fold(tiny_run, aicup_data, tmp_path):
    """The evaluation and report of a shared split, on the tiny run's members (copied)."""
    run_dir, recipe, _ = tiny_run
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    shared = {**recipe, "data": {**recipe["data"], "split_per_variant": False}}
    run = Run(aicup.TASK, shared, run_dir, aicup_data, progress=False, log=lambda _: None)
    data = aicup.load_data(aicup_data)
    prepared = aicup.TASK.prepare(run, data)
    manifest = files.read_json(run_dir / "manifest.json")
    run.manifest = {**manifest, "data": {**manifest["data"], "split": prepared.data["split"]}}
    run.scores = aicup.TASK.evaluate(run, data, prepared)
    runner.write_report(run, data, prepared)
    validation = run.scores["modalities"]["multimodal"]["splits"]["validation"]
    assert validation["ensemble"]["persons"] == 10 and validation["persons"] == {"13": 10, "17": 10}
    assert np.load(run_dir / "predictions.npz")["multimodal__validation"].shape == (2, 10, 5)
    report = (run_dir / "report.md").read_text()
    assert "### validation fold (held-out training persons): UAR" in report and "No ensemble score" not in report
    assert "shared by every variant (seed 0)" in report
    assert "2 variants × 1 seed(s) | our synthetic data, validation fold" in runner.results_table(run)


def test_unlabelled_test_lists_are_voted_on_and_not_scored(tiny_run, aicup_data, tmp_path):
    """The real data: the test lists have no answers; the submission is written, only validation is scored."""
    run_dir, recipe, _ = tiny_run
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    data = aicup.load_data(aicup_data)
    for split in data.tests:
        split.labels = None
    run = Run(aicup.TASK, recipe, run_dir, aicup_data, progress=False, log=lambda _: None)
    run.scores = aicup.TASK.evaluate(run, data, aicup.TASK.prepare(run, data))
    assert list(run.scores["modalities"]["multimodal"]["splits"]) == ["validation"]
    assert list(run.scores["majority_uar"]) == ["validation"] and run.scores["headline"] == "not scored"
    assert (run_dir / "submission.csv").read_text() == (tiny_run[0] / "submission.csv").read_text()
    run.manifest = files.read_json(run_dir / "manifest.json")
    assert "public test list" not in runner.results_table(run)


def test_saved_ensemble_predicts_new_persons_with_its_manifest(tiny_run, aicup_data):
    from replicate.ensemble import Ensemble

    run_dir, _, _ = tiny_run
    ensemble = Ensemble.load(run_dir)
    assert len(ensemble.members) == 2 and ensemble.class_names[3] == "Neoplasm"
    split = aicup.load_data(aicup_data).tests[0]
    inputs = aicup.model_inputs(ensemble.manifest, split.paths, split.clinical)
    assert inputs["mfcc_17"].shape == (8, 17, 126, 1) and inputs["clinical"].shape == (8, 44)
    # the cache's bits through the same members in the same batch: the run's own probabilities, exactly
    saved = np.load(run_dir / "predictions.npz")
    np.testing.assert_array_equal(ensemble.predict_members(inputs), saved["multimodal__public"])
    with pytest.raises(aicup.DataError, match=r"^the run is multimodal: .* give the persons' clinical table"):
        ensemble.features(split.paths[:3])
    audio_only = Ensemble.load(run_dir, groups=["audio_only/mfcc13", "audio_only/mfcc17"])
    audio_inputs = aicup.model_inputs(audio_only.manifest, split.paths)
    np.testing.assert_array_equal(audio_only.predict_members(audio_inputs), saved["audio_only__public"])
    # the audio-only groups of a multimodal run predict from the wav files alone (in the list's order: same bits)
    table = audio_only.predict_table([str(path) for path in split.paths])
    assert table["label"].tolist() == aicup.vote(saved["audio_only__public"]).tolist()


def test_the_predict_command_votes_per_person_and_names_a_bad_file_in_one_line(tiny_run, aicup_data, tmp_path):
    run_dir, _, _ = tiny_run
    public = aicup.load_data(aicup_data).tests[0]
    out = tmp_path / "predictions.csv"
    # The wav files in the list's order: the batch the run predicted, so the probabilities are the same bits.
    wavs = [str(path) for path in public.paths]
    result = run_predict(run_dir, public.table, *wavs, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"predictions: {out} (8 rows, 2 members)\n"
    table = pd.read_csv(out, dtype=str)
    assert list(table.columns) == ["ID", "file", "label", "diagnosis", *aicup.CLASS_NAMES]
    assert table["ID"].tolist() == public.ids and table["file"].tolist() == wavs
    # The same inputs (the cache's bits) through the same members: the run's vote and mean probabilities.
    submitted = dict(line.split(",") for line in (run_dir / "submission.csv").read_text().splitlines())
    assert table["label"].tolist() == [submitted[identifier] for identifier in table["ID"]]
    assert table["diagnosis"].tolist() == [aicup.CLASS_NAMES[int(label) - 1] for label in table["label"]]
    mean = dict(zip(public.ids, np.load(run_dir / "predictions.npz")["multimodal__public"].mean(axis=0), strict=True))
    expected = [[f"{value:.8f}" for value in mean[identifier]] for identifier in table["ID"]]
    assert table[list(aicup.CLASS_NAMES)].to_numpy().tolist() == expected

    bad = tmp_path / f"{public.ids[0]}.wav"
    bad.write_bytes(b"RIFF....WAVEgarbage")
    result = run_predict(run_dir, public.table, bad, "--out", tmp_path / "none.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: 1 of 1 audio files cannot be used: {bad}: ")
    assert not (tmp_path / "none.csv").exists()


def test_predicting_names_what_is_missing_in_one_line(tiny_run, aicup_data, tmp_path, capsys):
    run_dir, _, _ = tiny_run
    public = aicup.load_data(aicup_data).tests[0]
    out = str(tmp_path / "none.csv")
    assert predict.main([str(run_dir), str(public.paths[0]), "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"error: {run_dir}: the run is multimodal: its members also take each person's clinical fields; give the "
        "persons' clinical table (a CSV in the competition's columns) with the wav files\n"
    )
    stranger = tmp_path / "stranger.wav"
    shutil.copy(public.paths[0], stranger)
    assert predict.main([str(run_dir), str(public.table), str(public.paths[1]), str(stranger), "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"error: {public.table}: no row for the wav files {stranger} (a row per person, its ID the file's name)\n"
    )
    assert predict.main([str(run_dir), str(public.table), str(public.table), str(public.paths[1]), "--out", out]) == 2
    assert capsys.readouterr().err.startswith("error: one clinical table at most; given ")
    assert not (tmp_path / "none.csv").exists()


def test_an_audio_only_run_in_mixed_bfloat16_predicts_from_wav_files_alone(tiny_run, aicup_data, tmp_path):
    _, recipe, _ = tiny_run
    overrides = [f"run.cache_dir='{recipe['run']['cache_dir']}'", "run.workers=1", "train.epochs=1"]
    overrides += [
        "train.batch_size=8",
        "features.n_mfcc=[13]",
        "model.clinical=false",
        "train.precision=mixed_bfloat16",
    ]
    run_dir = aicup.run(
        aicup.load_recipe(overrides=overrides), aicup_data, tmp_path / "run", progress=False, log=lambda _: None
    )
    manifest = files.read_json(run_dir / "manifest.json")
    assert manifest["inputs"] == {"mfcc_13": [13, 126, 1]} and len(manifest["members"]) == 1
    member = keras.models.load_model(run_dir / manifest["members"][0]["file"], safe_mode=True)
    assert member.get_layer("block1_conv").compute_dtype == "bfloat16"  # trained in bfloat16
    assert member.outputs[0].dtype == "float32"  # the softmax (and the loss) in full precision
    public = aicup.load_data(aicup_data).tests[0]
    out = tmp_path / "predictions.csv"
    # the list's order: the batch the run predicted (bfloat16 results may depend on a row's batch neighbours)
    assert predict.main([str(run_dir), *map(str, public.paths), "--out", str(out)]) == 0
    table = pd.read_csv(out, dtype={"ID": str, "label": str})
    submitted = dict(line.split(",") for line in (run_dir / "submission.csv").read_text().splitlines())
    assert table["ID"].tolist() == public.ids
    assert table["label"].tolist() == [submitted[identifier] for identifier in table["ID"]]


def test_fused_members_are_refused_before_any_trains(tiny_run, aicup_data, tmp_path, capsys):
    """Each member keeps its best epoch by a callback of its own, which fused members cannot run."""
    _, recipe, _ = tiny_run
    arguments = ["--data", str(aicup_data), "--profile", "quick", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    settings = (f"run.cache_dir='{recipe['run']['cache_dir']}'", "features.n_mfcc=[13, 17]", "train.batch_size=8")
    for setting in (*settings, "train.fused=2"):
        arguments += ["--set", setting]
    assert aicup.main(arguments) == 2
    assert capsys.readouterr().err == f"error: {train.fused_refusal(aicup.load_recipe(overrides=['train.fused=2']))}\n"
    assert not (tmp_path / "run" / "multimodal").exists()


def test_member_loads_in_a_fresh_process(tiny_run):
    run_dir, _, _ = tiny_run
    member = run_dir / "multimodal" / "mfcc13" / "members" / "seed-00.keras"
    run_python(
        "import keras\n"
        f"model = keras.models.load_model({str(member)!r}, safe_mode=True)\n"
        "assert sorted(t.name for t in model.inputs) == ['clinical', 'mfcc_13'], model.inputs\n",
        cwd=run_dir,
    )


def test_running_again_keeps_the_members(tiny_run, aicup_data):
    run_dir, recipe, _ = tiny_run
    lines = []
    aicup.run(recipe, aicup_data, run_dir, progress=False, log=lines.append)
    assert sum("already trained, kept" in line for line in lines) == 4  # 2 variants × 2 modalities


def test_command_line_reports_bad_data_in_one_line(aicup_data, tmp_path, capsys):
    assert aicup.main(["--data", str(tmp_path / "missing"), "--profile", "quick"]) == 2
    assert "error: " in capsys.readouterr().err
    arguments = ["--data", str(aicup_data), "--run-dir", str(tmp_path / "run"), "--set", f"run.cache_dir='{tmp_path}'"]
    assert aicup.main([*arguments, "--set", "train.batch_size=64", "--set", "features.n_mfcc=[13]"]) == 2
    assert "30 training persons make no full batch of train.batch_size = 64" in capsys.readouterr().err
