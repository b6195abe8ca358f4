"""Registered optimizers, for what Keras 3 has no built-in: keras.ops only, complete get_config.

- `Keras2Nadam`: Nadam as Keras 2 and tf.keras 2.x ran it (the DACON recipe's optimizer).

Keras finds a registered class only once the module that registers it has run: loading a file, it imports
the module a saved config names only for its own packages (keras, keras_hub, keras_cv, keras_nlp). A model
compiled with one of these optimizers therefore loads after `import replicate.optimizers` (which
`replicate.train`, and so `replicate.ensemble`, do). Ensemble members are saved without the optimizer they
trained with (`replicate.train.loadable_anywhere`), so they load with plain Keras.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="replicate")
class Keras2Nadam(keras.optimizers.Optimizer):
    """Nadam with the momentum warm-up of Keras 2 and tf.keras 2.x (`keras.optimizers.Nadam` up to TF 2.10).

    Both Nadams warm the momentum up as μ_t = β1 · (1 − ½ · 0.96^(d·t)) at step t, but Keras 2 has d =
    `schedule_decay` = 0.004 where Keras 3 has d = 1: after 6,250 steps (one epoch of the DACON source) μ is
    0.738 here and 0.900 in Keras 3, which reaches 0.9 within about 100 steps. The update, per variable, in
    Keras 2's order of operations:

        Π_t = Π_{t-1} · μ_t                     (the momentum schedule, Π_0 = 1)
        m_t = β1 · m + (1 − β1) · g             v_t = β2 · v + (1 − β2) · g²
        m̄ = (1 − μ_t) · g / (1 − Π_t) + μ_{t+1} · m_t / (1 − Π_t · μ_{t+1})
        w ← w − lr · m̄ / (√(v_t / (1 − β2^t)) + ε)

    The defaults are Keras 2's (learning rate 0.002 as in standalone Keras 2 and the DACON source, epsilon
    1e-7 = Keras 2's `backend.epsilon()`).

    Args:
        learning_rate: the learning rate (a float or a `keras.optimizers.schedules.LearningRateSchedule`).
        beta_1: β1, the decay of the first moment and the momentum the warm-up approaches.
        beta_2: β2, the decay of the second moment.
        epsilon: ε, added to the square root of the second moment.
        schedule_decay: d, the rate of the momentum warm-up (Keras 2's `schedule_decay`).
        **kwargs: the base optimizer's arguments (`name`, `weight_decay`, `clipnorm`, `clipvalue`,
            `global_clipnorm`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`).

    Example:
        >>> optimizer = Keras2Nadam(learning_rate=0.002)
        >>> model.compile(optimizer=optimizer, loss="kl_divergence")
        >>> float(optimizer.momentum_at(6250))   # Keras 3's Nadam: 0.9
        0.7378...
    """

    def __init__(
        self,
        learning_rate=0.002,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        schedule_decay: float = 0.004,
        **kwargs,
    ):
        if not 0.0 <= beta_1 < 1.0 or not 0.0 <= beta_2 < 1.0:
            raise ValueError(f"beta_1 and beta_2 must be in [0, 1), got {beta_1} and {beta_2}")
        if epsilon <= 0 or schedule_decay < 0:
            raise ValueError(f"epsilon must be > 0 and schedule_decay >= 0, got {epsilon} and {schedule_decay}")
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.schedule_decay = schedule_decay

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        # Π_t, in the variables' dtype as in Keras 2; every replica computes the same value.
        self._momentum_schedule = self.add_variable(
            shape=(),
            initializer="ones",
            dtype=var_list[0].dtype if var_list else None,
            aggregation="only_first_replica",
            name="momentum_schedule",
        )

    def momentum_at(self, step, dtype="float32"):
        """μ_step = β1 · (1 − ½ · 0.96^(schedule_decay · step)), the momentum of optimizer step `step` (from 1)."""
        step = ops.cast(step, dtype)
        decayed = ops.power(_constant(0.96, dtype), _constant(self.schedule_decay, dtype) * step)
        return _constant(self.beta_1, dtype) * (1.0 - 0.5 * decayed)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Π_t once per step, before the variables' updates read it (where Keras 3's Nadam updates its own).
        dtype = self._momentum_schedule.dtype
        momentum = self.momentum_at(self.iterations + 1, dtype)
        self.assign(self._momentum_schedule, self._momentum_schedule * momentum)
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        beta_1 = _constant(self.beta_1, dtype)
        beta_2 = _constant(self.beta_2, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        momentum = self.momentum_at(step, dtype)
        next_momentum = self.momentum_at(step + 1.0, dtype)
        schedule = ops.cast(self._momentum_schedule, dtype)
        next_schedule = schedule * next_momentum

        index = self._get_variable_index(variable)
        first_moment = beta_1 * self._momentums[index] + (1.0 - beta_1) * gradient
        second_moment = beta_2 * self._velocities[index] + (1.0 - beta_2) * ops.square(gradient)
        self.assign(self._momentums[index], first_moment)
        self.assign(self._velocities[index], second_moment)

        corrected_gradient = gradient / (1.0 - schedule)
        corrected_first = first_moment / (1.0 - next_schedule)
        corrected_second = second_moment / (1.0 - ops.power(beta_2, step))
        nesterov = (1.0 - momentum) * corrected_gradient + next_momentum * corrected_first
        self.assign(variable, variable - learning_rate * nesterov / (ops.sqrt(corrected_second) + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            schedule_decay=self.schedule_decay,
        )
        return config


def _constant(value: float, dtype):
    """A Python float as a tensor of `dtype`, rounded once (`ops.cast` of a float rounds it to float32 first)."""
    return ops.convert_to_tensor(value, dtype=dtype)


# The optimizers a recipe names by class name (`train.optimizer`), beside Keras's own.
OPTIMIZERS = {"Keras2Nadam": Keras2Nadam}
