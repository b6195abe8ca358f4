"""DACON overlapping-speech classification (3rd place): data layout, features, training, report.

    python -m replicate.dacon --data /path/to/dacon                      # the source recipe
    python -m replicate.dacon --data data/synth/dacon --profile quick    # the synthetic demo
    python -m replicate.dacon --data ... --seeds 3 --epochs 20 --set train.batch_size=32

Stages, each skipping work already done: read and check the layout → features (cached) →
normalisation statistics → seed ensemble (resumable) → test predictions and `submission.csv` →
scores (where answers exist) → `report.md`.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import features as feature_lib
from replicate import files, metrics, report, task
from replicate import recipe as recipe_lib
from replicate.task import DataError

ANSWER_TOLERANCE = 1e-3  # a label row must sum to 1 within this


def _equal_lengths(value) -> str | None:
    return None if isinstance(value, list) and len(value) >= 1 else "must be a non-empty list"


RULES: dict[str, recipe_lib.Rule] = {
    "data.sample_rate": recipe_lib.positive,
    "data.clip_samples": recipe_lib.positive,
    "features.n_fft": recipe_lib.positive,
    "features.win_length": recipe_lib.positive,
    "features.hop_length": recipe_lib.positive,
    "features.n_mels": recipe_lib.positive,
    "features.pad_mode": recipe_lib.one_of(*feature_lib.PAD_MODES),
    "features.top_db": recipe_lib.positive,
    "features.db_reference": recipe_lib.one_of("global", "per_clip"),
    "features.normalization": recipe_lib.one_of("train_test", "train"),
    "model.dropout": recipe_lib.fraction,
    "model.dense_units": recipe_lib.positive,
    "train.epochs": recipe_lib.positive,
    "train.batch_size": recipe_lib.positive,
    "train.learning_rate": recipe_lib.positive,
    "train.optimizer": recipe_lib.one_of("Keras2Nadam", "Nadam", "Adam", "AdamW", "SGD", "RMSprop"),
    "train.loss": recipe_lib.one_of("KLDivergence", "CategoricalCrossentropy"),
    "train.validation_fraction": recipe_lib.fraction,
    "train.fused": recipe_lib.positive,
    "train.fused_layout": recipe_lib.one_of("auto", "grouped", "copies"),
    "train.precision": recipe_lib.one_of("float32", "mixed_bfloat16", "mixed_float16"),
    "train.distribute": recipe_lib.one_of("none", "mirrored"),
    "ensemble.seeds": recipe_lib.positive,
    "ensemble.first_seed": recipe_lib.non_negative,
    "run.workers": recipe_lib.non_negative,
}


def load_recipe(profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
    """The DACON recipe with a profile and overrides, validated (also the resolutions' consistency)."""
    recipe = recipe_lib.load_recipe(path or "dacon", profile, overrides, RULES, task="dacon")
    features = recipe["features"]
    if len(features["n_fft"]) != len(features["win_length"]):
        raise recipe_lib.RecipeError(
            f"features.n_fft has {len(features['n_fft'])} values but features.win_length has "
            f"{len(features['win_length'])}: they describe the same channels"
        )
    for n_fft, win_length in zip(features["n_fft"], features["win_length"], strict=True):
        if win_length > n_fft:
            raise recipe_lib.RecipeError(f"features.win_length {win_length} exceeds its n_fft {n_fft}")
    return recipe


# --- the competition's layout -------------------------------------------------------------------


@dataclass
class DaconData:
    """One data folder: file paths matched to label rows by id."""

    root: Path
    class_names: list[str]
    train_ids: list[str]
    train_paths: list[Path]
    train_targets: np.ndarray
    test_ids: list[str]
    test_paths: list[Path]
    test_targets: np.ndarray | None  # only synthetic data has answers for the test clips
    submission_columns: list[str]


def read_answers(
    path: Path, class_names: Sequence[str] | None = None, check_rows: bool = True, template: str = "submission.csv"
) -> pd.DataFrame:
    """Read an answer or submission CSV (`id` + one column per class) and check it.

    Args:
        path: the CSV.
        class_names: the columns it must have after `id`, in order (None: take them from the file).
        check_rows: check that every row is a distribution (not for the submission template).
        template: the file `class_names` come from, named in the error when the columns differ.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    if table.columns[0] != "id":
        raise DataError(f"{path}: the first column must be 'id', found {table.columns[0]!r}")
    columns = list(table.columns[1:])
    if class_names is not None and columns != list(class_names):
        extra = [column for column in columns if column not in class_names]
        missing = [name for name in class_names if name not in columns]
        differences = ([f"extra columns {task.listing(extra)}"] if extra else []) + (
            [f"missing {task.listing(missing)}"] if missing else []
        )
        raise DataError(
            f"{path}: the columns after 'id' must be {template}'s {len(class_names)} classes in its order; "
            + ("; ".join(differences) or "the same columns in another order")
        )
    if table.empty:
        raise DataError(f"{path}: no rows (only the header)")
    if len(columns) < 2:
        raise DataError(f"{path}: needs at least two label columns after 'id'")
    duplicated = table["id"][table["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{path}: duplicated ids {task.listing(duplicated)}")
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    bad = table["id"][values.isna().any(axis=1) | ~np.isfinite(values).all(axis=1)].tolist()
    if bad:
        raise DataError(f"{path}: non-numeric, empty or non-finite values in the rows of ids {task.listing(bad)}")
    if check_rows:
        negative = table["id"][(values < 0).any(axis=1)].tolist()
        if negative:
            raise DataError(f"{path}: negative shares in the rows of ids {task.listing(negative)}")
        sums = values.sum(axis=1)
        off = table["id"][(sums - 1).abs() > ANSWER_TOLERANCE].tolist()
        if off:
            raise DataError(
                f"{path}: rows must sum to 1 (±{ANSWER_TOLERANCE}); they do not for ids {task.listing(off)}"
            )
    table[columns] = values.astype(np.float32)
    return table


def match_files(folder: Path, ids: Sequence[str], table: Path) -> list[Path]:
    """The wav file of every id, in the table's order; any missing or extra file is an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected one wav file per id of {table.name})")
    on_disk = {path.stem: path for path in folder.glob("*.wav")}
    missing = [identifier for identifier in ids if identifier not in on_disk]
    extra = sorted(set(on_disk) - set(ids))
    problems = []
    if missing:
        problems.append(f"{len(missing)} ids of {table.name} have no {folder.name}/<id>.wav: {task.listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} wav files in {folder} have no row in {table.name}: {task.listing(extra)}")
    if problems:
        raise DataError("; ".join(problems))
    return [on_disk[identifier] for identifier in ids]


def load_data(root: str | os.PathLike) -> DaconData:
    """Read and check a DACON data folder: train/, test/, train_answer.csv, submission.csv
    (and test_answer.csv, which only synthetic data has)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    submission = read_answers(root / "submission.csv", check_rows=False)  # the template: ids and class columns
    class_names = list(submission.columns[1:])
    train = read_answers(root / "train_answer.csv", class_names)
    test_targets = None
    if (root / "test_answer.csv").is_file():
        answers = read_answers(root / "test_answer.csv", class_names)
        if answers["id"].tolist() != submission["id"].tolist():
            raise DataError(f"{root / 'test_answer.csv'}: ids differ from submission.csv's (same ids, same order)")
        test_targets = answers[class_names].to_numpy()
    return DaconData(
        root=root,
        class_names=class_names,
        train_ids=train["id"].tolist(),
        train_paths=match_files(root / "train", train["id"].tolist(), root / "train_answer.csv"),
        train_targets=train[class_names].to_numpy(),
        test_ids=submission["id"].tolist(),
        test_paths=match_files(root / "test", submission["id"].tolist(), root / "submission.csv"),
        test_targets=test_targets,
        submission_columns=list(submission.columns),
    )


# --- features ------------------------------------------------------------------------------------


def audio_spec(recipe: dict) -> feature_lib.AudioSpec:
    data = recipe["data"]
    return feature_lib.AudioSpec(data["sample_rate"], data["clip_samples"], data["resample"], data["fix_length"])


def resolutions(features: dict) -> list[feature_lib.MelResolution]:
    return [
        feature_lib.MelResolution(n_fft, win_length, features["hop_length"], features["n_mels"], features["pad_mode"])
        for n_fft, win_length in zip(features["n_fft"], features["win_length"], strict=True)
    ]


def _extractor(recipe_data: dict, recipe_features: dict) -> Callable:
    return feature_lib.mel_power_extractor(recipe_data["sample_rate"], resolutions(recipe_features))


def mel_power_cached(paths: Sequence[Path], recipe: dict, name: str, progress: bool = True):
    """Cached (clips, n_mels, frames, channels) mel power of `paths` and the cache's metadata."""
    params = {
        "kind": "mel_power",
        "sample_rate": recipe["data"]["sample_rate"],
        "resolutions": [vars(r) for r in resolutions(recipe["features"])],
    }
    return feature_lib.cached_features(
        paths,
        audio=audio_spec(recipe),
        extractor=_extractor(recipe["data"], recipe["features"]),
        params=params,
        cache_dir=recipe["run"]["cache_dir"],
        name=name,
        workers=recipe["run"]["workers"] or None,
        progress=progress,
    )


def inference_features(paths: Sequence[str | os.PathLike], manifest: dict) -> np.ndarray:
    """Model inputs for new audio files, with the training run's parameters and statistics."""
    audio = feature_lib.AudioSpec(**manifest["audio"])
    # Runs made before `features.pad_mode` existed padded with zeros (librosa >= 0.9's default).
    features = {"pad_mode": "constant", **manifest["recipe"]["features"]}
    power = feature_lib.extract_features(paths, audio=audio, extractor=_extractor(manifest["recipe"]["data"], features))
    return feature_lib.Normalizer.from_config(manifest["normalization"])(power)


# --- the run -------------------------------------------------------------------------------------


def build_model(recipe: dict, input_shape: tuple[int, int, int], num_classes: int):
    """The recipe's CNN for (mels, frames, resolutions) inputs and `num_classes` words (30), uncompiled."""
    from models.dacon import build_dacon_model

    model = recipe["model"]
    return build_dacon_model(
        input_shape=input_shape, num_classes=num_classes, dropout=model["dropout"], dense_units=model["dense_units"]
    )


def run(
    recipe: dict,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the whole recipe on a data folder; returns the run folder (with report.md and submission.csv).
    `retrain`: train again the members trained from another set-up (`train.train_ensemble`)."""
    from replicate import pipeline, train

    data_root = Path(data_root)
    data = load_data(data_root)
    run_dir = task.open_run_dir(recipe, data_root, run_dir)
    log(f"run folder: {run_dir}")
    log(f"data: {len(data.train_ids)} training clips, {len(data.test_ids)} test clips, {len(data.class_names)} classes")

    started = time.perf_counter()
    train_power, train_meta = mel_power_cached(data.train_paths, recipe, "dacon-train", progress)
    test_power, test_meta = mel_power_cached(data.test_paths, recipe, "dacon-test", progress)
    feature_seconds = time.perf_counter() - started
    feature_memory = train.peak_memory_mb()

    features = recipe["features"]
    fit_on = {data_root / "train": train_power}
    if features["normalization"] == "train_test":
        fit_on[data_root / "test"] = test_power
    normalizer = feature_lib.Normalizer.fit(
        list(fit_on.values()), features["db_reference"], features["top_db"], name=" + ".join(map(str, fit_on))
    )

    rows = np.arange(len(train_power))
    validation_rows = np.array([], dtype=np.int64)
    fraction = recipe["train"]["validation_fraction"]
    if fraction > 0:
        shuffled = np.random.default_rng(recipe["ensemble"]["first_seed"]).permutation(rows)
        cut = max(1, round(fraction * len(rows)))
        validation_rows, rows = np.sort(shuffled[:cut]), np.sort(shuffled[cut:])
    batch_size = recipe["train"]["batch_size"]
    make_dataset = functools.partial(pipeline.from_arrays, train_power, data.train_targets, transform=normalizer)
    validation = make_dataset(batch_size=256, indices=validation_rows) if len(validation_rows) else None

    manifest = {
        "task": "dacon",
        "recipe_name": recipe["name"],
        "class_names": data.class_names,
        "input_shape": list(train_power.shape[1:]),
        "audio": vars(audio_spec(recipe)),
        "normalization": normalizer.to_config(),
        "recipe": {"data": recipe["data"], "features": recipe["features"]},
        "data": {
            "root": str(data_root.resolve()),
            "train_clips": len(rows),
            "validation_clips": len(validation_rows),
            "test_clips": len(data.test_ids),
            "audio_changes": {"train": train_meta["notes"], "test": test_meta["notes"]},
        },
        "feature_seconds": round(feature_seconds, 2),
        "feature_peak_memory_mb": feature_memory,
    }
    seeds = task.seeds_of(recipe)
    manifest = train.train_ensemble(
        recipe,
        seeds,
        run_dir=run_dir,
        manifest=manifest,
        trained_from={
            "features": train_meta["checksums"],
            "targets": data.train_targets,
            "rows": rows,
            "normalization": normalizer.to_config(),
        },
        retrain=retrain,
        log=log,
        build_model=functools.partial(build_model, recipe, tuple(train_power.shape[1:]), len(data.class_names)),
        train_data=lambda seed, epoch: make_dataset(
            batch_size=batch_size, indices=rows, shuffle=True, seed=seed, epoch=epoch
        ),
        validation_data=validation,
        verbose="auto" if progress else 0,
    )

    evaluate_and_report(run_dir, data, test_power, train_power, normalizer, validation_rows, rows, log=log)
    return run_dir


def evaluate_and_report(
    run_dir: Path,
    data: DaconData,
    test_power: np.ndarray,
    train_power: np.ndarray,
    normalizer: feature_lib.Normalizer,
    validation_rows: np.ndarray,
    train_rows: np.ndarray,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Predict the test clips with every saved member, write submission.csv, score, and write report.md."""
    from replicate import pipeline
    from replicate.ensemble import Ensemble

    ensemble = Ensemble.load(run_dir)
    test_inputs = pipeline.from_arrays(test_power, batch_size=256, transform=normalizer)
    test_members = ensemble.predict_members(test_inputs)
    with files.atomic_path(run_dir / "test_predictions.npz", suffix=".npz") as temporary:
        np.savez(temporary, seeds=np.array(ensemble.seeds), probabilities=test_members, ids=np.array(data.test_ids))
    submission = pd.DataFrame(test_members.mean(axis=0), columns=data.class_names)
    submission.insert(0, "id", data.test_ids)
    with files.atomic_path(run_dir / "submission.csv") as temporary:
        submission[data.submission_columns].to_csv(temporary, index=False, float_format="%.8f")
    log(f"submission: {run_dir / 'submission.csv'}")

    prior = data.train_targets[train_rows].mean(axis=0)
    evaluations = {}
    if data.test_targets is not None:
        evaluations["test (synthetic answers)"] = _scores(test_members, data.test_targets, prior)
    if len(validation_rows):
        validation_inputs = pipeline.from_arrays(
            train_power, batch_size=256, indices=validation_rows, transform=normalizer
        )
        evaluations["validation split"] = _scores(
            ensemble.predict_members(validation_inputs), data.train_targets[validation_rows], prior
        )
    scores = {"seeds": ensemble.seeds, "evaluations": evaluations}
    scores["headline"] = headline(scores, recipe_lib.load_recipe(run_dir / "recipe.toml")["source"])
    files.write_json(run_dir / "scores.json", scores)
    write_report(run_dir, scores)
    log(f"report: {run_dir / 'report.md'}")
    return scores


def headline(scores: dict, source: dict) -> str:
    """The run's result in a phrase (the command line's last line), beside the source's final number."""
    final = source["reported"][-1]
    for split, evaluation in scores["evaluations"].items():  # the test clips first, where they have answers
        size = len(evaluation["member_kl"])
        return (
            f"{split.split()[0]} KL {evaluation['ensemble_kl_by_size'][str(size)]:.4f} ({size}-model average; "
            f"source: {final['what']} {final['kl']:.4f} on the real data, {final['split']})"
        )
    return "not scored (the test clips have no answers and train.validation_fraction is 0)"


def _scores(member_probabilities: np.ndarray, targets: np.ndarray, prior: np.ndarray) -> dict:
    """KL of each member, of the ensembles of the first k members, and of the training-prior baseline."""
    from replicate.ensemble import score_members

    scores = score_members(member_probabilities, targets, metrics.kl_divergence)
    return {
        "clips": len(targets),
        "member_kl": scores["member"],
        "ensemble_kl_by_size": scores["ensemble_by_size"],
        "prior_kl": metrics.kl_divergence(targets, np.broadcast_to(prior, targets.shape)),
    }


# --- report --------------------------------------------------------------------------------------


def results_table(run_dir: str | os.PathLike) -> str:
    """The README's results table: the source's reported numbers beside ours, each labelled."""
    run_dir = Path(run_dir)
    scores = files.read_json(run_dir / "scores.json")
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    rows = [
        (f"source: {entry['what']}", "real DACON data, " + entry["split"], f"{entry['kl']:.4f}")
        for entry in recipe["source"]["reported"]
    ]
    for split, evaluation in scores["evaluations"].items():
        where = f"our synthetic data, {split}, {evaluation['clips']} clips"
        rows.append(("ours: predict the training prior", where, f"{evaluation['prior_kl']:.4f}"))
        rows.append(("ours: single member, mean ± std", where, report.mean_std(evaluation["member_kl"])))
        for size in report.ensemble_sizes(len(evaluation["member_kl"])):
            rows.append((f"ours: {size}-model average", where, f"{evaluation['ensemble_kl_by_size'][str(size)]:.4f}"))
    members = manifest["members"]
    caption = (
        f"KL divergence, lower is better. Ours: profile `{recipe['run']['profile']}`, {len(members)} members × "
        f"{recipe['train']['epochs']} epochs, {manifest['data']['train_clips']} training clips; "
        f"{manifest['environment']['machine']}, {manifest['environment']['date'][:10]}, "
        f"commit {task.short_commit(manifest['environment']['git'])}."
    )
    return report.markdown_table(("model", "data", "KL"), rows) + "\n\n" + caption + "\n"


def write_report(run_dir: Path, scores: dict) -> Path:
    manifest = files.read_json(run_dir / "manifest.json")
    recipe = recipe_lib.load_recipe(run_dir / "recipe.toml")
    histories = {
        f"seed {member['seed']}": report.read_history(run_dir / member["file"].replace(".keras", ".history.csv"))
        for member in manifest["members"]
    }
    report.plot_training_curves(histories, run_dir / "training_curves.png")
    features = recipe["features"]
    lines = [
        f"# DACON overlapping speech — run `{run_dir.name}`",
        "",
        f"Recipe `{recipe['name']}`, profile `{recipe['run']['profile']}`; data `{manifest['data']['root']}`.",
        "The source's numbers are on the real competition data (public/private leaderboard); ours are on the",
        "data named in each row. KL divergence, lower is better.",
        "",
        "## Results",
        "",
        results_table(run_dir),
    ]
    for split, evaluation in scores["evaluations"].items():
        sizes = list(map(int, evaluation["ensemble_kl_by_size"]))
        plot = f"ensemble_size_{split.split()[0]}.png"
        report.plot_ensemble_size(
            sizes,
            list(evaluation["ensemble_kl_by_size"].values()),
            run_dir / plot,
            metric="KL divergence",
            baselines={
                "training prior": evaluation["prior_kl"],
                "single member (mean)": float(np.mean(evaluation["member_kl"])),
            },
        )
        lines += [f"### {split}: ensemble size", "", f"![ensemble size]({plot})", ""]
    lines += [
        "## Members",
        "",
        report.markdown_table(
            ("seed", "epochs", "final training loss", "train s", "samples/s")
            + tuple(f"KL {split}" for split in scores["evaluations"]),
            [
                (
                    m["seed"],
                    m["epochs"],
                    m["final"].get("loss", float("nan")),
                    f"{m['train_seconds']:.0f}",
                    f"{m['samples_per_second']:.1f}",
                    *(e["member_kl"][i] for e in scores["evaluations"].values()),
                )
                for i, m in enumerate(manifest["members"])
            ],
        ),
        "",
        "![training curves](training_curves.png)",
        "",
        "## Features and data",
        "",
        f"- Resolutions (n_fft/win_length): {list(zip(features['n_fft'], features['win_length'], strict=True))}, "
        f"hop {features['hop_length']}, {features['n_mels']} mels, signal edges padded by "
        f"`{features['pad_mode']}` → input {tuple(manifest['input_shape'])}.",
        f"- dB reference: `{manifest['normalization']['reference']}`; z-score statistics from "
        f"`{recipe['features']['normalization']}` (mean {np.round(manifest['normalization']['mean'], 3).tolist()}, "
        f"std {np.round(manifest['normalization']['std'], 3).tolist()}).",
        f"- Clips: {manifest['data']['train_clips']} training, {manifest['data']['validation_clips']} validation, "
        f"{manifest['data']['test_clips']} test. Audio changed to be usable: "
        f"{report.audio_changes(manifest['data']['audio_changes'])}.",
        f"- Feature extraction (or cache read): {manifest['feature_seconds']} s. Peak resident memory: "
        f"{report.memory_line(manifest['feature_peak_memory_mb'])} after features, "
        f"{report.memory_line(manifest.get('peak_memory_mb'))} after training.",
        f"- Environment: {report.environment_line(manifest['environment'])}.",
        "",
    ]
    return files.write_text(run_dir / "report.md", "\n".join(lines))


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return task.main(
        argv,
        prog="python -m replicate.dacon",
        description="DACON overlapping-speech 3rd-place solution: features, seed ensemble, submission, report.",
        data_help="train/, test/, train_answer.csv, submission.csv",
        load_recipe=load_recipe,
        run=run,
    )


if __name__ == "__main__":
    sys.exit(main())
