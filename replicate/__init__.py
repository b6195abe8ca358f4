"""Replication engine for four award-winning audio-classification solutions.

Importing the package (any module of it) does two things, in this order:

- It sets TensorFlow's C++ log level, unless the environment already has `TF_CPP_MIN_LOG_LEVEL` (yours is
  kept), before TensorFlow can be imported: see `tensorflow_log_level`.
- It registers the package's custom Keras objects (`replicate.layers`: the DCASE margin classifier and its
  learning-rate schedule). Keras imports a module named in a saved model's config only for its own packages
  (keras, keras_hub, ...), so a model containing them loads with `keras.models.load_model` once
  `import replicate` has run; the ensembles' members contain none and load with Keras alone.
"""

from __future__ import annotations

import glob
import os


def tensorflow_log_level() -> str:
    """The level for `TF_CPP_MIN_LOG_LEVEL`: "2" (errors only) where an NVIDIA device is present, else "3".

    Level 2 hides TensorFlow's start-up info and warning lines (CPU instruction sets, oneDNN). Without an
    NVIDIA device TensorFlow's CUDA build still calls cuInit and logs its failure at error level
    ("E0000 ... failed call to cuInit"), which on a CPU run is no error at all: level 3 hides that too. Where a
    GPU is present its errors (cuDNN, XLA) are news, so they stay. (Two info lines, each printed twice, come
    from TensorFlow's libraries as they load, before any setting is read: "oneDNN custom operations are on"
    and, without a GPU driver, "Could not find cuda drivers on your machine, GPU will not be used".)
    """
    devices = glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/nvidiactl") + glob.glob("/dev/dxg")  # dxg: WSL 2
    return "2" if devices else "3"


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tensorflow_log_level())

from replicate import layers  # noqa: E402, F401  (registers the custom objects with Keras; needs the level set)
