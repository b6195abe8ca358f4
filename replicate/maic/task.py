"""The MAIC task's hooks: per-person CSVs cut into tokens, the (diagnosis, sex, age band) sub-classes, one
seed ensemble of the mini-ResNet on random 64-frame crops (best epoch by validation macro F1), and each
person diagnosed by the label-masked votes of its tokens.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import files, metrics
from replicate import recipe as recipe_lib
from replicate.maic import report as report_lib
from replicate.maic.data import DIAGNOSES, MaicData, Person, load_data, load_split
from replicate.maic.labels import SubclassTable, diagnosis_probabilities, person_predictions, score_persons
from replicate.maic.tokens import Inputs, TokenStore, fit_normalization, person_rows, token_store
from replicate.task import BenchmarkMember, DataError, Group, Prepared, Run, Task, holdout_rows

VALIDATION_BATCH = 256  # tokens per batch when the members are scored on the validation split every epoch
REAL_SUBCLASSES = 21  # the sub-classes of the real data (the recipe derives them from the data)


def build_model(recipe: dict, num_classes: int):
    """The recipe's mini-ResNet for `num_classes` sub-classes (21 on the real data), uncompiled."""
    from models.maic import build_maic_model

    data, frames = recipe["data"], recipe["features"]["frames"]
    return build_maic_model(mel_bins=data["mel_bins"], frames=frames, num_classes=num_classes, **recipe["model"])


@dataclass
class Tokens:
    """The prepared run: the token stores, the sub-classes, how tokens become inputs, the split."""

    train: TokenStore
    test: TokenStore | None
    table: SubclassTable
    inputs: Inputs
    subclass: np.ndarray  # per training token, its person's sub-class
    train_rows: np.ndarray
    validation_rows: np.ndarray
    validation_masks: np.ndarray  # per validation token, the sub-classes its person's group allows

    @property
    def labels(self) -> np.ndarray:
        """One-hot sub-class targets per training token."""
        return np.eye(len(self.table.entries), dtype=np.float32)[self.subclass]

    def validation_f1(self, probabilities: np.ndarray, masks: np.ndarray | None) -> tuple[float, float]:
        """Token-level macro F1 on the validation tokens over the sub-classes (argmax) and over the diagnoses
        (after `masks`, or none): sklearn's macro F1 over the classes present on either side, most likely
        what the source's 0.7346 is."""
        targets = self.subclass[self.validation_rows]
        diagnoses = diagnosis_probabilities(probabilities, self.table, masks).argmax(axis=1)
        return (
            metrics.macro_f1(targets, probabilities.argmax(axis=1)),
            metrics.macro_f1(self.table.diagnosis_index[targets], diagnoses),
        )


class MaicTask(Task):
    name = "maic"
    title = "MAIC 2021 voice pathology"
    description = "MAIC 2021 voice-pathology 1st-place solution: tokens, mini-ResNet ensemble, person votes."
    data_help = "train/ and test/ with <id>.csv (128 mel rows) + <id>.json / <id>_*.json per person"
    rules = {
        "data.mel_bins": recipe_lib.positive,
        "features.frames": recipe_lib.positive,
        "features.normalization": recipe_lib.one_of("zscore", "none"),
        "features.age_scale": recipe_lib.positive,
        "labels.age_threshold": recipe_lib.positive,
        "model.resized_mel_bins": recipe_lib.positive,
        "model.stem_filters": recipe_lib.positive,
        "model.stage_filters": recipe_lib.positive,
        "model.blocks_per_stage": recipe_lib.positive,
        "model.stage_strides": recipe_lib.positive,
        "model.dropout": recipe_lib.fraction,
        "model.dense_units": recipe_lib.positive,
        "train.lr_factor": recipe_lib.fraction,
        "train.lr_patience": recipe_lib.positive,
        "train.lr_monitor": recipe_lib.one_of("val_loss", "val_macro_f1"),
        "train.early_stopping_patience": recipe_lib.non_negative,
        "train.monitor": recipe_lib.one_of("val_macro_f1", "val_diagnosis_f1"),
        "split.by": recipe_lib.one_of("token", "person"),
        "split.validation_fraction": recipe_lib.fraction,
        "inference.batch_size": recipe_lib.positive,
        "inference.tokens_per_person": recipe_lib.non_negative,
        "inference.crop_seed": recipe_lib.non_negative,
        "inference.tie_rule": recipe_lib.one_of("probability", "first"),
    }

    def check_recipe(self, recipe: dict) -> None:
        model = recipe["model"]
        if len(model["stage_filters"]) != len(model["stage_strides"]):
            raise recipe_lib.RecipeError(
                f"model.stage_filters {model['stage_filters']} and model.stage_strides {model['stage_strides']} "
                "need one value per stage"
            )
        if len(model["dense_units"]) != 2:
            raise recipe_lib.RecipeError(f"model.dense_units must have two values, got {model['dense_units']}")

    def load(self, data_root: Path) -> MaicData:
        return load_data(data_root)

    def prepare(self, run: Run, data: MaicData) -> Prepared:
        """The token stores (from the cache), the sub-class table, the split, the token mean and std."""
        recipe = run.recipe
        run.log(f"data: {len(data.train)} training persons, {len(data.test)} test persons")
        cache = {"cache_dir": recipe["run"]["cache_dir"], "progress": run.progress, "log": run.log}
        train_store = token_store(data.train, recipe["data"], name="maic-train", **cache)
        test_store = token_store(data.test, recipe["data"], name="maic-test", **cache) if data.test else None
        table = SubclassTable.from_persons(data.train, recipe["labels"]["age_threshold"], recipe["labels"]["subdivide"])
        subclass = np.array([table.subclass_of(person) for person in data.train])[train_store.person]
        train_rows, validation_rows = split_rows(train_store, data.train, recipe)
        features = recipe["features"]
        mean, std = fit_normalization(train_store, train_rows, features["normalization"])
        inputs = Inputs(features["frames"], mean, std, features["age_scale"])
        masks = table.masks(data.train)[train_store.person[validation_rows]]
        tokens = Tokens(train_store, test_store, table, inputs, subclass, train_rows, validation_rows, masks)
        splits = {
            "train": len(train_rows),
            "validation": len(validation_rows),
            "test": 0 if test_store is None else len(test_store),
        }
        run.log(
            f"tokens: {splits['train']} training, {splits['validation']} validation ({recipe['split']['by']} split), "
            f"{splits['test']} test; {len(table.entries)} sub-classes"
        )
        validation_persons = sorted({data.train[p].person_id for p in train_store.person[validation_rows]})
        return Prepared(
            class_names=table.labels,
            inputs={"mel": [recipe["data"]["mel_bins"], inputs.frames, 1], "aux": [2]},
            unit="tokens",
            splits=splits,
            preprocessing={
                "inputs": inputs.to_config(),
                "subclasses": table.to_config(),
                "diagnoses": list(DIAGNOSES),
                "inference": dict(recipe["inference"]),
                "data": dict(recipe["data"]),
            },
            data={
                "validation_persons": validation_persons,
                "counts": {"train": train_store.counts, "test": test_store.counts if test_store else None},
            },
            trained_from={
                "tokens": train_store.checksums,
                "labels": tokens.labels,
                "aux": inputs.aux(data.train)[train_store.person],
                "rows": train_rows,
                "validation rows": validation_rows,  # they choose the best epoch
                "inputs": inputs.to_config(),
                "subclasses": table.to_config(),
            },
            state=tokens,
        )

    def groups(self, run: Run, data: MaicData, prepared: Prepared) -> list[Group]:
        """One seed ensemble: random crops of the training tokens, scored every epoch on the validation
        tokens' fixed crops (best epoch, learning-rate plateau, early stopping)."""
        from replicate import pipeline

        tokens: Tokens = prepared.state
        recipe, labels = run.recipe, tokens.labels
        train_columns = tokens.inputs.columns(tokens.train, data.train)
        validation, member_callbacks = None, None
        if len(tokens.validation_rows):
            crop_seed = recipe["inference"]["crop_seed"]
            validation = pipeline.from_columns(
                tokens.inputs.columns(tokens.train, data.train, crop_seed=crop_seed),
                labels,
                batch_size=VALIDATION_BATCH,
                indices=tokens.validation_rows,
            )
            score = validation_score(validation, tokens)

            def member_callbacks(member_dir: Path, name: str) -> list:
                return callbacks_of(recipe["train"], score)

        return [
            Group(
                build_model=lambda seed: build_model(recipe, len(tokens.table.entries)),
                train_data=lambda seed, epoch: pipeline.from_columns(
                    train_columns,
                    labels,
                    batch_size=recipe["train"]["batch_size"],
                    indices=tokens.train_rows,
                    shuffle=True,
                    seed=seed,
                    epoch=epoch,
                ),
                validation_data=validation,
                member_callbacks=member_callbacks,
            )
        ]

    def evaluate(self, run: Run, data: MaicData, prepared: Prepared) -> dict:
        """Diagnose the test persons (submission.csv; every member's token probabilities in
        test_predictions.npz), and score them where they have answers, the validation tokens, and the
        validation persons of a person split."""
        from replicate.ensemble import Ensemble

        tokens: Tokens = prepared.state
        ensemble = Ensemble.load(run.run_dir)
        train_diagnoses = np.array([DIAGNOSES.index(person.diagnosis) for person in data.train])
        majority = int(np.bincount(train_diagnoses, minlength=len(DIAGNOSES)).argmax())
        evaluations = {}
        if tokens.test is not None:
            test = test_scores(run, ensemble, data, tokens, majority)
            if test is not None:
                evaluations["test (synthetic answers)"] = test
        validation = None
        if len(tokens.validation_rows):
            members = token_predictions(ensemble, tokens.train, data.train, tokens.validation_rows)
            validation = validation_scores(members, tokens, run.recipe)
            if run.recipe["split"]["by"] == "person":  # every token of a validation person votes
                token_person = tokens.train.person[tokens.validation_rows]
                persons = np.unique(token_person)
                evaluations["validation persons"] = score_persons(
                    members,
                    np.searchsorted(persons, token_person),
                    [data.train[index] for index in persons],
                    train_diagnoses[persons],
                    tokens.table,
                    run.recipe["inference"],
                    majority,
                )
        scores = {"seeds": ensemble.seeds, "evaluations": evaluations, "validation": validation}
        scores["headline"] = report_lib.headline(scores, run.recipe["source"])
        return scores

    def results(self, run: Run):
        return report_lib.results(run)

    def report(self, run: Run, data: MaicData, prepared: Prepared):
        return report_lib.report_parts(run, data, prepared.state)

    def predict(self, ensemble, inputs: Sequence[str]) -> pd.DataFrame:
        """Diagnose the persons of folders (`<id>.csv` + JSON per person, no diagnosis needed) exactly as the
        run's test persons were: one row per person, wav_code, diagnosis, p_<diagnosis>."""
        persons = [person for folder in inputs for person in load_split(Path(folder), labelled=False)]
        repeated = sorted(identifier for identifier, n in Counter(p.person_id for p in persons).items() if n > 1)
        if repeated:
            raise DataError(f"{', '.join(inputs)}: the folders share the persons {', '.join(repeated)}")
        with tempfile.TemporaryDirectory(prefix="maic-predict-") as cache_dir:
            settings = inference_settings(ensemble.manifest)
            store = token_store(persons, settings["data"], cache_dir=cache_dir, name="maic-predict", progress=False)
            _, _, predicted, probabilities = diagnose(ensemble, store, persons)
        return submission_table(persons, predicted, probabilities)

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        return BenchmarkMember(lambda: build_model(recipe, REAL_SUBCLASSES), recipe["train"])


def split_rows(store: TokenStore, persons: Sequence[Person], recipe: dict) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of the training store: a seeded random share of the tokens
    (split.by = "token", the source's) or of the persons, stratified by diagnosis ("person")."""
    fraction, seed = recipe["split"]["validation_fraction"], recipe["ensemble"]["first_seed"]
    if fraction == 0 or recipe["split"]["by"] == "token":
        return holdout_rows(len(store), fraction, seed)
    rows, is_validation = np.arange(len(store)), np.isin(store.person, person_split(persons, fraction, seed))
    return rows[~is_validation], rows[is_validation]


def person_split(persons: Sequence[Person], fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation persons: about `fraction` of every diagnosis (at least one person of
    each diagnosis that has two or more), seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for diagnosis in DIAGNOSES:
        members = np.flatnonzero([person.diagnosis == diagnosis for person in persons])
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return np.sort(np.array(chosen, dtype=np.int64))


# --- training: the validation score and the members' callbacks -----------------------------------------


def validation_score(validation, tokens: Tokens):
    """model → {"val_macro_f1": token macro F1 over sub-classes, "val_diagnosis_f1": over diagnoses after
    masking} on the validation tokens (`train.BestEpoch`'s score)."""
    inputs = validation.map(lambda features, _: features)

    def score(model) -> dict:
        subclass_f1, diagnosis_f1 = tokens.validation_f1(model.predict(inputs, verbose=0), tokens.validation_masks)
        return {"val_macro_f1": subclass_f1, "val_diagnosis_f1": diagnosis_f1}

    return score


def callbacks_of(train_recipe: dict, score) -> list:
    """A member's own callbacks: the best epoch by `train.monitor`, ReduceLROnPlateau, early stopping."""
    import keras

    from replicate import train

    callbacks = [
        train.BestEpoch(score, monitor=train_recipe["monitor"]),
        keras.callbacks.ReduceLROnPlateau(
            monitor=train_recipe["lr_monitor"],
            mode="min" if train_recipe["lr_monitor"] == "val_loss" else "max",
            factor=train_recipe["lr_factor"],
            patience=train_recipe["lr_patience"],
        ),
    ]
    if train_recipe["early_stopping_patience"]:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=train_recipe["monitor"], mode="max", patience=train_recipe["early_stopping_patience"]
            )
        )
    return callbacks


# --- inference: tokens → members' probabilities → persons ----------------------------------------------


def inference_settings(manifest: dict) -> dict:
    """What inference needs (inputs, sub-classes, the inference and data tables) from a run's manifest;
    also from a run made before the manifest schema (no `schema_version`), which kept them elsewhere."""
    if "schema_version" in manifest:
        return manifest["preprocessing"]
    saved = manifest["recipe"]
    return {"inputs": manifest["inputs"], "subclasses": manifest["subclasses"], **saved}


def token_predictions(ensemble, store: TokenStore, persons: Sequence[Person], rows: np.ndarray) -> np.ndarray:
    """Every member's sub-class probabilities for the tokens `rows` of a store, (members, rows, sub-classes):
    the run's fixed crops (`inference.crop_seed`) and batch size, as every evaluation of the run."""
    from replicate import pipeline

    settings = inference_settings(ensemble.manifest)
    inference = settings["inference"]
    columns = Inputs.from_config(settings["inputs"]).columns(store, persons, crop_seed=inference["crop_seed"])
    return ensemble.predict_members(pipeline.from_columns(columns, batch_size=inference["batch_size"], indices=rows))


def diagnose(ensemble, store: TokenStore, persons: Sequence[Person]):
    """The persons' diagnoses by the ensemble: (member probabilities of the voting tokens, their rows, the
    diagnosis index per person, the mean diagnosis probabilities per person)."""
    settings = inference_settings(ensemble.manifest)
    inference = settings["inference"]
    rows = person_rows(store, inference["tokens_per_person"])
    members = token_predictions(ensemble, store, persons, rows)
    predicted, probabilities = person_predictions(
        members.mean(axis=0),
        store.person[rows],
        persons,
        SubclassTable.from_config(settings["subclasses"]),
        masking=inference["label_masking"],
        tie_rule=inference["tie_rule"],
    )
    return members, rows, predicted, probabilities


def submission_table(persons: Sequence[Person], predicted: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """wav_code, predicted diagnosis ("" for a person without tokens), p_<diagnosis> per person."""
    table = pd.DataFrame(probabilities, columns=[f"p_{name}" for name in DIAGNOSES])
    table.insert(0, "diagnosis", [DIAGNOSES[i] if i >= 0 else "" for i in predicted])
    table.insert(0, "wav_code", [person.person_id for person in persons])
    return table


# --- evaluation --------------------------------------------------------------------------------------------


def test_scores(run: Run, ensemble, data: MaicData, tokens: Tokens, majority: int) -> dict | None:
    """Diagnose the test persons: submission.csv (one row per person: wav_code, the diagnosis, the mean
    masked probability of each diagnosis over its voting tokens; the competition's own format is not
    published), test_predictions.npz; their scores where they have answers (None otherwise)."""
    members, rows, predicted, probabilities = diagnose(ensemble, tokens.test, data.test)
    token_person = tokens.test.person[rows]
    saved = {"seeds": ensemble.seeds, "probabilities": members, "rows": rows, "person": token_person}
    files.write_npz(run.run_dir / "test_predictions.npz", **saved)
    with files.atomic_path(run.run_dir / "submission.csv", suffix=".csv") as temporary:
        submission_table(data.test, predicted, probabilities).to_csv(temporary, index=False, float_format="%.6f")
    run.log(f"submission: {run.run_dir / 'submission.csv'}")
    if data.test_answers is None:
        return None
    targets = np.array([DIAGNOSES.index(data.test_answers[person.person_id]) for person in data.test])
    return score_persons(members, token_person, data.test, targets, tokens.table, run.recipe["inference"], majority)


def validation_scores(members: np.ndarray, tokens: Tokens, recipe: dict) -> dict:
    """Each member's token-level macro F1 on the validation tokens (`Tokens.validation_f1`), as at its best
    epoch; over diagnoses with the recipe's masking."""
    masks = tokens.validation_masks if recipe["inference"]["label_masking"] else None
    scores = [tokens.validation_f1(member, masks) for member in members]
    return {
        "tokens": len(tokens.validation_rows),
        "split": recipe["split"]["by"],
        "member_token_macro_f1": [subclass_f1 for subclass_f1, _ in scores],
        "member_token_diagnosis_macro_f1": [diagnosis_f1 for _, diagnosis_f1 in scores],
    }


TASK = MaicTask()
