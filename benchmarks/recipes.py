"""End-to-end wall time of `make recipe-<name>` (the quick profile on fresh synthetic data), as a user runs it.

Each run gets its own synthetic-data, cache and run folders, so nothing is reused from earlier runs; the
virtual environment is taken as installed (`make install` is not timed). With `--readme`, each recipe's
results block in the README is then made from the run just timed (`python -m replicate.report`, not timed).

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


def time_recipe(name: str, readme: Path | None = None) -> dict:
    """Wall time of `make recipe-<name>`; with `readme`, that README's results block for the recipe is
    then regenerated from the run."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        arguments = f"--run-dir {scratch / 'run'} --set run.cache_dir='{scratch / 'cache'}' --no-progress"
        command = ["make", f"recipe-{name}", f"SYNTH_DIR={scratch / 'synth'}", f"ARGS={arguments}"]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"make recipe-{name} failed:\n{completed.stderr[-3000:]}")
        if readme is not None:
            report = [sys.executable, "-m", "replicate.report", str(scratch / "run"), "--readme", str(readme)]
            subprocess.run(report, cwd=ROOT, capture_output=True, text=True, check=True)
    return {"recipe": name, "command": f"make recipe-{name}", "wall_seconds": round(seconds, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--readme", type=Path, help="regenerate this README's results block of each recipe")
    arguments = parser.parse_args(argv)
    for name in arguments.recipes:
        print(json.dumps(time_recipe(name, arguments.readme)), flush=True)


if __name__ == "__main__":
    main()
