"""A member killed at an epoch boundary and resumed ends with exactly the files of an uninterrupted run
(same machine): the saved weights bit for bit and the same history, for a member of every recipe.

Each test runs the recipe's own `run` on a tiny synthetic data set up to the point where it trains, and
takes what it hands the training engine: its dataset builder (shuffle, crops, mixup), model builder
(dropout), validation data and per-member callbacks (best epoch, ReduceLROnPlateau, early stopping).
"""

from __future__ import annotations

import inspect

import pytest

from models.dacon import build_dacon_model
from replicate import aicup, dacon, dcase, maic, train
from tests.test_dcase import TINY_RUN as DCASE_TINY
from tests.test_maic import TINY as MAIC_TINY
from tests.test_train import assert_resume_equals_uninterrupted, fill_the_disk_at_checkpoint


class _Captured(Exception):
    def __init__(self, recipe, seeds, member_arguments):
        super().__init__("captured")
        self.recipe, self.seeds, self.member_arguments = recipe, seeds, member_arguments


def _member_setup(monkeypatch, run, recipe, data, run_dir):
    """The recipe and member arguments that `run` gives `train.train_ensemble` first (it then stops)."""

    def capture(recipe, seeds, **arguments):  # the member's own arguments, not the ensemble's (run_dir, log...)
        member_parameters = set(inspect.signature(train.train_member).parameters) - {"run_dir", "log"}
        raise _Captured(recipe, seeds, {k: v for k, v in arguments.items() if k in member_parameters})

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_ensemble", capture)
        with pytest.raises(_Captured) as captured:
            run(recipe, data, run_dir, progress=False, log=lambda _: None)
    return captured.value.recipe, captured.value.seeds[0], captured.value.member_arguments


def test_a_dacon_member_resumes_as_if_never_killed(dacon_data, tmp_path, monkeypatch):
    recipe = dacon.load_recipe("quick", [f"run.cache_dir='{tmp_path / 'cache'}'", "run.workers=1", "ensemble.seeds=1"])
    recipe, seed, arguments = _member_setup(monkeypatch, dacon.run, recipe, dacon_data, tmp_path / "run")
    # The source's layer kinds (dropout 0.5 included), one block of each: building and tracing the full
    # network three times would take most of the test's time.
    features, targets = arguments["train_data"](seed, 0).element_spec
    arguments["build_model"] = lambda seed: build_dacon_model(
        input_shape=tuple(features.shape[1:]),
        num_classes=targets.shape[-1],
        plain_filters=(4,),
        bottleneck_filters=((4, 8),),
        dense_units=8,
    )
    assert_resume_equals_uninterrupted(recipe, seed, arguments, tmp_path, kill_after=1)


@pytest.fixture(scope="module")
def maic_data(tmp_path_factory):
    from replicate.synth import maic as synth

    out = tmp_path_factory.mktemp("maic-data")
    synth.generate(out, n_train=14, n_test=6, seed=2, progress=False)
    return out


def test_a_maic_member_resumes_as_if_never_killed(maic_data, tmp_path, monkeypatch):
    # A learning-rate plateau of one epoch and early stopping after two: their counters cross the kill.
    overrides = [*MAIC_TINY, "train.epochs=3", "train.batch_size=8", "train.lr_patience=1"]
    overrides += ["train.early_stopping_patience=2", f"run.cache_dir='{tmp_path / 'cache'}'", "ensemble.seeds=1"]
    recipe = maic.load_recipe(None, overrides)
    recipe, seed, arguments = _member_setup(monkeypatch, maic.run, recipe, maic_data, tmp_path / "run")
    callbacks = arguments["member_callbacks"](tmp_path, "seed-00")
    assert {type(c).__name__ for c in callbacks} == {"BestEpoch", "ReduceLROnPlateau", "EarlyStopping"}
    assert_resume_equals_uninterrupted(recipe, seed, arguments, tmp_path, kill_after=2)


@pytest.fixture(scope="module")
def dcase_data(tmp_path_factory):
    from replicate.synth import dcase as synth

    out = tmp_path_factory.mktemp("dcase-data")
    synth.generate(
        out, machine_types=["valve"], dev_ids=1, eval_ids=1, train_per_id=8, test_per_id=3, seconds=0.5, progress=False
    )
    return out


def test_a_dcase_member_resumes_as_if_never_killed(dcase_data, tmp_path, monkeypatch):
    # Random crops, mixup, ArcFace, the warm-restart schedule (a function of the step count) and a score
    # every 2 epochs: killed after epoch 1, between two scores.
    overrides = [item for item in DCASE_TINY if not item.startswith("train.epochs")]
    overrides += ["train.epochs=3", "setup=integrated", f"run.cache_dir='{tmp_path / 'cache'}'", "ensemble.seeds=1"]
    overrides += ["features.input_frames=8"]  # of the 0.5-s clips' 16 frames
    recipe = dcase.load_recipe("quick", overrides)
    recipe, seed, arguments = _member_setup(monkeypatch, dcase.run, recipe, dcase_data, tmp_path / "run")
    assert_resume_equals_uninterrupted(recipe, seed, arguments, tmp_path, kill_after=1)


@pytest.fixture(scope="module")
def aicup_data(tmp_path_factory):
    from replicate.synth import aicup as synth

    out = tmp_path_factory.mktemp("aicup-data")
    synth.generate(out, n_train=40, n_public=4, n_private=4, seed=7, progress=False)
    return out


AICUP_TINY = ["run.workers=1", "train.epochs=3", "train.batch_size=8", "features.n_mfcc=[13]"]


def test_an_aicup_member_resumes_as_if_never_killed(aicup_data, tmp_path, monkeypatch):
    overrides = [*AICUP_TINY, f"run.cache_dir='{tmp_path / 'cache'}'", "ensemble.compare_modalities=false"]
    recipe = aicup.load_recipe("quick", overrides)
    recipe, seed, arguments = _member_setup(monkeypatch, aicup.run, recipe, aicup_data, tmp_path / "run")
    assert_resume_equals_uninterrupted(recipe, seed, arguments, tmp_path, kill_after=1)


def test_a_full_disk_during_training_is_one_line_and_exit_2(aicup_data, tmp_path, monkeypatch, capsys):
    fill_the_disk_at_checkpoint(monkeypatch, 1)
    arguments = ["--data", str(aicup_data), "--profile", "quick", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for setting in [*AICUP_TINY, f"run.cache_dir='{tmp_path / 'cache'}'"]:
        arguments += ["--set", setting]
    assert aicup.main(arguments) == 2
    [line] = capsys.readouterr().err.splitlines()
    checkpoint = tmp_path / "run" / "multimodal" / "mfcc13" / "checkpoints" / "seed-00" / "epoch-0001.npz"
    assert line.startswith(f"error: no space left on the device writing {checkpoint}; free some space")
    assert list(checkpoint.parent.iterdir()) == []  # nothing half-written is left to be trusted
