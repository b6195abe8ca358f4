"""What importing and installing the package does: TensorFlow's log level, Keras registration, file modes,
and the Makefile's install stamps."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from replicate import files
from tests.conftest import ROOT


def _fresh(code: str, **environment: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env.update({key: value for key, value in environment.items() if value is not None})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)


def test_the_log_level_is_set_before_tensorflow_and_a_users_own_is_kept():
    import replicate

    code = "import os, replicate, tensorflow as tf; tf.constant(1) + 1; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    quiet = _fresh(code)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == replicate.tensorflow_log_level()
    assert "cuInit" not in quiet.stderr and "E0000" not in quiet.stderr  # a CPU run has no error line
    own = _fresh(code, TF_CPP_MIN_LOG_LEVEL="1")
    assert own.stdout.strip() == "1"


@pytest.mark.parametrize("imports", ["import replicate, keras", "import keras, replicate"])
def test_import_replicate_is_enough_to_load_a_model_with_the_packages_layers(tmp_path, imports):
    from replicate.layers import CosineMarginClassifier, WarmupCosineRestarts

    embeddings, labels = keras.Input((8,)), keras.Input((3,))
    model = keras.Model([embeddings, labels], CosineMarginClassifier(3, name="classifier")([embeddings, labels]))
    model.compile(optimizer=keras.optimizers.Adam(WarmupCosineRestarts(1e-3, steps_per_epoch=2)), loss="mse")
    model.save(tmp_path / "training.keras")
    code = (
        f"{imports}\n"
        f"model = keras.models.load_model({str(tmp_path / 'training.keras')!r}, safe_mode=True)\n"
        "print(type(model.get_layer('classifier')).__name__, type(model.optimizer._learning_rate).__name__)\n"
        "print(type(keras.__loader__).__name__)\n"
    )
    loaded = _fresh(code)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    layer_and_schedule, loader = loaded.stdout.splitlines()
    assert layer_and_schedule == "CosineMarginClassifier WarmupCosineRestarts"
    assert loader == "SourceFileLoader"  # Keras's own loader, put back after the registration


def test_reading_data_and_recipes_imports_neither_keras_nor_tensorflow():
    code = (
        "import sys, replicate.recipe, replicate.audio, replicate.features, replicate.synth.dacon, replicate.dacon\n"
        "import replicate.synth.aicup, replicate.aicup\n"
        "print(sorted(name for name in ('keras', 'tensorflow') if name in sys.modules))\n"
    )
    result = _fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        text = files.write_text(tmp_path / "a.txt", "x")
        table = files.write_json(tmp_path / "b.json", {"a": 1})
        with files.atomic_path(tmp_path / "c.npz", suffix=".npz") as temporary:
            np.savez(temporary, a=np.zeros(2))
        with open(tmp_path / "plain.txt", "w") as handle:  # what Python's own open() gives
            handle.write("x")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for path in (text, table, tmp_path / "c.npz"):
        assert path.stat().st_mode & 0o777 == expected, path
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "b.json", "c.npz", "plain.txt"]


def _dry_run(target: str, venv) -> str:
    """The commands `make <target>` would run for a fresh clone (no virtual environment yet)."""
    result = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "-C", str(ROOT), target, f"VENV={venv}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode, reason="no make")
def test_recipes_install_the_runtime_and_tests_add_the_dev_tools(tmp_path):
    venv = tmp_path / "venv"
    recipe = _dry_run("recipe-dacon", venv)
    assert '-e ".[synth]"' in recipe and ".[dev" not in recipe
    assert "python -m replicate.dacon" in recipe
    for target in ("test", "lint", "bench"):
        commands = _dry_run(target, venv)
        assert '-e ".[synth]"' in commands and '-e ".[dev,synth]"' in commands, target
