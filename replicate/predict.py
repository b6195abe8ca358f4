"""Predict with a trained run from the task's natural raw input, and write the predictions as a CSV.

    python -m replicate.predict RUN_DIR INPUT... [--out predictions.csv] [--members N]

What INPUT is depends on the run's task (`Task.predict`): DACON wav files (or folders of them) → each word's
share; MAIC a folder of persons (CSV + JSON) → a diagnosis per person; DCASE wav files → an anomaly score
per clip; AI CUP wav files and the persons' clinical table → a class per person. The features are computed
with the run's own definition and statistics (its manifest). Bad input (an unreadable file, a run folder
that is not finished) is one line, `error: ...`, naming the file, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from replicate import files, runner


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicate.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (runs/<recipe>/<run-id>)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="what the run's task predicts from (files, folders)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    parser.add_argument("--members", type=int, help="use the first N seeds of each model group (default: all)")
    arguments = parser.parse_args(argv)
    if arguments.members is not None and arguments.members < 1:
        parser.error(f"--members {arguments.members}: must be at least 1")
    try:
        from replicate.ensemble import Ensemble

        ensemble = Ensemble.load(arguments.run_dir, arguments.members)
        table = ensemble.predict_table(arguments.inputs)
        with files.atomic_path(arguments.out, suffix=".csv") as temporary:
            table.to_csv(temporary, index=False, float_format="%.8f")
    except (ValueError, OSError, files.LockedError) as error:
        message = runner.refusal(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"predictions: {arguments.out} ({len(table)} rows, {len(ensemble.members)} members)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
