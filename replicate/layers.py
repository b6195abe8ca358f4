"""Registered custom layers and schedules, for what Keras has no built-in: keras.ops only, complete get_config.

- `CosineMarginClassifier`: the ArcFace / CosFace cosine-margin classifier (DCASE 2020 Task 2 recipe).
- `WarmupCosineRestarts`: linear warm-up + cosine annealing with warm restarts, per optimizer step.

Both load with `keras.models.load_model(..., safe_mode=True)` once this module is imported. Saved
ensemble members do not contain them (see `models.dcase.inference_model`), so members load without it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

MARGINS = ("arcface", "cosface")


@keras.saving.register_keras_serializable(package="replicate")
class CosineMarginClassifier(keras.layers.Layer):
    """Scaled cosine logits with an additive angular (ArcFace) or cosine (CosFace) margin on the target.

    Called on `[embeddings, labels]` at training time: logits = s · (cos θ_j + y_j · (ψ(θ_j) − cos θ_j)),
    where θ_j is the angle between the embedding and class j's weight vector, ψ(θ) = cos(θ + m) for
    ArcFace and cos θ − m for CosFace. With one-hot labels this is exactly the margin on the target class;
    with mixup labels (λ on one class, 1 − λ on another) each class gets its share λ of the margin (the
    mixed logit interpolates the two margins' logits), so the margin follows the label the loss is given.
    Called on embeddings alone it returns the plain cosine logits s · cos θ (what scoring uses).

    cos θ is clipped to [−1 + ε, 1 − ε] before arccos, and everything is computed in float32 even under
    a mixed-precision policy (the layer's dtype defaults to float32), so the logits never become NaN.

    Args:
        num_classes: number of classes (machine IDs).
        margin_type: "arcface" or "cosface".
        scale: s, the logit scale (the DCASE source: 30).
        margin: m, radians for ArcFace, cosine units for CosFace (the DCASE source: 0.05).
        epsilon: clipping of cos θ away from ±1.
        kernel_initializer: initializer of the (embedding_dim, num_classes) weights.

    Example:
        >>> layer = CosineMarginClassifier(41)
        >>> layer([keras.random.normal((8, 128)), keras.ops.one_hot(keras.ops.arange(8), 41)]).shape
        (8, 41)
        >>> layer(keras.random.normal((8, 128))).shape  # plain s · cos θ
        (8, 41)
    """

    def __init__(
        self,
        num_classes: int,
        margin_type: str = "arcface",
        scale: float = 30.0,
        margin: float = 0.05,
        epsilon: float = 1e-7,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if margin_type not in MARGINS:
            raise ValueError(f"margin_type must be one of {MARGINS}, got {margin_type!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.num_classes = int(num_classes)
        self.margin_type = margin_type
        self.scale = float(scale)
        self.margin = float(margin)
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        embedding_shape = _embedding_shape(input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(embedding_shape[-1]), self.num_classes),
            initializer=self.kernel_initializer,
            dtype="float32",
        )

    def cosine(self, embeddings):
        """cos θ between every embedding and every class weight vector: (batch, num_classes), float32."""
        embeddings = ops.normalize(ops.cast(embeddings, "float32"), axis=-1, order=2, epsilon=1e-12)
        weights = ops.normalize(ops.cast(self.kernel, "float32"), axis=0, order=2, epsilon=1e-12)
        return ops.clip(ops.matmul(embeddings, weights), -1.0 + self.epsilon, 1.0 - self.epsilon)

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            embeddings, labels = inputs
        else:
            embeddings, labels = inputs, None
        cosine = self.cosine(embeddings)
        if labels is None:
            return self.scale * cosine
        if self.margin_type == "arcface":
            # cos(θ + m), with θ + m held at π so the target logit never rises again past π.
            target = ops.cos(ops.minimum(ops.arccos(cosine) + self.margin, math.pi))
        else:
            target = cosine - self.margin
        labels = ops.cast(labels, "float32")
        return self.scale * (cosine + labels * (target - cosine))

    def compute_output_shape(self, input_shape):
        embedding_shape = _embedding_shape(input_shape)
        return (*tuple(embedding_shape[:-1]), self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "margin_type": self.margin_type,
                "scale": self.scale,
                "margin": self.margin,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config


def _embedding_shape(input_shape):
    """The embeddings' shape from a layer's input shape: one shape, or [embeddings, labels] shapes."""
    nested = isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple))
    return input_shape[0] if nested else input_shape


@keras.saving.register_keras_serializable(package="replicate")
class WarmupCosineRestarts(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine annealing with warm restarts (SGDR) and a linear warm-up at the start of every cycle.

    Cycle i lasts T_0 · T_mult^i epochs. Within a cycle the rate rises linearly from `min_lr` to the
    cycle's peak (`max_lr` · gamma^i) over the first `warmup_epochs`, then falls along half a cosine back
    to `min_lr` at the cycle's end, where the next cycle restarts the warm-up. This is the intended
    schedule of the DCASE source's custom scheduler (max_lr 2e-4, T_up 2, T_0 10, T_mult 2); the rate is
    updated every optimizer step (fractional epochs), as PyTorch's per-batch `scheduler.step(epoch + i / n)`.

    Args:
        max_lr: peak learning rate of the first cycle.
        steps_per_epoch: optimizer steps per epoch.
        first_cycle_epochs: T_0.
        cycle_mult: T_mult (an integer ≥ 1 as in PyTorch's CosineAnnealingWarmRestarts).
        warmup_epochs: T_up, shorter than the first cycle.
        min_lr: the floor (start of each warm-up and end of each cycle).
        gamma: peak decay per cycle (1.0: every cycle peaks at max_lr).

    Example:
        >>> schedule = WarmupCosineRestarts(2e-4, steps_per_epoch=100)
        >>> [round(float(schedule(step)), 6) for step in (0, 200, 600, 1000)]   # start, peak, mid-cycle, restart
        [0.0, 0.0002, 0.0001, 0.0]
    """

    def __init__(
        self,
        max_lr: float,
        steps_per_epoch: int,
        first_cycle_epochs: float = 10,
        cycle_mult: int = 2,
        warmup_epochs: float = 2,
        min_lr: float = 0.0,
        gamma: float = 1.0,
    ):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if first_cycle_epochs <= 0:
            raise ValueError(f"first_cycle_epochs must be > 0, got {first_cycle_epochs}")
        if int(cycle_mult) != cycle_mult or cycle_mult < 1:
            raise ValueError(f"cycle_mult must be an integer >= 1, got {cycle_mult}")
        if not 0 <= warmup_epochs < first_cycle_epochs:
            raise ValueError(f"warmup_epochs must be in [0, first_cycle_epochs), got {warmup_epochs}")
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr {min_lr}, max_lr {max_lr}")
        self.max_lr = float(max_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.first_cycle_epochs = float(first_cycle_epochs)
        self.cycle_mult = int(cycle_mult)
        self.warmup_epochs = float(warmup_epochs)
        self.min_lr = float(min_lr)
        self.gamma = float(gamma)

    def __call__(self, step):
        epoch = ops.cast(step, "float32") / self.steps_per_epoch
        first = self.first_cycle_epochs
        if self.cycle_mult == 1:
            cycle = ops.floor(epoch / first)
            cycle_start = cycle * first
            cycle_length = ops.full_like(epoch, first)
        else:
            mult = float(self.cycle_mult)
            # The small offset keeps an exact restart (e.g. epoch 10) in the new cycle despite rounding.
            cycle = ops.floor(ops.log(epoch / first * (mult - 1.0) + 1.0) / math.log(mult) + 1e-6)
            cycle_start = first * (ops.power(mult, cycle) - 1.0) / (mult - 1.0)
            cycle_length = first * ops.power(mult, cycle)
        in_cycle = ops.maximum(epoch - cycle_start, 0.0)
        peak = self.max_lr * ops.power(self.gamma, cycle)
        warmup = self.warmup_epochs
        rising = self.min_lr + (peak - self.min_lr) * in_cycle / max(warmup, 1e-12)
        progress = (in_cycle - warmup) / (cycle_length - warmup)
        falling = self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(in_cycle < warmup, rising, falling)

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "first_cycle_epochs": self.first_cycle_epochs,
            "cycle_mult": self.cycle_mult,
            "warmup_epochs": self.warmup_epochs,
            "min_lr": self.min_lr,
            "gamma": self.gamma,
        }
