"""The models and the fused ensembles are plain Keras: they run on PyTorch without TensorFlow.

PyTorch comes with the dev extra where its CPU wheel is at hand (x86_64, Python 3.11); elsewhere these skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# TensorFlow made unimportable: a machine with only JAX or PyTorch must be able to run this.
WITHOUT_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None\n"


def _run(backend: str, code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


@TORCH
def test_models_and_fused_models_predict_on_torch():
    output = _run(
        "torch",
        "import numpy as np, keras\n"
        "from models.dacon import build_dacon_model\n"
        "from replicate import fused\n"
        "assert keras.backend.backend() == 'torch'\n"
        "members = [build_dacon_model(input_shape=(32, 32, 4)) for _ in range(2)]\n"
        "model = fused.pack(fused.fuse(members[0], 2), members)\n"
        "x = np.random.default_rng(0).normal(size=(3, 32, 32, 8)).astype('float32')\n"
        "outputs = model.predict(x, verbose=0)\n"
        "np.testing.assert_allclose(outputs[1], members[1].predict(x[..., 4:], verbose=0), atol=1e-5)\n"
        "print('ok', [o.shape for o in outputs])\n",
    )
    assert "ok [(3, 30), (3, 30)]" in output


@TORCH
def test_the_training_benchmark_trains_a_fused_ensemble_on_torch():
    output = _run("torch", "from benchmarks import training; print(training.measure('dacon', fused=2, steps=1))")
    assert "'backend': 'torch'" in output and "'fused': 2" in output
