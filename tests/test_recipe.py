"""Recipes: profiles, overrides and validation errors that name the key."""

from __future__ import annotations

import pytest

from replicate import dacon
from replicate.recipe import RecipeError, load_recipe, parse_override


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
