"""The AI CUP task's hooks: cached MFCCs per n_mfcc variant and the encoded clinical fields, one seed ensemble
per (modality, variant) on the variant's own split, the five-variant vote as submission, and inference from
wav files and a clinical table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import features as feature_lib
from replicate import files
from replicate import recipe as recipe_lib
from replicate.aicup import data as data_lib
from replicate.aicup import report as report_lib
from replicate.aicup import scoring
from replicate.aicup.clinical import ClinicalEncoder
from replicate.aicup.splits import Fold, check_training_classes, class_weights, split_summary, variant_folds
from replicate.audio import wav_files
from replicate.task import BenchmarkMember, DataError, Group, Prepared, Run, Task, listing

CLINICAL = "clinical"  # the clinical branch's input (models.aicup)
EVALUATION_BATCH = 256  # persons per prediction batch
MODALITIES = {True: "multimodal", False: "audio_only"}  # model.clinical → the modality's folder


def feature_spec(recipe: dict, n_mfcc: int) -> feature_lib.MfccSpec:
    """One variant's features: librosa MFCCs of the first second at 44.1 kHz (`data.*`, `features.*`)."""
    features = recipe["features"]
    audio = feature_lib.AudioSpec.from_recipe(recipe["data"])
    return feature_lib.MfccSpec(audio, n_mfcc, features["n_fft"], features["hop_length"])


def build_model(recipe: dict, n_mfcc: int, clinical: bool):
    """The recipe's model for one n_mfcc variant, multimodal or audio only, uncompiled."""
    from models.aicup import build_aicup_model

    return build_aicup_model(n_mfcc=n_mfcc, clinical=clinical, head_units=recipe["model"]["head_units"])


def modalities(recipe: dict) -> list[str]:
    """The modalities to train: the submission's (`model.clinical`), then the other with
    `ensemble.compare_modalities`."""
    main = recipe["model"]["clinical"]
    return [MODALITIES[main]] + ([MODALITIES[not main]] if recipe["ensemble"]["compare_modalities"] else [])


def group_name(modality: str, n_mfcc: int) -> str:
    """A (modality, variant) seed ensemble's folder under the run folder, e.g. "multimodal/mfcc13"."""
    return f"{modality}/mfcc{n_mfcc}"


def _variants_problem(value) -> str | None:
    """`features.n_mfcc`'s rule: distinct numbers of coefficients, each at least 2."""
    if not isinstance(value, list) or not value or any(not isinstance(v, int) or v < 2 for v in value):
        return "must be a non-empty list of integers >= 2"
    return None if len(set(value)) == len(value) else "must not repeat a value"


@dataclass
class Arrays:
    """The prepared run: list name ("train", "public", "private") → {"mfcc_<k>": (persons, k, 126, 1) per
    variant, "clinical": (persons, 44)}, and n_mfcc → its split of the training list."""

    inputs: dict[str, dict[str, np.ndarray]]
    folds: dict[int, Fold]


class AicupTask(Task):
    name = "aicup"
    title = "AI CUP 2023 pathological voice"
    description = "AI CUP 2023 pathological voice, 6th private: MFCC CNN + clinical MLP, five-variant ensemble."
    data_help = (
        "Training_Dataset/training_datalist.csv + training_voice_data/, and the public/private test lists and "
        "folders (spaces instead of underscores also work)"
    )
    rules = {
        "data.sample_rate": recipe_lib.positive,
        "data.clip_samples": recipe_lib.positive,
        "data.folds": lambda value: None if value >= 2 else "must be >= 2",
        "data.validation_fold": recipe_lib.non_negative,
        "data.split_seed": recipe_lib.non_negative,
        "features.n_mfcc": _variants_problem,
        "features.n_fft": recipe_lib.positive,
        "features.hop_length": recipe_lib.positive,
        "model.head_units": recipe_lib.positive,
        "train.class_weights": recipe_lib.one_of("inverse_count", "none"),
    }

    def check_recipe(self, recipe: dict) -> None:
        data = recipe["data"]
        if data["validation_fold"] >= data["folds"]:
            raise recipe_lib.RecipeError(
                f"data.validation_fold = {data['validation_fold']}: must be below data.folds ({data['folds']})"
            )

    def load(self, data_root: Path) -> data_lib.AicupData:
        return data_lib.load_data(data_root)

    def prepare(self, run: Run, data: data_lib.AicupData) -> Prepared:
        """Each variant's split (its classes checked before any feature), the cached MFCCs of every list per
        variant, and the clinical encoder fitted on the training list."""
        from models.aicup import mfcc_input_name

        recipe, labels = run.recipe, data.train.labels
        folds = variant_folds(labels, recipe["data"], recipe["features"]["n_mfcc"])
        check_training_classes(data.train, folds, recipe["data"])
        lists = [data.train, *data.tests]
        run.log(
            f"data: {len(data.train.ids)} training persons"
            + "".join(f", {len(split.ids)} {split.name} test persons" for split in data.tests)
        )
        inputs: dict[str, dict[str, np.ndarray]] = {split.name: {} for split in lists}
        specs, audio_changes = {}, {}
        for n_mfcc, fold in folds.items():
            run.log(
                f"n_mfcc {n_mfcc}: {len(fold.train_rows)} training, {len(fold.validation_rows)} validation persons "
                f"(split seed {fold.seed})"
            )
            spec = feature_spec(recipe, n_mfcc)
            specs[mfcc_input_name(n_mfcc)] = spec.to_manifest()
            for split in lists:
                values, meta = run.cached(spec, split.paths, f"aicup-{split.name}-mfcc{n_mfcc}")
                inputs[split.name][mfcc_input_name(n_mfcc)] = np.asarray(values)
                audio_changes[split.name] = meta["notes"]
        encoder = ClinicalEncoder.fit(data.train.clinical)
        for split in lists:
            inputs[split.name][CLINICAL] = encoder(split.clinical)
        used = [*specs, *([CLINICAL] if recipe["model"]["clinical"] else [])]
        first = next(iter(folds.values()))  # stratified folds of one table: the same sizes for every seed
        return Prepared(
            class_names=list(data_lib.CLASS_NAMES),
            inputs={name: list(inputs["train"][name].shape[1:]) for name in used},
            unit="persons",
            splits={
                "train": len(first.train_rows),
                "validation": len(first.validation_rows),
                **{split.name: len(split.ids) for split in data.tests},
            },
            features=specs,
            preprocessing={"clinical_encoder": encoder.to_config()},
            data={
                "training_list_persons": len(data.train.ids),
                "split": split_summary(labels, recipe["data"], folds),
                "audio_changes": audio_changes,
                "empty_cells_filled": {split.name: split.empty_cells for split in lists},
                "extra_wavs": {split.name: split.extra_wavs for split in lists},
            },
            state=Arrays(inputs, folds),
        )

    def groups(self, run: Run, data: data_lib.AicupData, prepared: Prepared) -> list[Group]:
        """A seed ensemble per (modality, variant), "<modality>/mfcc<k>"; the submission modality's are the
        run's ensemble."""
        train_recipe = run.recipe["train"]
        smallest = min(len(fold.train_rows) for fold in prepared.state.folds.values())
        if train_recipe["drop_last_batch"] and smallest < train_recipe["batch_size"]:
            raise DataError(
                f"{smallest} training persons make no full batch of train.batch_size = {train_recipe['batch_size']} "
                "(train.drop_last_batch = true drops incomplete batches)"
            )
        return [
            variant_group(run, data.train.labels, prepared.state, modality, n_mfcc)
            for modality in modalities(run.recipe)
            for n_mfcc in run.recipe["features"]["n_mfcc"]
        ]

    def evaluate(self, run: Run, data: data_lib.AicupData, prepared: Prepared) -> dict:
        """Every member's probabilities on its variant's validation fold and on the test lists
        (predictions.npz), the submission modality's vote on the test lists (submission.csv), and the scores
        where labels exist: members and variants on their own rows, the ensemble where the rows are shared."""
        held_out = held_out_lists(data, prepared.state)
        main = MODALITIES[run.recipe["model"]["clinical"]]
        scores, saved = {"modalities": {}, "main": main}, {}
        for modality in modalities(run.recipe):
            members, probabilities = predict_held_out(run, modality, held_out)
            splits = {}
            for name, (_, labels, rows) in held_out.items():
                if scoring.shared_rows(rows):
                    saved[f"{modality}/{name}"] = np.concatenate(list(probabilities[name].values()))
                else:  # each variant on its own persons
                    saved.update({f"{modality}/{name}_mfcc{k}": value for k, value in probabilities[name].items()})
                if labels is not None:
                    splits[name] = scoring.list_scores(labels, rows, probabilities[name])
            scores["modalities"][modality] = {"members": members, "splits": splits}
        files.write_npz(run.run_dir / "predictions.npz", **{key.replace("/", "__"): v for key, v in saved.items()})
        if data.tests:
            votes = {split.name: saved[f"{main}/{split.name}"] for split in data.tests}
            run.log(f"submission: {write_submission(run.run_dir / 'submission.csv', data.tests, votes)}")
        labelled = {
            name: labels[next(iter(rows.values()))]
            for name, (_, labels, rows) in held_out.items()
            if labels is not None
        }
        scores.update(scoring.majority_uar(data.train.labels, labelled))
        scores["headline"] = report_lib.headline(scores, run.recipe["source"])
        return scores

    results = staticmethod(report_lib.results)

    def report(self, run: Run, data: data_lib.AicupData, prepared: Prepared):
        return report_lib.report_parts(run)

    def inference_inputs(self, manifest: dict, paths: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
        """Every variant's MFCC inputs of wav files, for an audio-only run (a multimodal run's members also take
        the persons' clinical fields: `model_inputs` with them, or `predict` with their table)."""
        require_clinical(manifest, None)
        return model_inputs(manifest, paths)

    def predict(self, ensemble, inputs: Sequence[str]) -> pd.DataFrame:
        """A class per person from wav files (a folder stands for its wav files) and, for a multimodal run,
        the persons' clinical table (a CSV in the competition's columns, one row per wav by ID): `ID`, `file`,
        `label` (1-5), `diagnosis`, and the members' mean probability of each class."""
        tables = [Path(item) for item in inputs if Path(item).suffix.lower() == ".csv"]
        if len(tables) > 1:
            raise DataError(f"one clinical table at most; given {listing(tables)}")
        paths = wav_files([item for item in inputs if Path(item).suffix.lower() != ".csv"])
        clinical = clinical_rows(tables[0], paths) if tables else None
        require_clinical(ensemble.manifest, clinical, str(ensemble.run_dir))
        probabilities = ensemble.predict_members(model_inputs(ensemble.manifest, paths, clinical), EVALUATION_BATCH)
        labels = scoring.vote(probabilities)
        table = pd.DataFrame(probabilities.mean(axis=0), columns=ensemble.class_names)
        table.insert(0, "ID", [path.stem for path in paths])
        table.insert(1, "file", [str(path) for path in paths])
        table.insert(2, "label", labels)
        table.insert(3, "diagnosis", [data_lib.CLASS_NAMES[label - 1] for label in labels])
        return table

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        """The first variant (n_mfcc 13), multimodal as the recipe's default."""
        n_mfcc = recipe["features"]["n_mfcc"][0]
        return BenchmarkMember(lambda: build_model(recipe, n_mfcc, recipe["model"]["clinical"]), recipe["train"])


def variant_group(run: Run, labels: np.ndarray, state: Arrays, modality: str, n_mfcc: int) -> Group:
    """One (modality, variant) seed ensemble: trained on the variant's training persons with sample weights
    1/count of their class (`pipeline.from_columns`), the best epoch kept by validation UAR."""
    from models.aicup import mfcc_input_name
    from replicate import pipeline, train

    recipe, fold, clinical = run.recipe, state.folds[n_mfcc], modality == MODALITIES[True]
    names = [mfcc_input_name(n_mfcc), *([CLINICAL] if clinical else [])]
    train_inputs = {name: state.inputs["train"][name][fold.train_rows] for name in names}
    validation_inputs = {name: state.inputs["train"][name][fold.validation_rows] for name in names}
    train_labels, validation_labels = labels[fold.train_rows], labels[fold.validation_rows]
    inverse_count = recipe["train"]["class_weights"] == "inverse_count"
    weights = class_weights(train_labels) if inverse_count else np.ones(len(data_lib.CLASS_NAMES))
    one_hot = np.eye(len(data_lib.CLASS_NAMES), dtype=np.float32)
    score = scoring.validation_scorer(validation_inputs, validation_labels, EVALUATION_BATCH)
    return Group(
        name=group_name(modality, n_mfcc),
        build_model=lambda seed: build_model(recipe, n_mfcc, clinical),
        train_data=lambda seed, epoch: pipeline.from_columns(
            train_inputs,
            one_hot[train_labels - 1],
            weights=weights[train_labels - 1],  # with the loss's mean_with_sample_weight: PyTorch's weighted mean
            batch_size=recipe["train"]["batch_size"],
            shuffle=True,
            seed=seed,
            epoch=epoch,
            drop_remainder=recipe["train"]["drop_last_batch"],  # the source's loader: drop_last=True
        ),
        validation_data=pipeline.from_columns(
            validation_inputs, one_hot[validation_labels - 1], batch_size=EVALUATION_BATCH
        ),
        member_callbacks=lambda folder, member: [train.BestEpoch(score, monitor="val_uar", mode="max")],
        # the recipe as this variant is trained, so that other variants or modalities leave its members be
        recipe={
            **recipe,
            "features": {**recipe["features"], "n_mfcc": [n_mfcc]},
            "model": {**recipe["model"], "clinical": clinical},
        },
        trained_from={
            "inputs": train_inputs,
            "labels": train_labels,
            "class weights": weights,
            "validation inputs": validation_inputs,  # they choose the best epoch
            "validation labels": validation_labels,
        },
        manifest={
            "modality": modality,
            "n_mfcc": n_mfcc,
            "inputs": {name: list(train_inputs[name].shape[1:]) for name in names},
        },
        ensemble=modality == MODALITIES[recipe["model"]["clinical"]],
    )


def held_out_lists(data: data_lib.AicupData, state: Arrays) -> dict[str, tuple]:
    """List name → (its inputs, its labels or None, n_mfcc → the rows each variant predicts): each variant's own
    validation fold of the training list, and every test list whole."""
    validation_rows = {k: fold.validation_rows for k, fold in state.folds.items()}
    held_out = {"validation": (state.inputs["train"], data.train.labels, validation_rows)}
    for split in data.tests:
        rows = dict.fromkeys(state.folds, np.arange(len(split.ids)))
        held_out[split.name] = (state.inputs[split.name], split.labels, rows)
    return held_out


def predict_held_out(
    run: Run, modality: str, held_out: Mapping[str, tuple]
) -> tuple[list[dict], dict[str, dict[int, np.ndarray]]]:
    """A modality's members (n_mfcc, seed, best epoch) and, per held-out list, each variant's members'
    probabilities on the variant's rows: {list name: {n_mfcc: (seeds, rows, 5)}}.

    Raises:
        PredictionError: a member predicts a NaN or infinite probability, naming its group and the list.
    """
    from replicate.ensemble import Ensemble, PredictionError

    ensembles = {
        k: Ensemble.load(run.run_dir, groups=[group_name(modality, k)]) for k in run.recipe["features"]["n_mfcc"]
    }
    members = [
        {"n_mfcc": k, "seed": entry["seed"], "best_epoch": entry.get("best_epoch")}
        for k, ensemble in ensembles.items()
        for entry in ensemble.manifest["members"]
    ]
    probabilities = {}
    for name, (inputs, _, rows) in held_out.items():
        probabilities[name] = {}
        for k, ensemble in ensembles.items():
            try:
                probabilities[name][k] = ensemble.predict_members(
                    {key: value[rows[k]] for key, value in inputs.items()}, EVALUATION_BATCH
                )
            except PredictionError as error:
                raise PredictionError(f"{group_name(modality, k)}, the {name} persons: {error}") from error
    return members, probabilities


def write_submission(path: Path, tests: Sequence[data_lib.Split], probabilities: Mapping[str, np.ndarray]) -> Path:
    """The competition's submission: `ID,label` without a header, labels 1-5, the public then the private rows."""
    lines = [
        f"{identifier},{label}"
        for split in tests
        for identifier, label in zip(split.ids, scoring.vote(probabilities[split.name]), strict=True)
    ]
    return files.write_text(path, "\n".join(lines) + "\n")


def model_inputs(
    manifest: Mapping, paths: Sequence[str | os.PathLike], clinical: pd.DataFrame | None = None
) -> dict[str, np.ndarray]:
    """A run's model inputs for new persons, computed as in training from its manifest: {"mfcc_<k>": (persons,
    k, 126, 1) for every variant, and given the persons' clinical columns (`data.read_table`, a row per path)
    "clinical": (persons, 44)}."""
    inputs = {
        name: feature_lib.FeatureSpec.from_manifest(entry).compute(paths)
        for name, entry in manifest["features"].items()
    }
    if clinical is not None:
        if len(clinical) != len(paths):
            raise ValueError(f"{len(paths)} audio files but {len(clinical)} clinical rows")
        inputs[CLINICAL] = ClinicalEncoder.from_config(manifest["preprocessing"]["clinical_encoder"])(clinical)
    return inputs


def require_clinical(manifest: Mapping, clinical: pd.DataFrame | None, run: str = "") -> None:
    """Refuse to predict with multimodal members (their group "multimodal/mfcc<k>") without the persons'
    clinical fields (`DataError` naming the run folder `run`); the audio-only groups of any run need none."""
    multimodal = any(entry["group"].split("/")[0] == MODALITIES[True] for entry in manifest["members"])
    if clinical is None and multimodal:
        raise DataError(
            f"{run + ': ' if run else ''}the run is multimodal: its members also take each person's clinical "
            "fields; give the persons' clinical table (a CSV in the competition's columns) with the wav files"
        )


def clinical_rows(table: Path, paths: Sequence[Path]) -> pd.DataFrame:
    """The clinical columns of each wav file's person (its ID the file's name) from a table in the
    competition's columns, checked as the data lists are (`data.read_table`)."""
    clinical, _, _ = data_lib.read_table(table, labelled=False)
    by_id = clinical.set_index(data_lib.ID_COLUMN)
    missing = [str(path) for path in paths if path.stem not in by_id.index]
    if missing:
        raise DataError(
            f"{table}: no row for the wav files {listing(missing)} (a row per person, its ID the file's name)"
        )
    return by_id.loc[[path.stem for path in paths]].reset_index()


TASK = AicupTask()
