"""Registered losses, for what Keras has no built-in: keras.ops only, complete get_config.

- `DoubleSoftmaxCrossentropy`: PyTorch's `CrossEntropyLoss` applied to a softmax output (the AI CUP 2023
  source's training loss), reproduced on every backend.

Recipes name a loss by its class name (`train.loss`); `get` finds this module's losses and Keras's built-ins.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import ops

PACKAGE = "replicate"


@keras.saving.register_keras_serializable(package=PACKAGE)
class DoubleSoftmaxCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy that takes the model's probabilities for logits: a second softmax.

    The AI CUP 2023 source ended its network in `nn.Softmax` and trained it with `nn.CrossEntropyLoss`,
    which applies log-softmax to what it is given, so its loss was −log softmax(p)[y] of the probabilities
    p. Keras's `CategoricalCrossentropy(from_logits=True)` does not reproduce that under TensorFlow: it
    finds the logits that a softmax activation was computed from and uses them instead, giving the plain
    cross-entropy. This loss applies `log_softmax` to `y_pred` itself, the same on every backend.

    With `reduction="mean_with_sample_weight"` and each row weighted by its class's weight, the batch loss
    is Σᵢ w_yᵢ·lossᵢ / Σᵢ w_yᵢ, which is what `CrossEntropyLoss(weight=w)` computes.

    Args:
        reduction: as for every Keras loss, e.g. "sum_over_batch_size" or "mean_with_sample_weight".
        name: the loss's name.
        dtype: the dtype the loss is computed in (None: `keras.config.floatx()`).

    Example:
        >>> loss = DoubleSoftmaxCrossentropy()
        >>> float(loss([[0.0, 1.0]], [[0.0, 1.0]]))  # a sure, right answer: −log softmax([0, 1])[1] = log(1 + e⁻¹)
        0.3132616...
    """

    def __init__(self, reduction="sum_over_batch_size", name="double_softmax_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.dtype_argument = dtype

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        return -ops.sum(y_true * ops.log_softmax(y_pred, axis=-1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "dtype": self.dtype_argument}


def get(name: str, options: Mapping | None = None) -> keras.losses.Loss:
    """A loss by its recipe name (`train.loss`) and constructor arguments (`train.loss_options`): one of this
    module's (e.g. "DoubleSoftmaxCrossentropy") or a Keras built-in (e.g. "CategoricalCrossentropy")."""
    options = dict(options or {})
    own = keras.saving.get_registered_object(f"{PACKAGE}>{name}")
    if own is not None:
        return own(**options)
    return keras.losses.get({"class_name": name, "config": options})
