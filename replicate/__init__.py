"""Replication engine for four award-winning audio-classification solutions.

Importing the package (any module of it) does two cheap things:

- It sets TensorFlow's C++ log level, unless the environment already has `TF_CPP_MIN_LOG_LEVEL` (yours is
  kept), before TensorFlow can be imported: see `tensorflow_log_level`.
- It makes sure Keras knows the package's custom objects (`replicate.layers`: the DCASE margin classifier
  and its learning-rate schedule) whenever Keras is imported, before or after `replicate`, so a saved model
  that contains them loads with `keras.models.load_model` once `import replicate` has run. Keras imports
  the module named in a saved model's config only for its own packages (keras, keras_hub, keras_cv,
  keras_nlp), so it cannot find them by itself. The package does not import Keras for this: reading data,
  recipes and features stays free of Keras and TensorFlow (their import costs seconds and about 650 MB).
  The ensembles' members contain no custom object and load with Keras alone.
"""

from __future__ import annotations

import glob
import importlib
import importlib.abc
import importlib.util
import os
import sys


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


class _RegisterWithKeras(importlib.abc.MetaPathFinder):
    """Imports `replicate.layers` right after Keras's own import finishes (the first `import keras`)."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # once, and so that finding Keras's own spec below does not come back here
        spec = importlib.util.find_spec("keras")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """Keras's loader, followed by the registration; it puts Keras's loader back, leaving no trace."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        importlib.import_module("replicate.layers")


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tensorflow_log_level())
if "keras" in sys.modules:
    importlib.import_module("replicate.layers")
else:
    sys.meta_path.insert(0, _RegisterWithKeras())
