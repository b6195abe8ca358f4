"""`make bench`: every benchmark, one JSON file per kind of machine, and the README's tables.

    python -m benchmarks.run                          # CPU: features, then each model on each backend
    python -m benchmarks.run --skip-features --backends jax --precisions float32,mixed_bfloat16   # a GPU box
    python -m benchmarks.run --table-only             # only rewrite the README tables from results/*.json

Results go to `benchmarks/results/<label>.json` (label "cpu" or "gpu" from the device measured, or
`--label`); the README block between `<!-- results:bench -->` markers is made from every results file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import features as features_benchmark
from benchmarks import pipeline as pipeline_benchmark
from benchmarks import ray_members as ray_benchmark
from benchmarks import recipes as recipes_benchmark
from benchmarks.training import MODELS, skip_reason
from replicate import files, report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"

# What each source's full recipe trains (spec files), and the training time the source reported.
WORKLOADS = {
    "dacon": {
        "what": "DACON: 100,000 clips × 187 epochs × 15 seeds",
        "samples": 100_000 * 187 * 15,  # spec/dacon.md: ~100,000 train files; 187 epochs; 15 seeds
        "source": "≈ 142 h (9.5 h per model, RTX 2060 Super)",  # spec/dacon.md, "Ensemble"
    },
    "aicup": {
        "what": "AI CUP: 750 persons × 150 epochs × 5 variants × 15 seeds (n_mfcc 13's speed)",
        "samples": 750 * 150 * 5 * 15,  # spec/aicup.md: ~1,000 persons, fold 0 of 4 trains; 150 epochs
        "source": "not reported (5 variants × 1 seed)",
    },
    "maic": {
        "what": "MAIC: 10,036 tokens × 100 epochs × 15 seeds",
        # spec/maic.md, "Method" 1 and 5: 10,564 token samples, 528 (5 %) of them validation; "Training": 100
        # epochs max (the source kept epoch 47's weights); 15 seeds: recipes/maic.toml [ensemble] (DESIGN.md)
        "samples": (10_564 - 528) * 100 * 15,
        # spec/maic.md, "Training": about 89 s per epoch (88 s train, 1 s validation) on the competition GPU;
        # × 100 epochs = 2.5 h per model, × 15 = 37 h (the source trained one model)
        "source": "≈ 37 h if 15 models (89 s per epoch × 100 epochs = 2.5 h per model, competition GPU; "
        "the source trained one)",
    },
    "dcase": {
        "what": "DCASE (integrated ArcFace): per 1,000 training clips × 70 epochs × 15 seeds",
        # docs/dcase.md gives no count of training clips (41 IDs, "The task"), so this row is per 1,000 clips.
        # One sample per clip per epoch: the whole 10-s clip (docs/dcase.md, "Features"; recipes/dcase.toml
        # features.input_frames = 0), as replicate/dcase/ trains; 70 epochs: recipes/dcase.toml train.epochs
        # (not in the source: the end of the third warm-restart cycle); 15 seeds: recipes/dcase.toml
        "samples": 1_000 * 70 * 15,
        "source": "not reported",
    },
}


def available_backends() -> list[str]:
    return [name for name in ("tensorflow", "jax", "torch") if importlib.util.find_spec(name) is not None]


def training_run(
    backend: str, model: str, fused: int, steps: int, precision: str, layout: str = "auto", cpu_limits: bool = True
) -> dict:
    """One measurement in a fresh process with KERAS_BACKEND set (a backend cannot change in a process)."""
    command = [sys.executable, "-m", "benchmarks.training", "--model", model, "--fused", str(fused)]
    command += ["--steps", str(steps), "--precision", precision, "--layout", layout]
    command += [] if cpu_limits else ["--no-cpu-limits"]
    environment = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    wall_seconds = round(time.perf_counter() - started, 1)  # the whole row: start-up, build, warm-up, timed steps
    if completed.returncode != 0:  # reported, and the other measurements go on (a GPU session's time is short)
        print(f"{' '.join(command)} on {backend} failed:\n{completed.stderr[-3000:]}", file=sys.stderr, flush=True)
        last = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
        return {"model": model, "backend": backend, "fused": fused, "skipped": f"failed: {last[:200]}", "failed": True}
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "wall_seconds": wall_seconds}


def training_table(measurements: list[dict]) -> str:
    rows = []
    sequential = {
        (m["model"], m["backend"], m["precision"]): m["samples_per_second"] for m in measurements if m["fused"] == 1
    }
    for m in measurements:
        baseline = sequential.get((m["model"], m["backend"], m["precision"]))
        ratio = f"{m['samples_per_second'] / baseline:.2f}×" if baseline and m["fused"] > 1 else ""
        device_memory = f"{m['peak_device_memory_mb']:.0f}" if m.get("peak_device_memory_mb") else "–"
        rows.append(
            (
                m["model"],
                m["backend"],
                m["device"],
                m["precision"],
                f"{m['fused']} ({m['layout']})" if m["fused"] > 1 else 1,
                m["batch_size"],
                m["steps"],
                f"{m['samples_per_second']:.1f}",
                ratio,
                f"{m['peak_memory_mb']:.0f}",
                device_memory,
            )
        )
    headers = ("model", "backend", "device", "precision", "members fused", "batch per member", "timed steps")
    headers += ("samples/s",)
    headers += ("vs. one at a time", "peak RSS MiB", "peak device MiB")
    return report.markdown_table(headers, rows)


def extrapolation_table(results: dict[str, dict]) -> str:
    """The full recipes' training time at the best measured throughput of each machine."""
    rows = []
    for name, workload in WORKLOADS.items():
        for label, result in sorted(results.items()):
            measured = [m for m in result.get("training", {}).get("measurements", []) if m["model"] == name]
            if not measured:
                continue
            best = max(measured, key=lambda m: m["samples_per_second"])
            hours = workload["samples"] / best["samples_per_second"] / 3600
            members = f"{best['fused']} fused ({best['layout']})" if best["fused"] > 1 else "one member at a time"
            setting = f"{best['backend']}, {best['precision']}, {members}"
            rows.append(
                (workload["what"], f"{label}: {best['device']} ({setting})", f"{hours:,.1f} h", workload["source"])
            )
    return report.markdown_table(("full recipe", "ours: measured on", "ours: training time", "source"), rows)


def _skipped_lines(skipped: list[dict]) -> list[str]:
    """One line per model and reason: "dcase fused 4: why", "dcase on torch, on jax: why"."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for entry in skipped:
        what = f"fused {entry['fused']}" if entry["fused"] > 1 else f"on {entry['backend']}"
        key = (entry["model"], entry["skipped"])
        if what not in by_reason.setdefault(key, []):
            by_reason[key].append(what)
    return [f"{model} {', '.join(whats)}: {reason}" for (model, reason), whats in by_reason.items()]


def _section_line(section: dict) -> str:
    return f"{section['machine']}, {section['date']}; `{section['command']}`"


STACKINGS = {
    "": "one member",
    "one_step": "{members} members fused, one step per fused batch (as `train.fused` reads `from_arrays` streams)",
    "generic": "{members} members fused, {members} pipelines and a concatenation (streams mapped after `from_arrays`)",
}


def pipeline_section(pipeline: dict) -> list[str]:
    rows = [
        (
            STACKINGS[m["stacking"]].format(members=m["members"]),
            m["batch_size"],
            f"{m['samples_per_second']:,}",
            f"{m['cpu_seconds_per_1000_samples']:.3f}",
        )
        for m in pipeline["measurements"]
    ]
    headers = ("input pipeline alone (DACON)", "batch per member", "samples/s", "CPU s per 1,000 samples")
    return [
        f"Input pipeline — {_section_line(pipeline)}:",
        "",
        report.markdown_table(headers, rows),
        "",
        f"`pipeline.from_arrays` with the recipe's normalisation, shuffled, from a memory-mapped cache of "
        f"{pipeline['clips']:,} clips of {' × '.join(map(str, pipeline['shape']))} float32 in a warm page cache; "
        f"no model. Load average {pipeline['load_average_before']} before (other work on the machine takes "
        "its share of the cores: samples/s is what was left to us; CPU s per 1,000 samples is the pipeline's "
        "own cost).",
        "",
    ]


def ray_section(ray: dict) -> list[str]:
    epochs = f"{ray['epochs']} epoch{'s' * (ray['epochs'] != 1)}"
    rows = [
        (
            "local executor: one after another, TensorFlow on every core",
            f"{ray['local_seconds']:.0f} s",
            " + ".join(f"{s:.0f}" for s in ray["local_member_train_seconds"]) + " s",
        ),
        (
            f"Ray: a local instance of {ray['ray_cpus']} CPUs, 1 CPU (1 thread) per member, side by side",
            f"{ray['ray_seconds']:.0f} s ({ray['speedup']:.2f}×)",
            " + ".join(f"{s:.0f}" for s in ray["ray_member_train_seconds"]) + " s",
        ),
    ]
    headers = (
        f"{ray['members']} DACON quick members, {epochs} each, {ray['train_clips']} clips",
        "wall time of the command",
        "members' training",
    )
    return [
        f"Ray — {_section_line(ray)}:",
        "",
        report.markdown_table(headers, rows),
        "",
        "Each command in a fresh process, features read from the same cache; the Ray command's time includes "
        "starting Ray and a fresh worker process per member (TensorFlow's import). Load average "
        f"{ray['load_average_before']} before.",
        "",
    ]


def readme_block(results: dict[str, dict]) -> str:
    """Every results file's sections (each with its machine, date and command), then the extrapolation."""
    parts = []
    for label, result in sorted(results.items()):
        parts += [f"**{label}**", ""]
        if result.get("features"):
            f = result["features"]
            parts += [
                f"Features — {_section_line(f)}:",
                "",
                report.markdown_table(
                    ("features (DACON, 4 log-mel resolutions)", "clips/s", "start-up s (not timed)", "peak RSS MiB"),
                    [
                        (
                            "source's way: librosa one clip at a time, one process",
                            f"{f['source_clips_per_second']}",
                            f"{f['source_start_up_seconds']}",
                            f"{f['source_peak_memory_mb']:.0f}",
                        ),
                        (
                            f"ours: `features.melspectrogram` on chunks of clips, {f['workers']} threads, cached",
                            f"{f['ours_clips_per_second']}",
                            f"{f['ours_start_up_seconds']}",
                            f"{f['ours_peak_memory_mb']:.0f}",
                        ),
                    ],
                ),
                "",
                f"{f['clips']} clips; ours is **{f['speedup']}×** the source's way; largest difference of the dB "
                f"values from the source's: {f['max_abs_difference_db']:.2g} dB (a float32's last bit, where BLAS "
                "threads rounded the source's mel product differently; at one BLAS thread the two give the same "
                "bits: tests/test_benchmarks.py).",
                "",
            ]
        if result.get("pipeline"):
            parts += pipeline_section(result["pipeline"])
        if result.get("ray"):
            parts += ray_section(result["ray"])
        if result.get("training"):
            training = result["training"]
            parts += [f"Training — {_section_line(training)}:", "", training_table(training["measurements"]), ""]
            if training.get("skipped"):
                parts += ["Not measured:", "", *(f"- {line}" for line in _skipped_lines(training["skipped"])), ""]
        if result.get("recipes"):
            recipes = result["recipes"]
            rows = [(r["command"], f"{r['wall_seconds'] / 60:.1f} min") for r in recipes["runs"]]
            parts += [
                f"End to end — {_section_line(recipes)}:",
                "",
                report.markdown_table(("quick profile, fresh synthetic data, venv installed", "wall time"), rows),
                "",
            ]
    parts += ["Extrapolated from the best measured throughput (training only; features are computed once):", ""]
    parts += [extrapolation_table(results), ""]
    return "\n".join(parts)


def load_results() -> dict[str, dict]:
    return {path.stem: files.read_json(path) for path in sorted(RESULTS_DIR.glob("*.json"))}


def _results_path(label: str | None, measurements: list[dict]) -> Path:
    """`results/<label>.json`; without a label "gpu" if a measurement ran on an accelerator, else "cpu"."""
    on_gpu = any(not m["device"].startswith("cpu") for m in measurements)
    return RESULTS_DIR / f"{label or ('gpu' if on_gpu else 'cpu')}.json"


def _save(path: Path, measured: dict) -> None:
    """The sections this run measured replace those of the results file; the others stay."""
    previous = files.read_json(path) if path.is_file() else {}
    files.write_json(path, {**previous, **measured})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(available_backends()), help="comma-separated Keras backends")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--fused", type=int, default=4, help="members in the fused measurement (1: skip it)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--precisions", default="float32", help="comma-separated dtype policies")
    parser.add_argument("--layouts", default="auto", help="comma-separated fused layouts (auto, grouped, copies)")
    parser.add_argument("--clips", type=int, default=3000, help="clips in the features benchmark")
    parser.add_argument("--skip-features", action="store_true", help="no features benchmark (e.g. on a GPU box)")
    parser.add_argument("--pipeline-clips", type=int, default=6000, help="clips in the input-pipeline benchmark")
    parser.add_argument("--skip-pipeline", action="store_true", help="no input-pipeline benchmark")
    parser.add_argument("--ray-epochs", type=int, default=1, help="epochs per member in the Ray benchmark")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray benchmark")
    parser.add_argument(
        "--no-cpu-limits", action="store_true", help="heavy models too get every step, member and backend on a CPU"
    )
    parser.add_argument("--recipes", default="", help="comma-separated recipes to time end to end (minutes each)")
    parser.add_argument(
        "--recipe-results", action="store_true", help="also regenerate each timed recipe's README results block"
    )
    parser.add_argument("--keep-runs", type=Path, help="keep the timed recipes' run folders here (<folder>/<recipe>)")
    parser.add_argument("--label", help="results file name (default: cpu or gpu, from the device measured)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the README from results/*.json")
    arguments = parser.parse_args(argv)

    if not arguments.table_only:
        stamp = {
            "date": datetime.date.today().isoformat(),
            "machine": report.machine(),
            "command": shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        }
        measured = {}
        if not arguments.skip_features:
            print(f"features: {arguments.clips} clips, the source's way and ours", flush=True)
            measured["features"] = {**features_benchmark.run(arguments.clips), **stamp}
            print(json.dumps(measured["features"]), flush=True)
        if not arguments.skip_pipeline:
            print(f"input pipeline: {arguments.pipeline_clips} clips, 1 and 15 members", flush=True)
            measured["pipeline"] = {**pipeline_benchmark.run(arguments.pipeline_clips), **stamp}
            print(json.dumps(measured["pipeline"]), flush=True)
        if not arguments.skip_ray:
            print(f"ray: 2 DACON quick members of {arguments.ray_epochs} epoch(s), local and on Ray", flush=True)
            measured["ray"] = {**ray_benchmark.run(arguments.ray_epochs), **stamp}
            print(json.dumps(measured["ray"]), flush=True)
        measurements, skipped = [], []
        for backend in filter(None, arguments.backends.split(",")):
            for model in arguments.models.split(","):
                for precision in arguments.precisions.split(","):
                    runs = [(1, "auto")] + [(arguments.fused, layout) for layout in arguments.layouts.split(",")]
                    for fused, layout in runs if arguments.fused > 1 else runs[:1]:
                        # a backend's earlier measurements tell whether it computes on a CPU (no process needed)
                        on_cpu = not arguments.no_cpu_limits and any(
                            m["backend"] == backend and m["device"].startswith("cpu") for m in measurements
                        )
                        reason = skip_reason(model, backend, fused, on_cpu=on_cpu)
                        if reason:
                            result = {"model": model, "backend": backend, "fused": fused, "skipped": reason}
                        else:
                            print(f"training: {model} on {backend}, {precision}, {fused} fused ({layout})", flush=True)
                            result = training_run(
                                backend, model, fused, arguments.steps, precision, layout, not arguments.no_cpu_limits
                            )
                        print(json.dumps(result), flush=True)
                        (skipped if "skipped" in result else measurements).append(result)
                        if measurements:  # saved as it goes: a run stopped at a time limit keeps what it measured
                            training = {**stamp, "measurements": measurements, "skipped": skipped}
                            _save(_results_path(arguments.label, measurements), {**measured, "training": training})
        if measurements:
            measured["training"] = {**stamp, "measurements": measurements, "skipped": skipped}
        runs = []
        names = [name for name in arguments.recipes.split(",") if name]
        if names:
            print(f"recipes: make recipe-<name> for {', '.join(names)}, quick profiles, fresh data", flush=True)
            for result in recipes_benchmark.time_recipes(
                names, README if arguments.recipe_results else None, arguments.keep_runs
            ):
                runs.append(result)
                print(json.dumps(result), flush=True)
        if runs:
            measured["recipes"] = {**stamp, "runs": runs}
        path = _results_path(arguments.label, measurements)
        _save(path, measured)
        print(f"results: {path}")
    changed = report.update_readme(README, "bench", readme_block(load_results()))
    print(f"{changed or README}: results:bench {'updated' if changed else 'already up to date'}")
    if not arguments.table_only and any(entry.get("failed") for entry in skipped):
        sys.exit("some measurements failed (their errors are above)")


if __name__ == "__main__":
    main()
