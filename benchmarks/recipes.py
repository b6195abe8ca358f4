"""End-to-end wall time of `make recipe-<name>` (the quick profile on fresh synthetic data), as a user runs it.

Each run gets its own synthetic-data, cache and run folders, so nothing is reused from earlier runs; the
virtual environment is taken as installed (`make install` is not timed). With `--readme`, each recipe's
results block (in the README, or in the page of docs/ that holds it) is then made from the run just timed
(`python -m replicate.report`, not timed).

    python -m benchmarks.recipes dacon maic      # prints one JSON object per recipe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_recipe(name: str, run_dir: Path) -> dict:
    """Wall time of `make recipe-<name>`, its run folder at `run_dir` (data and cache in a temporary folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        arguments = f"--run-dir {run_dir} --set run.cache_dir='{scratch / 'cache'}' --no-progress"
        command = ["make", f"recipe-{name}", f"SYNTH_DIR={scratch / 'synth'}", f"ARGS={arguments}"]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"make recipe-{name} failed:\n{completed.stderr[-3000:]}")
    return {"recipe": name, "command": f"make recipe-{name}", "wall_seconds": round(seconds, 1)}


def time_recipes(names: list[str], readme: Path | None = None, keep_runs: Path | None = None):
    """Yield `time_recipe` of each recipe; with `readme`, then write each recipe's results block there from its
    run, after the last run (a README changed earlier would mark the later runs' commit "+dirty"). The run
    folders are temporary unless `keep_runs` names a folder for them (`<keep_runs>/<name>`, e.g. to compare
    two versions' scores.json)."""
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(keep_runs) if keep_runs is not None else Path(scratch)
        for name in names:
            yield time_recipe(name, Path(runs) / name)
        for name in names if readme is not None else ():
            report = [sys.executable, "-m", "replicate.report", str(Path(runs) / name), "--readme", str(readme)]
            subprocess.run(report, cwd=ROOT, capture_output=True, text=True, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument(
        "--readme", type=Path, help="regenerate each recipe's results block (this README's, or its page's under docs/)"
    )
    parser.add_argument("--keep-runs", type=Path, help="keep the run folders here (<folder>/<recipe>)")
    arguments = parser.parse_args(argv)
    for result in time_recipes(arguments.recipes, arguments.readme, arguments.keep_runs):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
