"""The models and the fused ensembles are plain Keras: they run on PyTorch without TensorFlow.

PyTorch comes with the dev extra where its CPU wheel is at hand (x86_64, Python 3.11); elsewhere these skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import training
from models.aicup import build_aicup_model
from models.dacon import build_dacon_model
from tests import aicup_reference
from tests.conftest import ROOT

# TensorFlow made unimportable: a machine with only JAX or PyTorch must be able to run this. The GPU box
# (benchmarks/gpu.sh) has no librosa or soundfile either: the models and the training benchmark need neither.
# Every import finder is wrapped to find none of them, as if they were not installed: `import` fails and
# `importlib.util.find_spec` gives None (PyTorch probes for TensorFlow so). Putting None in sys.modules would
# not do: Keras's preprocessing layers (Resizing) take "tensorflow" in sys.modules for a loaded TensorFlow.
WITHOUT_TENSORFLOW = (
    "import sys\n"
    "class _Without:\n"
    "    def __init__(self, finder):\n"
    "        self.finder = finder\n"
    "    def __getattr__(self, name):\n"
    "        return getattr(self.finder, name)\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.partition('.')[0] in ('tensorflow', 'librosa', 'soundfile'):\n"
    "            return None\n"
    "        return self.finder.find_spec(name, path, target)\n"
    "sys.meta_path[:] = [_Without(finder) for finder in sys.meta_path]\n"
)

# Each training benchmark's recipe, small: a profile and overrides (a new entry of MODELS needs one here).
SMALL_MODELS = {
    "dacon": (None, ["data.clip_samples=6400"]),  # 41 frames
    "aicup": (None, []),
    "maic": ("quick", ["model.resized_mel_bins=256"]),  # with the source's Resizing to 256 rows
    "dcase": ("quick", ["model.blocks=[1,1,1,1]"]),
}


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
@pytest.mark.parametrize("recipe", ["dacon", "aicup"])
def test_saved_members_predict_the_same_on_torch_and_fuse_there(tmp_path, recipe):
    rng = np.random.default_rng(0)
    if recipe == "dacon":
        model = build_dacon_model(input_shape=(32, 32, 4))
        inputs = {"log_mel": rng.normal(size=(3, 32, 32, 4)).astype(np.float32)}
    else:
        model = build_aicup_model(n_mfcc=13)
        inputs = {"mfcc_13": rng.normal(size=(3, 13, 126, 1)), "clinical": rng.normal(size=(3, 44))}
        inputs = {key: value.astype(np.float32) for key, value in inputs.items()}
    model.save(tmp_path / "member.keras")
    np.savez(tmp_path / "inputs.npz", **inputs)
    np.save(tmp_path / "tensorflow.npy", model.predict(inputs, verbose=0))
    # Two float32 implementations of one function sum in other orders. Rounding errors behave like a random walk
    # (Higham, ch. 3: √n·u for n terms), each of the ~40 layers sums at most 3·3·512 terms of activations that
    # BatchNormalization keeps near 1, and the softmax outputs are in [0, 1]: 40·√4608·u ≈ 1.6e-4. A layer
    # computed differently (a wrong axis, padding or activation) moves the probabilities by 1e-2 or more.
    atol = 40 * np.sqrt(3 * 3 * 512) * np.finfo(np.float32).eps / 2
    output = _run(
        "torch",
        "import numpy as np, keras\n"
        "from replicate import fused\n"
        "assert keras.backend.backend() == 'torch'\n"
        f"member = keras.models.load_model({str(tmp_path / 'member.keras')!r})\n"
        f"inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))\n"
        f"np.testing.assert_allclose(member.predict(inputs, verbose=0), np.load({str(tmp_path / 'tensorflow.npy')!r}),"
        f" atol={atol})\n"
        "model = fused.pack(fused.fuse(member, 2, 'grouped'), [member, member])\n"
        "stacked = {key: np.concatenate([value, value[::-1]], axis=-1) for key, value in inputs.items()}\n"
        "outputs = model.predict(stacked, verbose=0)\n"
        "reversed_inputs = {key: value[::-1] for key, value in inputs.items()}\n"
        f"np.testing.assert_allclose(outputs[1], member.predict(reversed_inputs, verbose=0), atol={atol})\n"
        "print('ok', [o.shape for o in outputs])\n",
    )
    assert f"ok [(3, {model.output_shape[-1]}), (3, {model.output_shape[-1]})]" in output


@TORCH
def test_every_training_benchmark_trains_on_torch_fused_grouped_and_in_bfloat16():
    """What benchmarks/gpu.sh runs, small: each model one member in float32, then fused (grouped, the GPU
    layout) in mixed_bfloat16, or one member where the model is not fused."""
    assert set(SMALL_MODELS) == set(training.MODELS)
    output = _run(
        "torch",
        "from benchmarks import training\n"
        f"for name, (profile, overrides) in {SMALL_MODELS!r}.items():\n"
        "    options = dict(steps=1, batch_size=2, profile=profile, overrides=overrides, cpu_limits=False)\n"
        "    options['min_seconds'] = 0\n"
        "    print(training.measure(name, **options))\n"
        "    fused = 2 if training.MODELS[name].fuse else 1\n"
        "    print(training.measure(name, fused=fused, layout='grouped', precision='mixed_bfloat16', **options))\n",
    )
    lines = output.strip().splitlines()
    assert len(lines) == 2 * len(SMALL_MODELS) and all("'skipped'" not in line for line in lines), output
    assert all("'backend': 'torch'" in line and "'samples_per_second': " in line for line in lines)
    assert "'model': 'maic', 'backend': 'torch', 'device': 'cpu', 'precision': 'mixed_bfloat16'" in output
    assert "'fused': 2, 'layout': 'grouped'" in output


@TORCH  # the source's network is a PyTorch module, whatever the backend under test
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_aicup_model_loss_and_sgd_step_match_the_source_network(backend):
    """What tests/test_models_aicup.py checks under TensorFlow, under each other installed backend: above all
    that the recipe's loss takes the softmax output for logits there too, as the source's CrossEntropyLoss did."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    output = _run(
        backend,
        "import json, keras\n"
        f"assert keras.backend.backend() == {backend!r}\n"
        "from tests import aicup_reference\n"
        "print(json.dumps(aicup_reference.compare_with_source()))\n",
    )
    aicup_reference.assert_matches_source(json.loads(output.strip().splitlines()[-1]))
