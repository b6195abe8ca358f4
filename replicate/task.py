"""What every recipe's task module shares: the data error, run folders, and the command line.

# replicate/<task>.py
def main(argv=None) -> int:
    return task.main(argv, prog="python -m replicate.<task>", description=..., data_help=...,
                     load_recipe=load_recipe, run=run)
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from replicate import files
from replicate import recipe as recipe_lib


class DataError(ValueError):
    """The data folder does not have the competition's layout; the message names the file and rows."""


def listing(values: Sequence, limit: int = 10) -> str:
    """ "a, b, c" or, past `limit` values, "a, b, ... (and 7 more)"."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"{shown} (and {len(values) - limit} more)" if len(values) > limit else shown


def default_run_id(recipe: dict, data_root: Path) -> str:
    """Same recipe and data folder → same run folder, so running a command again resumes it. The number
    of seeds is left out: `--seeds 5` after `--seeds 3` keeps the 3 members and trains 2 more."""
    recipe = {**recipe, "ensemble": {k: v for k, v in recipe["ensemble"].items() if k != "seeds"}}
    return f"{recipe['run']['profile']}-{recipe_lib.fingerprint([recipe, str(Path(data_root).resolve())])}"


def seeds_of(recipe: dict) -> list[int]:
    """The ensemble's seeds: `ensemble.seeds` consecutive integers from `ensemble.first_seed`."""
    first = recipe["ensemble"]["first_seed"]
    return list(range(first, first + recipe["ensemble"]["seeds"]))


def open_run_dir(recipe: dict, data_root: Path, run_dir: str | Path | None = None) -> Path:
    """The run folder (`runs/<task>/<profile>-<hash>` unless one is given), created, with the resolved
    recipe written into it."""
    run_dir = (
        Path(run_dir)
        if run_dir
        else Path(recipe["run"]["runs_dir"]) / recipe["task"] / default_run_id(recipe, data_root)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir, recipe)
    return run_dir


def write_recipe(run_dir: Path, recipe: dict) -> Path:
    """The resolved recipe as `recipe.toml` in the run folder (read back with `recipe.load_recipe(path)`)."""
    import tomli_w

    return files.write_text(Path(run_dir) / "recipe.toml", tomli_w.dumps(recipe))


def short_commit(commit: str) -> str:
    """The first 12 hex digits, keeping a "+dirty" mark (uncommitted changes at run time)."""
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    data_help: str,
    load_recipe: Callable[[str | None, Sequence[str], str | None], dict],
    run: Callable[..., Path],
) -> int:
    """The command line of a recipe: parse, resolve the recipe, run it, and turn bad input into one line.

    Args:
        argv: the arguments (None: sys.argv).
        prog: e.g. "python -m replicate.maic".
        description: one line on the recipe.
        data_help: what `--data` must contain.
        load_recipe: (profile, overrides, recipe path or None) → the validated recipe.
        run: (recipe, data folder, run folder or None, progress=bool) → the finished run folder.

    Returns:
        0 on success, 2 for a bad recipe, data folder or audio file, a training loss that became NaN or
        infinite, or a full disk (the error is printed on stderr, one line).
    """
    from replicate.audio import AudioError
    from replicate.features import FeatureCacheError
    from replicate.train import NonFiniteLossError

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data", type=Path, required=True, help=f"data folder: {data_help}")
    parser.add_argument("--profile", help="recipe profile, e.g. 'quick' (default: the full source recipe)")
    parser.add_argument("--recipe", help="a recipe TOML file instead of the package's own")
    parser.add_argument("--seeds", type=int, help="number of ensemble members (ensemble.seeds)")
    parser.add_argument("--epochs", type=int, help="epochs per member (train.epochs)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe value"
    )
    parser.add_argument(
        "--run-dir", type=Path, help="run folder (default: runs/<recipe>/<profile>-<hash>; reused to resume)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    arguments = parser.parse_args(argv)

    overrides = list(arguments.set)
    if arguments.seeds is not None:
        overrides.append(f"ensemble.seeds={arguments.seeds}")
    if arguments.epochs is not None:
        overrides.append(f"train.epochs={arguments.epochs}")
    try:
        recipe = load_recipe(arguments.profile, overrides, arguments.recipe)
        run_dir = Path(run(recipe, arguments.data, arguments.run_dir, progress=not arguments.no_progress))
    except (recipe_lib.RecipeError, DataError, FeatureCacheError, AudioError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"error: no space left on the device{where}; free some space and run the same command again "
            "(finished members and the last good checkpoint are kept)",
            file=sys.stderr,
        )
        return 2
    submission = run_dir / "submission.csv"
    print(f"done: report {run_dir / 'report.md'}" + (f", submission {submission}" if submission.is_file() else ""))
    return 0
