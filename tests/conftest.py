"""Shared fixtures: quiet TensorFlow, a tiny synthetic DACON data set, and fresh-process runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dacon_data(tmp_path_factory) -> Path:
    """A tiny DACON-format data set (24 train, 8 test clips) in the competition's exact layout."""
    from replicate.synth import dacon

    out_dir = tmp_path_factory.mktemp("dacon-data")
    dacon.generate(out_dir, n_train=24, n_test=8, seed=5, progress=False)
    return out_dir


def write_tone(path: Path, seconds: float = 1.0, sample_rate: int = 16000, channels: int = 1, subtype="PCM_16"):
    """A 440 Hz tone (stereo: a second channel of 660 Hz)."""
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = np.stack([0.3 * np.sin(2 * np.pi * (440 + 220 * c) * time) for c in range(channels)], axis=1)
    sf.write(path, signal, sample_rate, subtype=subtype)
    return path


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run code in a fresh Python process (nothing of this test process imported), failing loudly."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_predict(*arguments) -> subprocess.CompletedProcess:
    """`python -m replicate.predict ARGUMENTS...` in a fresh process, as a user runs it; its exit code is the
    caller's to check."""
    command = [sys.executable, "-m", "replicate.predict", *map(str, arguments)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
