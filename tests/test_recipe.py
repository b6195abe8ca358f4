"""Recipes: profiles, overrides and validation errors that name the key."""

from __future__ import annotations

import pytest

from replicate import dacon
from replicate.recipe import RECIPES_DIR, RecipeError, load_recipe, parse_override


def test_source_values_are_the_default():
    recipe = dacon.load_recipe()
    assert recipe["train"] == {
        "epochs": 187,
        "batch_size": 16,
        "optimizer": "Keras2Nadam",
        "learning_rate": 0.002,
        "loss": "KLDivergence",
        "validation_fraction": 0.0,
        "recalibrate_batchnorm": False,
        "fused": 1,
        "fused_layout": "auto",
        "precision": "float32",
        "distribute": "none",
    }
    assert recipe["ensemble"]["seeds"] == 15
    assert recipe["features"]["n_fft"] == [256, 512, 1024, 2048]
    assert recipe["features"]["db_reference"] == "global" and recipe["features"]["normalization"] == "train_test"
    assert recipe["features"]["pad_mode"] == "reflect"
    assert recipe["run"]["profile"] == "full"


def test_profile_and_overrides():
    recipe = dacon.load_recipe(
        "quick", ["train.batch_size=32", "features.normalization=train", "train.learning_rate=1"]
    )
    assert recipe["ensemble"]["seeds"] == 2 and recipe["run"]["profile"] == "quick"
    assert recipe["train"]["batch_size"] == 32
    assert recipe["features"]["normalization"] == "train"
    assert recipe["train"]["learning_rate"] == 1.0 and isinstance(recipe["train"]["learning_rate"], float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=32", r"unknown key 'train.batchsize'; known keys here: train.epochs, train.batch_size"),
        ("trian.epochs=3", r"unknown key 'trian'"),
        ("train.epochs=three", r"'train.epochs' must be int like 187, got 'three'"),
        ("train.epochs=0", r"train.epochs = 0: must be > 0"),
        ("features.db_reference=local", r"features.db_reference = 'local': must be one of 'global', 'per_clip'"),
        ("train.optimizer=Nadam2", r"train.optimizer = 'Nadam2': must be one of 'Keras2Nadam', 'Nadam', 'Adam'"),
        ("train.validation_fraction=1.5", r"train.validation_fraction = 1.5: must be in \[0, 1\)"),
        ("data.resample=1", r"'data.resample' must be bool"),
        ("train=3", r"must look like section.key=value"),
        ("features.win_length=[200]", r"features.n_fft has 4 values but features.win_length has 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        dacon.load_recipe(overrides=[override])


def test_unknown_profile_and_recipe():
    with pytest.raises(RecipeError, match=r"unknown profile 'fast'; available: quick"):
        dacon.load_recipe("fast")
    with pytest.raises(RecipeError, match=r"recipe 'nope' not found .* available: (.*, )?dacon(,|$)"):
        load_recipe("nope")


def test_override_values_are_parsed_as_toml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=train") == ("a.b", "train")
    assert parse_override('a.b="x=y"') == ("a.b", "x=y")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=inf", r"train.learning_rate = inf: must be a finite number"),
        ("train.learning_rate=nan", r"train.learning_rate = nan: must be a finite number"),
        ("train.learning_rate=1e30", r"train.learning_rate = 1e\+30: must be in \(0, 10\]"),
        ("features.top_db=-inf", r"features.top_db = -inf: must be a finite number"),
        ("features.n_mels=100000", r"features.n_mels = 100000: must be at most 129, the frequency bins of .* 256"),
        ("ensemble.first_seed=99999999999", r"ensemble.first_seed = 99999999999: the seeds .* must be below 2\*\*32"),
        ("ensemble.seeds=0", r"ensemble.seeds = 0: must be > 0"),
        ("run.runs_dir=''", r"run.runs_dir = '': must be a non-empty string"),
    ],
)
def test_out_of_range_numbers_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        dacon.load_recipe(overrides=[override])


def test_learning_rates_of_every_task_and_section_are_bounded():
    from replicate import aicup, dcase, maic

    for module in (maic, dcase, aicup):
        with pytest.raises(RecipeError, match=r"train.learning_rate = 1e\+30"):
            module.load_recipe(overrides=["train.learning_rate=1e30"])
    with pytest.raises(RecipeError, match=r"finetune.learning_rate = 100.0: must be in \(0, 10\]"):
        dcase.load_recipe(overrides=["finetune.learning_rate=100.0"])
    with pytest.raises(RecipeError, match=r"train.min_lr = 50.0: must be in \[0, 10\]"):
        dcase.load_recipe(overrides=["train.min_lr=50.0"])
    assert dacon.load_recipe(overrides=["train.learning_rate=10"])["train"]["learning_rate"] == 10.0
    seeds = dacon.load_recipe(overrides=[f"ensemble.first_seed={2**32 - 15}"])["ensemble"]
    assert seeds["first_seed"] + seeds["seeds"] == 2**32  # the last seed, 2**32 - 1, is valid


def _write_recipe(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_recipe_file_of_ones_own_needs_every_key(tmp_path, capsys):
    package = (RECIPES_DIR / "dacon.toml").read_text(encoding="utf-8")
    without_train = package.replace("[train]", "[removed_train]", 1)
    path = _write_recipe(tmp_path / "mine.toml", without_train)
    with pytest.raises(RecipeError, match=r"mine.toml: missing train.epochs, train.batch_size, .* needs every key"):
        dacon.load_recipe(path=path)
    assert dacon.main(["--data", str(tmp_path), "--recipe", path]) == 2  # was KeyError: 'train'
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path}: missing train.epochs") and error.count("\n") == 1
    path = _write_recipe(tmp_path / "typed.toml", package.replace("batch_size = 16", 'batch_size = "16"'))
    with pytest.raises(RecipeError, match=r"typed.toml: 'train.batch_size' must be int"):
        dacon.load_recipe(path=path)
    path = _write_recipe(tmp_path / "ok.toml", package.replace("epochs = 187", "epochs = 5"))
    assert dacon.load_recipe(path=path)["train"]["epochs"] == 5
    assert dacon.load_recipe("quick", path=path)["ensemble"]["seeds"] == 2  # its own profiles


def test_the_task_value_must_be_the_commands_task(tmp_path):
    package = (RECIPES_DIR / "dacon.toml").read_text(encoding="utf-8")
    path = _write_recipe(tmp_path / "escape.toml", package.replace('task = "dacon"', 'task = "../../outside"'))
    with pytest.raises(RecipeError, match=r"escape.toml: task = '../../outside', but this command runs the 'dacon'"):
        dacon.load_recipe(path=path)
    with pytest.raises(RecipeError, match=r"task = 'maic', but this command runs the 'dacon' recipe"):
        dacon.load_recipe(path=str(RECIPES_DIR / "maic.toml"))
    resolved = _write_recipe(tmp_path / "resolved.toml", package.replace('task = "dacon"', 'task = "a/b"'))
    with pytest.raises(RecipeError, match=r"task = 'a/b' must be a plain lower-case name"):
        load_recipe(resolved)


def test_a_resolved_recipe_reads_back_as_a_recipe_of_its_task(tmp_path):
    from replicate import runner

    recipe = dacon.load_recipe("quick", ["train.epochs=2"])
    written = runner.write_recipe(tmp_path, recipe)
    assert dacon.load_recipe(path=str(written)) == recipe


@pytest.mark.parametrize("name", ["dacon", "maic", "dcase", "aicup"])
def test_the_engine_options_are_every_recipes(name):
    from replicate import tasks

    task = tasks.get(name)
    defaults = task.load_recipe()
    assert {key: defaults["train"][key] for key in ("fused", "fused_layout", "precision", "distribute")} == {
        "fused": 1,
        "fused_layout": "auto",
        "precision": "float32",
        "distribute": "none",
    }
    assert defaults["run"]["workers"] == 0 and defaults["run"]["cache_dir"] == ".cache/features"
    options = ["train.precision=mixed_bfloat16", "train.fused=2", "train.distribute=mirrored", "run.workers=1"]
    recipe = task.load_recipe(overrides=options)
    assert (recipe["train"]["precision"], recipe["train"]["fused"], recipe["run"]["workers"]) == (
        "mixed_bfloat16",
        2,
        1,
    )
    with pytest.raises(RecipeError, match=r"train.precision = 'float8': must be one of 'float32'"):
        task.load_recipe(overrides=["train.precision=float8"])


def test_a_recipe_file_of_ones_own_may_leave_the_engine_options_out(tmp_path):
    package = (RECIPES_DIR / "dacon.toml").read_text(encoding="utf-8")
    from replicate.recipe import tomllib  # tomli before Python 3.11

    parsed = tomllib.loads(package)  # the engine's options are declared once, in recipe.ENGINE_DEFAULTS
    assert "run" not in parsed and "precision" not in parsed["train"]
    path = _write_recipe(tmp_path / "mine.toml", package + "\n[run]\nworkers = 3\n")
    recipe = dacon.load_recipe(path=path)
    assert recipe["run"]["workers"] == 3 and recipe["train"]["precision"] == "float32"


def test_every_optimizer_and_loss_a_recipe_may_name_compiles_and_a_task_may_narrow_them():
    import keras

    from replicate import dcase, maic, optimizers, train
    from replicate.recipe import LOSS_NAMES, OPTIMIZER_NAMES

    assert set(optimizers.OPTIMIZERS) <= set(OPTIMIZER_NAMES)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    for optimizer in OPTIMIZER_NAMES:
        for loss in LOSS_NAMES:
            compiled = train.compile_model(model, {"optimizer": optimizer, "loss": loss, "learning_rate": 0.01})
            assert (type(compiled.optimizer).__name__, type(compiled.loss).__name__) == (optimizer, loss)
    # the engine's names hold for every recipe: MAIC may train with Keras 2's Nadam, as DACON does
    assert maic.load_recipe(overrides=["train.optimizer=Keras2Nadam"])["train"]["optimizer"] == "Keras2Nadam"
    with pytest.raises(RecipeError, match=r"train.loss = 'Focal': must be one of 'CategoricalCrossentropy'"):
        maic.load_recipe(overrides=["train.loss=Focal"])
    # DCASE's heads give logits: it keeps the losses that take `from_logits`
    with pytest.raises(RecipeError, match=r"train.loss = 'KLDivergence': must be one of 'CategoricalCrossentropy'"):
        dcase.load_recipe(overrides=["train.loss=KLDivergence"])
