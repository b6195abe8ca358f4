"""Training-throughput benchmark of each recipe's model, on any Keras backend, from in-memory arrays.

Nothing of TensorFlow is imported unless the backend is TensorFlow: the models are plain Keras, the data
are numpy arrays, so the same measurement runs on a machine that has only JAX or PyTorch.

    KERAS_BACKEND=jax python -m benchmarks.training --model dacon --fused 4 --steps 30   # one JSON line
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelBenchmark:
    """What to train: the recipe's builder with the source's input, loss, optimizer and batch size."""

    builder: str  # "module:function"
    inputs: dict  # input name → shape without the batch axis (a single-input model has one entry)
    classes: int
    loss: str
    optimizer: str
    learning_rate: float
    batch_size: int
    arguments: dict = field(default_factory=dict)


MODELS: dict[str, ModelBenchmark] = {
    "dacon": ModelBenchmark(
        "models.dacon:build_dacon_model", {"log_mel": (64, 101, 4)}, 30, "KLDivergence", "Nadam", 0.002, 16
    ),
    "aicup": ModelBenchmark(  # the n_mfcc = 13 variant, multimodal
        "models.aicup:build_aicup_model",
        {"mfcc_13": (13, 126, 1), "clinical": (44,)},
        5,
        "CategoricalCrossentropy",
        "SGD",
        0.01,
        32,
    ),
}


def _build(benchmark: ModelBenchmark):
    module, function = benchmark.builder.split(":")
    return getattr(importlib.import_module(module), function)(**benchmark.arguments)


def measure(
    name: str, *, fused: int = 1, steps: int = 20, precision: str = "float32", jit: bool = False, layout: str = "auto"
) -> dict:
    """Train `steps` batches after one warm-up epoch; samples/s counts every member's samples."""
    import keras

    from replicate import fused as fused_lib

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    benchmark = MODELS[name]
    keras.utils.set_random_seed(0)
    model = _build(benchmark)
    if fused > 1:
        members = [model] + [_build(benchmark) for _ in range(fused - 1)]
        if layout == "auto":
            layout = "grouped" if fused_lib.has_accelerator() else "copies"
        model = fused_lib.pack(fused_lib.fuse(model, fused, layout), members)
    optimizer = keras.optimizers.get(
        {"class_name": benchmark.optimizer, "config": {"learning_rate": benchmark.learning_rate}}
    )
    model.compile(optimizer=optimizer, loss=keras.losses.get(benchmark.loss), jit_compile=jit)

    rng = np.random.default_rng(0)
    rows = benchmark.batch_size * steps
    inputs = {
        key: rng.normal(size=(rows, *shape[:-1], shape[-1] * fused)).astype(np.float32)
        for key, shape in benchmark.inputs.items()
    }
    target = np.eye(benchmark.classes, dtype=np.float32)[rng.integers(0, benchmark.classes, rows)]
    targets = [target] * fused if fused > 1 else target
    x = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    warm = {key: value[: benchmark.batch_size * 2] for key, value in inputs.items()}
    model.fit(
        next(iter(warm.values())) if len(warm) == 1 else warm,
        [t[: benchmark.batch_size * 2] for t in targets] if fused > 1 else target[: benchmark.batch_size * 2],
        batch_size=benchmark.batch_size,
        epochs=1,
        verbose=0,
    )  # tracing and compilation
    started = time.perf_counter()
    model.fit(x, targets, batch_size=benchmark.batch_size, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - started
    return {
        "model": name,
        "backend": keras.backend.backend(),
        "device": _device(),
        "precision": precision,
        "jit_compile": jit,
        "fused": fused,
        "layout": layout if fused > 1 else "",
        "batch_size": benchmark.batch_size,
        "steps": steps,
        "samples_per_second": round(rows * fused / seconds, 1),
        "parameters": model.count_params(),
        "peak_memory_mb": peak_rss_mb(),
        "peak_device_memory_mb": _device_peak_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts anew at exec, while `ru_maxrss` keeps the
    peak of the process that started it (the benchmark runner), which would hide small models' own peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _device() -> str:
    """The accelerator the backend computes on, or the CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {getattr(device, 'device_kind', device.platform)}"
    if backend == "torch":
        import torch

        return f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu: {gpus[0].name}" if gpus else "cpu"


def _device_peak_mb() -> float | None:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None
    if backend == "torch":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--fused", type=int, default=1, help="members trained as one fused model")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--precision", default="float32", help="a Keras dtype policy, e.g. mixed_bfloat16")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA (jit_compile=True)")
    parser.add_argument("--layout", default="auto", choices=("auto", "grouped", "copies"), help="fused layout")
    arguments = parser.parse_args(argv)
    result = measure(
        arguments.model,
        fused=arguments.fused,
        steps=arguments.steps,
        precision=arguments.precision,
        jit=arguments.jit,
        layout=arguments.layout,
    )
    result["machine"] = f"{platform.machine()} {platform.system()}, {len(os.sched_getaffinity(0))} CPU cores"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
