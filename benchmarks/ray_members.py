"""Ray benchmark: 2 DACON members through a local Ray instance of 2 CPUs (1 thread each, side by side)
against the local executor (one after another, TensorFlow on every core), measured in one run.

Both train the quick profile's 2 members on the same synthetic data (`make synth-dacon`'s) from the same
feature cache, made first and not timed; each command is `python -m replicate.dacon` in a fresh process,
timed from start to exit: start-up, features read from the cache, training, prediction and the report. The
Ray command starts its Ray instance in that process (`ray.init(num_cpus=2)`, counted) and each member's task
is a fresh worker process that imports TensorFlow (counted too). `epochs` below the profile's 3 keeps
`make bench` short; the members' own training time is in each run's manifest (`train_seconds`).

    python -m benchmarks.ray_members --epochs 1        # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The synthetic data of `make synth-dacon` (Makefile), the quick profile's two members.
SYNTH = ["--n-train", "800", "--n-test", "200", "--seed", "0", "--max-words", "2", "--voices-per-word", "1"]
SYNTH += ["--seen-test-voices"]
RAY_CPUS = 2
# The Ray command: a Ray instance of RAY_CPUS CPUs in this process, then the recipe's command line.
# The feature cache of both commands, made before them (not timed): what `dacon.run` computes first.
CACHE_COMMAND = (
    "import sys\n"
    "from replicate import dacon\n"
    "recipe, data = dacon.load_recipe('quick', [sys.argv[2]]), dacon.load_data(sys.argv[1])\n"
    "spec, run = dacon.feature_spec(recipe), recipe['run']\n"
    "for paths, name in ((data.train_paths, 'dacon-train'), (data.test_paths, 'dacon-test')):\n"
    "    spec.cached(paths, cache_dir=run['cache_dir'], name=name, workers=run['workers'] or None, progress=False)\n"
)
RAY_COMMAND = (
    "import sys, ray\n"
    "ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)\n"
    "from replicate import dacon\n"
    "sys.exit(dacon.main(sys.argv[1:]))\n"
)


def _python(arguments: list[str], cwd: Path) -> float:
    """Run `python <arguments>`; its wall time in seconds."""
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"python {' '.join(arguments[:3])} ... failed:\n{completed.stderr[-3000:]}")
    return seconds


def _member_seconds(run_dir: Path) -> list[float]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return [member["train_seconds"] for member in manifest["members"]]


def run(epochs: int = 1) -> dict:
    """Both commands on one data folder and feature cache; wall times and the members' training times."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data, cache = scratch / "data", scratch / "cache"
        _python(["-m", "replicate.synth", "dacon", "--out", str(data), *SYNTH], ROOT)
        cache_dir = f"run.cache_dir={str(cache)!r}"
        _python(["-c", CACHE_COMMAND, str(data), cache_dir], ROOT)
        common = ["--data", str(data), "--profile", "quick", "--epochs", str(epochs), "--no-progress"]
        common += ["--set", cache_dir]
        load = os.getloadavg()[0]
        local = _python(["-m", "replicate.dacon", *common, "--run-dir", str(scratch / "local")], ROOT)
        on_ray = ["--executor", "ray", "--set", "run.cpus_per_member=1", "--run-dir", str(scratch / "ray")]
        ray_seconds = _python(["-c", RAY_COMMAND.format(cpus=RAY_CPUS), *common, *on_ray], ROOT)
        return {
            "members": 2,
            "epochs": epochs,
            "train_clips": 800,
            "ray_cpus": RAY_CPUS,
            "local_seconds": round(local, 1),
            "ray_seconds": round(ray_seconds, 1),
            "speedup": round(local / ray_seconds, 2),
            "local_member_train_seconds": _member_seconds(scratch / "local"),
            "ray_member_train_seconds": _member_seconds(scratch / "ray"),
            "load_average_before": round(load, 2),
        }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_members", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per member (the quick profile's: 3)")
    arguments = parser.parse_args(argv)
    print(json.dumps(run(arguments.epochs)))


if __name__ == "__main__":
    main()
