"""What every recipe's task module shares: the data error, run folders, and the command line.

# replicate/<task>.py
def main(argv=None) -> int:
    return task.main(argv, prog="python -m replicate.<task>", description=..., data_help=...,
                     load_recipe=load_recipe, run=run)
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from replicate import files
from replicate import recipe as recipe_lib


class DataError(ValueError):
    """The data folder does not have the competition's layout; the message names the file and rows."""


class RunFolderError(ValueError):
    """A run folder holds members that cannot be kept (trained from another set-up, or damaged at load)."""


class TrainingFailedError(RuntimeError):
    """Members that could not be trained (on Ray: after every retry), the others kept; the message names the
    seeds and their errors. Running the same command again resumes them."""


def listing(values: Sequence, limit: int = 10) -> str:
    """ "a, b, c" or, past `limit` values, "a, b, ... (and 7 more)"."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"{shown} (and {len(values) - limit} more)" if len(values) > limit else shown


def default_run_id(recipe: dict, data_root: Path) -> str:
    """Same recipe and data folder → same run folder, so running a command again resumes it. The number
    of seeds is left out: `--seeds 5` after `--seeds 3` keeps the 3 members and trains 2 more; so is how
    the members are trained (`recipe.EXECUTION_KEYS`): a run started locally resumes on Ray."""
    recipe = {
        **recipe,
        "ensemble": {k: v for k, v in recipe["ensemble"].items() if k != "seeds"},
        "run": {k: v for k, v in recipe["run"].items() if k not in recipe_lib.EXECUTION_KEYS},
    }
    return f"{recipe['run']['profile']}-{recipe_lib.fingerprint([recipe, str(Path(data_root).resolve())])}"


def seeds_of(recipe: dict) -> list[int]:
    """The ensemble's seeds: `ensemble.seeds` consecutive integers from `ensemble.first_seed`."""
    first = recipe["ensemble"]["first_seed"]
    return list(range(first, first + recipe["ensemble"]["seeds"]))


def run_dir_of(recipe: dict, data_root: Path, run_dir: str | Path | None = None) -> Path:
    """The run folder: `run_dir` if given, else `runs/<task>/<profile>-<hash of recipe and data folder>`."""
    if run_dir:
        return Path(run_dir)
    return Path(recipe["run"]["runs_dir"]) / recipe["task"] / default_run_id(recipe, data_root)


def open_run_dir(recipe: dict, data_root: Path, run_dir: str | Path | None = None) -> Path:
    """The run folder (`run_dir_of`), created, with the resolved recipe written into it."""
    run_dir = run_dir_of(recipe, data_root, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir, recipe)
    return run_dir


def lock_run_dir(run_dir: str | Path):
    """Keep other processes out of a run folder while this one uses it (`files.folder_lock`): a second
    command on the same folder stops at once with `files.LockedError` naming this process."""
    return files.folder_lock(run_dir, "run folder", "wait for it to finish, or choose another --run-dir")


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

    Bad input is whatever the package itself refuses: its own error types (`is_package_error`: RecipeError,
    DataError, AudioError, FeatureCacheError, PredictionError, ...), printed as `error: ...` with exit code 2.
    Any other exception is a bug and keeps its traceback.

    Args:
        argv: the arguments (None: sys.argv).
        prog: e.g. "python -m replicate.maic".
        description: one line on the recipe.
        data_help: what `--data` must contain.
        load_recipe: (profile, overrides, recipe path or None) → the validated recipe.
        run: (recipe, data folder, run folder, progress=bool, retrain=bool) → the finished run folder.

    Returns:
        0 on success (the last line names the headline score, the report and the submission), 2 for bad input,
        a run folder or cache in use by another process, a run folder whose members were trained from another
        set-up, a training loss that became NaN or infinite, or a full disk, 1 for members that failed on Ray
        after every retry (naming their seeds; the others are kept), 130 when interrupted (Ctrl-C). The error is
        printed on stderr.
    """
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
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train again the members of the run folder that were trained from another set-up (recipe values "
        "or data), instead of stopping",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="train the members here one after another, or each as a Ray task (run.executor)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: 'local' starts Ray on this machine (default), 'auto' joins the running cluster, "
        "or host:port (run.ray_address)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    arguments = parser.parse_args(argv)

    overrides = list(arguments.set)
    if arguments.seeds is not None:
        overrides.append(f"ensemble.seeds={arguments.seeds}")
    if arguments.epochs is not None:
        overrides.append(f"train.epochs={arguments.epochs}")
    if arguments.executor is not None:
        overrides.append(f"run.executor={json.dumps(arguments.executor)}")
    if arguments.ray_address is not None:
        overrides.append(f"run.ray_address={json.dumps(arguments.ray_address)}")  # a TOML string
    try:
        recipe = load_recipe(arguments.profile, overrides, arguments.recipe)
        run_dir = run_dir_of(recipe, arguments.data, arguments.run_dir)
        with lock_run_dir(run_dir):  # from the first file written to the last
            run_dir = Path(
                run(recipe, arguments.data, run_dir, progress=not arguments.no_progress, retrain=arguments.retrain)
            )
    except (ValueError, files.LockedError) as error:
        if isinstance(error, ValueError) and not is_package_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: the finished members and the last finished epoch of the others are kept; run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
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
    print(done_line(run_dir))
    return 0


def is_package_error(error: BaseException) -> bool:
    """Whether an exception is one of the package's own error types: a `ValueError` subclass defined in a
    `replicate` module (any of them, those added later too). A ValueError of Python, numpy or Keras is not."""
    return isinstance(error, ValueError) and any(
        cls.__module__.partition(".")[0] == "replicate" for cls in type(error).__mro__
    )


def done_line(run_dir: Path) -> str:
    """The run's last line: its headline score (`scores.json`'s "headline", which the task writes beside the
    source's number), then the report and the submission."""
    scores_path = run_dir / "scores.json"
    headline = files.read_json(scores_path).get("headline") if scores_path.is_file() else None
    outputs = [f"report {run_dir / 'report.md'}"]
    if (run_dir / "submission.csv").is_file():
        outputs.append(f"submission {run_dir / 'submission.csv'}")
    return "done: " + (f"{headline} — " if headline else "") + ", ".join(outputs)
