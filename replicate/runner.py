"""The engine's side of every task: the command line, run folders, the one run sequence, the manifest, the
report's frame and the README's results block. A task supplies its hooks (`replicate.task.Task`).

    python -m replicate.<task> --data DIR [--profile quick] [--seeds N] [--epochs N] [--set a.b=c] ...

The manifest (`manifest.json`, `MANIFEST_SCHEMA_VERSION`), one schema for every task:

    schema_version   1
    task             the task's name, e.g. "dacon" (the registry, `replicate.tasks`, finds its hooks by it)
    recipe_name      the recipe's `name`
    class_names      the ensemble's output classes
    inputs           {input name: shape of one row}, the members' inputs
    features         {input name: `FeatureSpec.to_manifest()`} for inputs computed from audio
    preprocessing    the task's inference state (normalisation statistics, encoders, tables)
    data             {"root": data folder, "unit": "clips" | "tokens" | "persons",
                      "splits": {"train": n, "validation": n, <the task's own splits>: n}, <task facts>}
    prepare          {"seconds": preparation time, "peak_memory_mb": {"process": MiB} after it}
    groups           {group name: the group's own manifest entries} of the ensemble's groups
    members          [{"seed", "file" (relative to the run folder), "group", "epochs", "train_seconds",
                       "samples_per_second", "final", ["best_epoch", "best"]}, ...]
    environment      versions, git commit, machine, date (`train.environment`)
    peak_memory_mb   {"process": MiB} after training

Each group's folder (the run folder itself for a task's only group) holds its own `manifest.json` with
the same keys, its own "group" name and its members' files relative to it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from replicate import files, report
from replicate import recipe as recipe_lib
from replicate.task import Group, Prepared, ReportParts, Run, Task

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class RunFolderError(ValueError):
    """A run folder holds members that cannot be kept (trained from another set-up, or damaged at load)."""


class TrainingFailedError(RuntimeError):
    """Members that could not be trained (on Ray: after every retry), the others kept; the message names the
    seeds and their errors. Running the same command again resumes them."""


# --- run folders -------------------------------------------------------------------------------------


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


# --- the command line --------------------------------------------------------------------------------


def main(task: Task, argv: Sequence[str] | None = None) -> int:
    """`python -m replicate.<task>`: `command_line` with the task's recipe and the one run sequence (`run`)."""
    return command_line(
        argv,
        prog=f"python -m replicate.{task.name}",
        description=task.description,
        data_help=task.data_help,
        load_recipe=task.load_recipe,
        run=functools.partial(run, task),
    )


def command_line(
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
    arguments = _parser(prog, description, data_help).parse_args(argv)
    try:
        recipe = load_recipe(arguments.profile, _overrides(arguments), arguments.recipe)
        run_dir = run_dir_of(recipe, arguments.data, arguments.run_dir)
        with lock_run_dir(run_dir):  # from the first file written to the last
            run_dir = Path(
                run(recipe, arguments.data, run_dir, progress=not arguments.no_progress, retrain=arguments.retrain)
            )
    except (ValueError, OSError, files.LockedError) as error:
        message = refusal(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
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
    print(done_line(run_dir))
    return 0


def _overrides(arguments: argparse.Namespace) -> list[str]:
    """The recipe overrides the command line asks for: every `--set`, then those its own flags stand for."""
    overrides = list(arguments.set)
    if arguments.seeds is not None:
        overrides.append(f"ensemble.seeds={arguments.seeds}")
    if arguments.epochs is not None:
        overrides.append(f"train.epochs={arguments.epochs}")
    if arguments.executor is not None:
        overrides.append(f"run.executor={json.dumps(arguments.executor)}")
    if arguments.ray_address is not None:
        overrides.append(f"run.ray_address={json.dumps(arguments.ray_address)}")  # a TOML string
    return overrides


def _parser(prog: str, description: str, data_help: str) -> argparse.ArgumentParser:
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
    return parser


def refusal(error: BaseException) -> str | None:
    """The one-line message of an error that is the user's to fix (bad input, a folder in use, a full disk),
    or None for a bug (which keeps its traceback)."""
    if isinstance(error, files.LockedError) or is_package_error(error):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return (
            f"no space left on the device{where}; free some space and run the same command again "
            "(finished members and the last good checkpoint are kept)"
        )
    return None


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


# --- the run -----------------------------------------------------------------------------------------


def run(
    task: Task,
    recipe: dict,
    data_root: str | Path,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run a task's recipe on a data folder: the one run sequence (`replicate.task`'s docstring). Each stage
    skips the work already done: cached features, members kept by their records.

    Args:
        task: the task.
        recipe: its resolved recipe (`task.load_recipe`).
        data_root: the data folder.
        run_dir: the run folder (default `run_dir_of`).
        progress: show progress bars.
        retrain: train again the members trained from another set-up (`train.train_ensemble`).
        log: where progress lines go.

    Returns:
        The run folder, with manifest.json, scores.json, report.md (and the task's submission).
    """
    from replicate import train

    data_root = Path(data_root)
    data = task.load(data_root)
    run = Run(task, recipe, open_run_dir(recipe, data_root, run_dir), data_root, progress, retrain, log)
    log(f"run folder: {run.run_dir}")
    with lock_run_dir(run.run_dir):
        started = time.perf_counter()
        prepared = task.prepare(run, data)
        prepared_record = {"seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": train.peak_memory_mb()}
        groups = list(task.groups(run, data, prepared))
        run.manifest = train_groups(run, prepared, groups, base_manifest(run, prepared, prepared_record))
        run.scores = task.evaluate(run, data, prepared)
        if "headline" not in run.scores:
            raise TypeError(f"{type(task).__name__}.evaluate must return the scores with a 'headline'")
        files.write_json(run.run_dir / "scores.json", run.scores)
        write_report(run, data, prepared)
    log(f"report: {run.run_dir / 'report.md'}")
    return run.run_dir


def base_manifest(run: Run, prepared: Prepared, prepared_record: dict) -> dict:
    """The manifest's keys that every group shares (the module docstring lists the schema)."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "task": run.task.name,
        "recipe_name": run.recipe["name"],
        "class_names": list(prepared.class_names),
        "inputs": {name: list(shape) for name, shape in prepared.inputs.items()},
        "features": prepared.features,
        "preprocessing": prepared.preprocessing,
        "data": {
            "root": str(run.data_root.resolve()),
            "unit": prepared.unit,
            "splits": dict(prepared.splits),
            **prepared.data,
        },
        "prepare": prepared_record,
    }


def train_groups(run: Run, prepared: Prepared, groups: Sequence[Group], base: dict) -> dict:
    """Train every group's seed ensemble in its folder (`train.train_ensemble`: members kept, resumed or
    trained), run its `after_training`, and write the run's manifest: the members of the `ensemble` groups.

    Returns:
        The run's manifest.
    """
    from replicate import train

    check_groups(run, groups)
    trained = []
    for group in groups:
        folder = run.run_dir / group.name
        manifest = train.train_ensemble(
            group.recipe or run.recipe,
            run.seeds,
            run_dir=folder,
            manifest={**base, "group": group.name, **group.manifest},
            trained_from={**prepared.trained_from, **group.trained_from},
            retrain=run.retrain,
            log=run.log,
            build_model=group.build_model,
            train_data=group.train_data,
            validation_data=group.validation_data,
            member_callbacks=group.member_callbacks,
            metrics=group.metrics,
            verbose="auto" if run.progress else 0,
        )
        if group.after_training is not None:
            group.after_training(folder, run.log)
            manifest = files.read_json(folder / MANIFEST)
        trained.append((group, manifest))
    manifest = ensemble_manifest(base, [(group, manifest) for group, manifest in trained if group.ensemble])
    manifest["peak_memory_mb"] = train.peak_memory_mb()
    files.write_json(run.run_dir / MANIFEST, manifest)
    return manifest


def check_groups(run: Run, groups: Sequence[Group]) -> None:
    """Before anything trains: distinct group names (a name each when there are several), at least one group
    in the ensemble, and no fused training of members that have their own callbacks (`recipe.RecipeError`)."""
    from replicate import train

    names = [group.name for group in groups]
    if not groups or len(set(names)) < len(names) or (len(groups) > 1 and "" in names):
        raise ValueError(
            f"{run.task.name}: groups need distinct names, and a name each when there are several: {names}"
        )
    if not any(group.ensemble for group in groups):
        raise ValueError(f"{run.task.name}: no group is in the ensemble (Group.ensemble): nothing to predict with")
    for group in groups:
        recipe = group.recipe or run.recipe
        if recipe["train"].get("fused", 1) > 1 and group.member_callbacks is not None:
            raise recipe_lib.RecipeError(train.fused_refusal(recipe))


def ensemble_manifest(base: dict, groups: Sequence[tuple[Group, dict]]) -> dict:
    """The run's manifest: the base keys, the ensemble groups' own entries, and their members with their
    group and their file relative to the run folder."""
    members = [
        {**entry, "group": group.name, "file": f"{group.name}/{entry['file']}" if group.name else entry["file"]}
        for group, manifest in groups
        for entry in manifest["members"]
    ]
    return {
        **base,
        "groups": {group.name: group.manifest for group, _ in groups},
        "members": members,
        "environment": groups[-1][1]["environment"],
    }


# --- the report --------------------------------------------------------------------------------------


def results_table(run: Run) -> str:
    """The task's results table (`Task.results`) with the engine's caption: what was trained, where, when."""
    table = run.task.results(run)
    environment = run.manifest["environment"]
    caption = (
        f"{table.metric} Ours: profile `{run.recipe['run']['profile']}`, {', '.join(table.details)}; "
        f"{environment['machine']}, {environment['date'][:10]}, commit {short_commit(environment['git'])}."
    )
    return report.markdown_table(table.headers, table.rows) + "\n\n" + caption + "\n"


def write_report(run: Run, data, prepared: Prepared) -> Path:
    """report.md: the header, the results beside the source's, ensemble-size plots, the task's sections, the
    members with their training curves, and the footer (the task's notes, time, memory, environment)."""
    parts = run.task.report(run, data, prepared)
    manifest = run.manifest
    lines = [
        f"# {run.task.title} — run `{run.run_dir.name}`",
        "",
        f"Recipe `{run.recipe['name']}`, profile `{run.recipe['run']['profile']}`; data `{manifest['data']['root']}`.",
        *parts.intro,
        "",
        "## Results",
        "",
        results_table(run),
    ]
    for curve in parts.ensemble_curves:
        plot = f"ensemble_size_{curve.split.split()[0]}.png"
        report.plot_ensemble_size(
            curve.sizes, curve.scores, run.run_dir / plot, metric=curve.metric, baselines=curve.baselines
        )
        lines += [f"### {curve.split}: ensemble size", "", f"![ensemble size]({plot})", ""]
    lines += parts.sections
    lines += ["## Members", "", members_table(manifest, parts), "", training_curves(run, parts.history_metrics), ""]
    prepared_record = manifest["prepare"]
    lines += [
        f"## {parts.notes_title}",
        "",
        *(f"- {note}" for note in parts.notes),
        f"- Preparation (features or their cache, statistics, splits): {prepared_record['seconds']} s. Peak "
        f"resident memory: {report.memory_line(prepared_record['peak_memory_mb'])} after preparation, "
        f"{report.memory_line(manifest.get('peak_memory_mb'))} after training.",
        f"- Environment: {report.environment_line(manifest['environment'])}.",
        "",
    ]
    return files.write_text(run.run_dir / "report.md", "\n".join(lines))


def members_table(manifest: dict, parts: ReportParts) -> str:
    """One row per member of the ensemble: its group (when there are several), epochs, best epoch (when
    chosen by a score), final loss, time, throughput, and the task's columns."""
    entries = manifest["members"]
    several = len(manifest["groups"]) > 1
    best = next((entry["best"] for entry in entries if entry.get("best")), None)
    headers = ["seed", *(["group"] if several else []), "epochs"]
    headers += ["best epoch", f"best {next(iter(best))}"] if best else []
    headers += ["final training loss", "train s", "samples/s", *parts.member_columns]
    rows = []
    for index, entry in enumerate(entries):
        row = [entry["seed"], *([entry["group"]] if several else []), entry["epochs"]]
        if best:
            row += [entry.get("best_epoch", "-"), next(iter(entry["best"].values())) if entry.get("best") else "-"]
        row += [entry["final"].get("loss", float("nan")), f"{entry['train_seconds']:.0f}"]
        row += [f"{entry['samples_per_second']:.1f}", *(values[index] for values in parts.member_columns.values())]
        rows.append(row)
    return report.markdown_table(headers, rows)


def training_curves(run: Run, history_metrics: dict[str, str]) -> str:
    """Plot every member's loss per epoch (training_curves.png) and each logged metric that some member has
    (<key>.png); returns the markdown images."""
    entries = run.manifest["members"]
    several = len(run.manifest["groups"]) > 1
    histories = {
        f"{entry['group'] + ' ' if several else ''}seed {entry['seed']}": report.read_history(
            run.run_dir / entry["file"].replace(".keras", ".history.csv")
        )
        for entry in entries
    }
    report.plot_training_curves(histories, run.run_dir / "training_curves.png")
    images = ["![training curves](training_curves.png)"]
    for key, label in history_metrics.items():
        if any(key in history for history in histories.values()):
            report.plot_history_metric(histories, key, run.run_dir / f"{key}.png", label=label)
            images.append(f"![{label}]({key}.png)")
    return " ".join(images)
