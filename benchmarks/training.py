"""Training-throughput benchmark of each recipe's model, on any Keras backend, from in-memory arrays.

Nothing of TensorFlow is imported unless the backend is TensorFlow: the models are plain Keras, the data
are numpy arrays, so the same measurement runs on a machine that has only JAX or PyTorch.

    KERAS_BACKEND=jax python -m benchmarks.training --model dacon --fused 4 --steps 30   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from replicate import report
from replicate.task import BenchmarkMember

MIN_SECONDS = 5.0  # timed at least this long: ten fast steps (half a second) measured noise on a shared CPU


@dataclass(frozen=True)
class ModelBenchmark:
    """The limits of a CPU run of one task's member (`Task.benchmark_member`, built in the measuring process
    only, from the full profile unless a test asks for a small one).

    A heavy model's step takes seconds on a CPU, so there it is timed over fewer steps, fewer fused members
    and fewer backends (each measurement records what it ran); on a GPU every limit is lifted.
    """

    fuse: bool = True  # False: measured one member at a time only (`benchmarks.run` skips the fused runs)
    note: str = ""  # why not, for the README
    cpu_steps: int | None = None  # timed steps per pass at most on a CPU (passes repeat to MIN_SECONDS)
    cpu_fused: int | None = None  # members fused at most on a CPU
    cpu_backends: tuple[str, ...] = ()  # the backends measured on a CPU (empty: every one)


MODELS: dict[str, ModelBenchmark] = {
    "dacon": ModelBenchmark(),
    "aicup": ModelBenchmark(),
    # 2-4 s per step of 32 on 2 CPU cores, where 2 members fused ran at 0.8-1.1× one member's samples/s
    "maic": ModelBenchmark(cpu_steps=1, cpu_fused=1),
    # 10-20 s and ~6 GB per step of 64 on 2 CPU cores
    "dcase": ModelBenchmark(
        fuse=False,
        note="its recipe trains one member at a time, each keeping its best epoch by the development AUC + pAUC "
        "(a per-member callback), and its ArcFace layer has no grouped form",
        cpu_steps=1,
        cpu_backends=("tensorflow",),
    ),
}


def setup_of(name: str, profile: str | None = None, overrides: Sequence[str] = ()) -> BenchmarkMember:
    """The task's member as its recipe (with a profile and overrides) trains it (`Task.benchmark_member`)."""
    from replicate import tasks

    task = tasks.get(name)
    return task.benchmark_member(task.load_recipe(profile, overrides))


def skip_reason(name: str, backend: str, fused: int, *, on_cpu: bool) -> str:
    """Why a measurement is not made ("" when it is): a model that is not fused, or a CPU limit."""
    benchmark = MODELS[name]
    if fused > 1 and not benchmark.fuse:
        return benchmark.note
    if on_cpu and benchmark.cpu_backends and backend not in benchmark.cpu_backends:
        return f"on a CPU, measured on {', '.join(benchmark.cpu_backends)} only (a step takes seconds)"
    if on_cpu and fused > 1 and benchmark.cpu_fused == 1:
        return "on a CPU, one member at a time only (a step takes seconds; fusing is for a GPU)"
    return ""


def measure(
    name: str,
    *,
    fused: int = 1,
    steps: int = 20,
    precision: str = "float32",
    jit: bool | str = "auto",
    layout: str = "auto",
    batch_size: int | None = None,
    profile: str | None = None,
    overrides: Sequence[str] = (),
    cpu_limits: bool = True,
    min_seconds: float = MIN_SECONDS,
) -> dict:
    """Train `steps` batches after a warm-up of two (one if `steps` is), repeated until `min_seconds` have passed;
    samples/s counts every member's samples.

    On a CPU the model's `cpu_*` limits apply; a measurement the model refuses (fused DCASE, a backend left
    out on a CPU) returns {"model", "backend", "fused", "skipped": why}.

    Args:
        name: a key of `MODELS`.
        fused: members trained as one fused model (`replicate.fused`).
        steps: timed training steps.
        precision: a Keras dtype policy.
        jit: `jit_compile` ("auto": Keras's choice, as the recipes train: XLA on JAX, not on a CPU).
        layout: the fused layout.
        batch_size: per member; None is the recipe's (anything else is not the recipe's throughput).
        profile, overrides: a recipe profile and `--set` overrides (tests: small models); the default is the
            full recipe, which is what the README's tables show.
        cpu_limits: apply the model's `cpu_*` limits where there is no accelerator.
        min_seconds: the `steps` batches are trained again, as more epochs, until this long has been timed (a
            few fast steps are too short a time to measure on a shared machine); "steps" reports them all.
    """
    import keras

    from replicate import fused as fused_lib
    from replicate import train

    benchmark = MODELS[name]
    backend = keras.backend.backend()
    on_cpu = cpu_limits and not fused_lib.has_accelerator()
    reason = skip_reason(name, backend, fused, on_cpu=on_cpu)
    if reason:
        return {"model": name, "backend": backend, "fused": fused, "skipped": reason}
    if on_cpu:
        steps = min(steps, benchmark.cpu_steps or steps)
        fused = min(fused, benchmark.cpu_fused or fused)
    keras.config.set_dtype_policy(precision)
    setup = setup_of(name, profile, overrides)
    batch_size = batch_size or setup.train["batch_size"]
    keras.utils.set_random_seed(0)
    model = setup.build()
    member_inputs = {tensor.name: tuple(tensor.shape[1:]) for tensor in model.inputs}
    classes = model.output_shape[-1]
    if fused > 1:
        members = [model] + [setup.build() for _ in range(fused - 1)]
        if layout == "auto":
            layout = "grouped" if fused_lib.has_accelerator() else "copies"
        model = fused_lib.pack(fused_lib.fuse(model, fused, layout), members)
    train.compile_model(model, {**setup.train, "jit_compile": jit})

    rng = np.random.default_rng(0)
    rows = batch_size * steps
    targets = [np.eye(classes, dtype=np.float32)[rng.integers(0, classes, rows)] for _ in range(fused)]
    inputs = {}
    for key, shape in member_inputs.items():
        if key == setup.label_input:
            inputs[key] = np.concatenate(targets, axis=-1)
        else:
            inputs[key] = rng.normal(size=(rows, *shape[:-1], shape[-1] * fused)).astype(np.float32)
    x = inputs if len(inputs) > 1 else next(iter(inputs.values()))  # as the model's inputs are structured
    y = targets if fused > 1 else targets[0]
    warm_rows = batch_size * min(2, steps)
    model.fit(
        {key: value[:warm_rows] for key, value in inputs.items()} if len(inputs) > 1 else x[:warm_rows],
        [t[:warm_rows] for t in targets] if fused > 1 else y[:warm_rows],
        batch_size=batch_size,
        epochs=1,
        verbose=0,
    )  # tracing and compilation
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - started
    epochs = 1
    if seconds < min_seconds:  # as many more epochs as the first one says fill the time left
        more = math.ceil((min_seconds - seconds) / seconds)
        started = time.perf_counter()
        model.fit(x, y, batch_size=batch_size, epochs=more, verbose=0, shuffle=False)
        seconds += time.perf_counter() - started
        epochs += more
    return {
        "model": name,
        "backend": backend,
        "device": _device(),
        "precision": precision,
        "jit_compile": bool(model.jit_compile),
        "fused": fused,
        "layout": layout if fused > 1 else "",
        "batch_size": batch_size,
        "steps": steps * epochs,
        **({"recipe_changes": [f"profile {profile}", *overrides]} if profile or overrides else {}),
        "samples_per_second": round(rows * epochs * fused / seconds, 1),
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
    parser.add_argument(
        "--jit", default="auto", choices=("auto", "true", "false"), help="jit_compile (auto: Keras's, as recipes)"
    )
    parser.add_argument("--batch-size", type=int, help="per member (default: the recipe's)")
    parser.add_argument("--no-cpu-limits", action="store_true", help="no fewer steps, members, backends on a CPU")
    parser.add_argument("--layout", default="auto", choices=("auto", "grouped", "copies"), help="fused layout")
    parser.add_argument("--min-seconds", type=float, default=MIN_SECONDS, help="steps repeat until timed this long")
    arguments = parser.parse_args(argv)
    result = measure(
        arguments.model,
        fused=arguments.fused,
        steps=arguments.steps,
        precision=arguments.precision,
        jit={"true": True, "false": False}.get(arguments.jit, "auto"),
        layout=arguments.layout,
        batch_size=arguments.batch_size,
        cpu_limits=not arguments.no_cpu_limits,
        min_seconds=arguments.min_seconds,
    )
    result["machine"] = report.machine()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
