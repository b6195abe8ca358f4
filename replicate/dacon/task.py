"""The DACON task's hooks: four-resolution mel power features, the source's train+test normalisation, one
seed ensemble of the mish residual CNN trained with KL divergence, the averaged word shares as submission.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import audio, files, metrics
from replicate import features as feature_lib
from replicate import recipe as recipe_lib
from replicate.dacon import data as data_lib
from replicate.dacon import report as report_lib
from replicate.task import BenchmarkMember, Group, Prepared, Run, Task, holdout_rows

INPUT = "log_mel"  # the model's input (models.dacon)
EVALUATION_BATCH = 256  # rows per prediction batch
WORDS = 30  # the competition's vocabulary: the model's output is a 30-value distribution


def feature_spec(recipe: dict) -> feature_lib.MelPowerSpec:
    """The recipe's features: mel power at every (n_fft, win_length) resolution, stacked as channels."""
    features = recipe["features"]
    resolutions = tuple(
        feature_lib.MelResolution(n_fft, win_length, features["hop_length"], features["n_mels"], features["pad_mode"])
        for n_fft, win_length in zip(features["n_fft"], features["win_length"], strict=True)
    )
    return feature_lib.MelPowerSpec(feature_lib.AudioSpec.from_recipe(recipe["data"]), resolutions)


def build_model(recipe: dict, input_shape: tuple[int, int, int], num_classes: int):
    """The recipe's CNN for (mels, frames, resolutions) inputs and `num_classes` words (30), uncompiled."""
    from models.dacon import build_dacon_model

    model = recipe["model"]
    return build_dacon_model(
        input_shape=input_shape, num_classes=num_classes, dropout=model["dropout"], dense_units=model["dense_units"]
    )


@dataclass
class Arrays:
    """The prepared run: cached mel power, the normaliser and the rows of the training split."""

    train_power: np.ndarray
    test_power: np.ndarray
    normalizer: feature_lib.Normalizer
    train_rows: np.ndarray
    validation_rows: np.ndarray


class DaconTask(Task):
    name = "dacon"
    title = "DACON overlapping speech"
    description = "DACON overlapping-speech 3rd-place solution: features, seed ensemble, submission, report."
    data_help = "train/, test/, train_answer.csv, submission.csv"
    rules = {
        **feature_lib.MEL_POWER_RULES,
        "features.win_length": recipe_lib.positive,
        "features.normalization": recipe_lib.one_of("train_test", "train"),
        "model.dropout": recipe_lib.fraction,
        "model.dense_units": recipe_lib.positive,
        "train.validation_fraction": recipe_lib.fraction,
    }

    def check_recipe(self, recipe: dict) -> None:
        features = recipe["features"]
        if len(features["n_fft"]) != len(features["win_length"]):
            raise recipe_lib.RecipeError(
                f"features.n_fft has {len(features['n_fft'])} values but features.win_length has "
                f"{len(features['win_length'])}: they describe the same channels"
            )
        for n_fft, win_length in zip(features["n_fft"], features["win_length"], strict=True):
            if win_length > n_fft:
                raise recipe_lib.RecipeError(f"features.win_length {win_length} exceeds its n_fft {n_fft}")

    def load(self, data_root: Path) -> data_lib.DaconData:
        return data_lib.load_data(data_root)

    def prepare(self, run: Run, data: data_lib.DaconData) -> Prepared:
        """Cached mel power of both splits, the dB/z-score statistics (train + test, the source's, or train
        only), and the optional validation split (a seeded share of the training clips)."""
        run.log(
            f"data: {len(data.train_ids)} training clips, {len(data.test_ids)} test clips, "
            f"{len(data.class_names)} classes"
        )
        spec = feature_spec(run.recipe)
        train_power, train_meta = run.cached(spec, data.train_paths, "dacon-train")
        test_power, test_meta = run.cached(spec, data.test_paths, "dacon-test")
        features = run.recipe["features"]
        fit_on = {data.root / "train": train_power}
        if features["normalization"] == "train_test":
            fit_on[data.root / "test"] = test_power
        normalizer = feature_lib.Normalizer.fit(
            list(fit_on.values()), features["db_reference"], features["top_db"], name=" + ".join(map(str, fit_on))
        )
        fraction, seed = run.recipe["train"]["validation_fraction"], run.recipe["ensemble"]["first_seed"]
        rows, validation_rows = holdout_rows(len(train_power), fraction, seed)
        return Prepared(
            class_names=data.class_names,
            inputs={INPUT: list(train_power.shape[1:])},
            unit="clips",
            splits={"train": len(rows), "validation": len(validation_rows), "test": len(data.test_ids)},
            features={INPUT: spec.to_manifest()},
            preprocessing={"normalization": normalizer.to_config()},
            data={"audio_changes": {"train": train_meta["notes"], "test": test_meta["notes"]}},
            trained_from={
                "features": train_meta["checksums"],
                "targets": data.train_targets,
                "rows": rows,
                "normalization": normalizer.to_config(),
            },
            state=Arrays(train_power, test_power, normalizer, rows, validation_rows),
        )

    def groups(self, run: Run, data: data_lib.DaconData, prepared: Prepared) -> list[Group]:
        from replicate import pipeline

        arrays: Arrays = prepared.state
        batch_size = run.recipe["train"]["batch_size"]
        shape, classes = tuple(arrays.train_power.shape[1:]), len(data.class_names)

        def batches(**options):
            return pipeline.from_arrays(arrays.train_power, data.train_targets, transform=arrays.normalizer, **options)

        validation = None
        if len(arrays.validation_rows):
            validation = batches(batch_size=EVALUATION_BATCH, indices=arrays.validation_rows)
        return [
            Group(
                build_model=lambda seed: build_model(run.recipe, shape, classes),
                train_data=lambda seed, epoch: batches(
                    batch_size=batch_size, indices=arrays.train_rows, shuffle=True, seed=seed, epoch=epoch
                ),
                validation_data=validation,
            )
        ]

    def evaluate(self, run: Run, data: data_lib.DaconData, prepared: Prepared) -> dict:
        """Every member's test probabilities (test_predictions.npz), their mean as submission.csv, and KL of
        each member and of the first k averaged, on the test clips where they have answers and on the
        validation split where there is one."""
        from replicate import pipeline
        from replicate.ensemble import Ensemble

        arrays: Arrays = prepared.state
        ensemble = Ensemble.load(run.run_dir)
        test_inputs = pipeline.from_arrays(arrays.test_power, batch_size=EVALUATION_BATCH, transform=arrays.normalizer)
        test_members = ensemble.predict_members(test_inputs)
        ids = np.array(data.test_ids)
        files.write_npz(run.run_dir / "test_predictions.npz", seeds=ensemble.seeds, probabilities=test_members, ids=ids)
        write_submission(run.run_dir / "submission.csv", data, test_members.mean(axis=0))
        run.log(f"submission: {run.run_dir / 'submission.csv'}")

        prior = data.train_targets[arrays.train_rows].mean(axis=0)
        evaluations = {}
        if data.test_targets is not None:
            evaluations["test (synthetic answers)"] = kl_scores(test_members, data.test_targets, prior)
        if len(arrays.validation_rows):
            validation_inputs = pipeline.from_arrays(
                arrays.train_power,
                batch_size=EVALUATION_BATCH,
                indices=arrays.validation_rows,
                transform=arrays.normalizer,
            )
            evaluations["validation split"] = kl_scores(
                ensemble.predict_members(validation_inputs), data.train_targets[arrays.validation_rows], prior
            )
        scores = {"seeds": ensemble.seeds, "evaluations": evaluations}
        scores["headline"] = report_lib.headline(scores, run.recipe["source"])
        return scores

    def results(self, run: Run):
        return report_lib.results(run)

    def report(self, run: Run, data: data_lib.DaconData, prepared: Prepared):
        return report_lib.report_parts(run)

    def inference_inputs(self, manifest: dict, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Normalised log-mel inputs of audio files, with the run's feature definition and statistics."""
        # a run from before `features.pad_mode` padded with zeros, librosa >= 0.9's default
        spec, normalizer = feature_lib.saved_transform(manifest, INPUT, feature_spec, {"pad_mode": "constant"})
        return normalizer(spec.compute(paths))

    def predict(self, ensemble, inputs: Sequence[str]) -> pd.DataFrame:
        """Word shares of wav files (a folder stands for its wav files): `file` and one column per word."""
        paths = audio.wav_files(inputs)
        table = pd.DataFrame(
            ensemble.predict(self.inference_inputs(ensemble.manifest, paths)), columns=ensemble.class_names
        )
        table.insert(0, "file", [str(path) for path in paths])
        return table

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        data, features = recipe["data"], recipe["features"]
        frames = 1 + data["clip_samples"] // features["hop_length"]  # librosa's centred frames
        shape = (features["n_mels"], frames, len(features["n_fft"]))
        return BenchmarkMember(lambda: build_model(recipe, shape, WORDS), recipe["train"])


def write_submission(path: Path, data: data_lib.DaconData, probabilities: np.ndarray) -> Path:
    """The template's columns in its order, the test ids in its order, the averaged word shares."""
    submission = pd.DataFrame(probabilities, columns=data.class_names)
    submission.insert(0, "id", data.test_ids)
    with files.atomic_path(path) as temporary:
        submission[data.submission_columns].to_csv(temporary, index=False, float_format="%.8f")
    return path


def kl_scores(member_probabilities: np.ndarray, targets: np.ndarray, prior: np.ndarray) -> dict:
    """KL of each member, of the ensembles of the first k members, and of the training-prior baseline."""
    from replicate.ensemble import score_members

    return {
        "clips": len(targets),
        **score_members(member_probabilities, targets, metrics.kl_divergence, name="kl"),
        "prior_kl": metrics.kl_divergence(targets, np.broadcast_to(prior, targets.shape)),
    }


TASK = DaconTask()
