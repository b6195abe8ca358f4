"""The DCASE task's hooks: log-mel power with torchaudio's definition, the training clips' z-score, the
set-up's seed ensembles of machine-ID classifiers (one integrated model, one per machine type, or the
integrated model then a classifier fine-tuned per machine type), every anomaly score of the test clips,
the official CSVs, and anomaly scores of new wav files by the run's score method.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from replicate import audio, files
from replicate import features as feature_lib
from replicate import recipe as recipe_lib
from replicate.dcase import data as data_lib
from replicate.dcase import report as report_lib
from replicate.dcase import scoring
from replicate.dcase.members import (
    Arrays,
    dev_score_callback,
    ensemble_outputs,
    ensemble_scores,
    export_members,
    rows_of,
    train_recipe_for,
    training_dataset,
)
from replicate.task import BenchmarkMember, DataError, Group, Prepared, Run, Task, listing

INPUT = "log_mel"  # the models' input (models.dcase)
SETUPS = ("integrated", "per_machine", "finetune")
HEADS = ("arcface", "cosface", "softmax")
REAL_DATA_IDS = 41  # machine IDs of the real data, all of which the integrated model classifies
# What runs made before the recipe had `features.pad_mode`, `mel_scale` and `mel_norm` computed (librosa's).
LIBROSA_DEFINITION = {"pad_mode": "constant", "mel_scale": "slaney", "mel_norm": "slaney"}


def mel_resolution(features: dict) -> feature_lib.MelResolution:
    """The recipe's `[features]` as a `MelResolution` (the window is n_fft long, as torchaudio's default)."""
    names = ("hop_length", "n_mels", "pad_mode", "mel_scale", "mel_norm")
    return feature_lib.MelResolution(features["n_fft"], features["n_fft"], **{name: features[name] for name in names})


def feature_spec(recipe: dict) -> feature_lib.MelPowerSpec:
    """The recipe's features: mel power at one resolution, (clips, n_mels, frames, 1)."""
    return feature_lib.MelPowerSpec(
        feature_lib.AudioSpec.from_recipe(recipe["data"]), (mel_resolution(recipe["features"]),)
    )


def build_model(recipe: dict, input_shape: tuple[int, int, int], num_classes: int):
    """The recipe's training model: IR-ResNet-50 + margin classifier, or the bottleneck ResNet-50 softmax."""
    from models import dcase as dcase_models

    model = recipe["model"]
    if model["head"] == "softmax":
        return dcase_models.build_resnet50_softmax(input_shape, num_classes, model["blocks"], model["width"])
    options = {key: model[key] for key in ("scale", "margin", "embedding_dim", "dropout", "blocks", "width")}
    return dcase_models.build_ir_resnet50_margin(input_shape, num_classes, margin_type=model["head"], **options)


def model_groups(setup: str, machine_types: Sequence[str]) -> dict[str, list[tuple[str, list[str]]]]:
    """The set-up's model groups (the rows of scores.json, in training order; the last is the set-up's own)
    → their seed ensembles: (folder in the run folder, the machine types whose IDs it classifies)."""
    integrated = [("integrated", list(machine_types))]
    if setup == "integrated":
        return {"integrated": integrated}
    per_type = [(f"{setup}/{machine_type}", [machine_type]) for machine_type in machine_types]
    return {"integrated": integrated, setup: per_type} if setup == "finetune" else {setup: per_type}


class DcaseTask(Task):
    name = "dcase"
    title = "DCASE 2020 Task 2"
    description = "DCASE 2020 Task 2 machine-ID classifier (ResNet-50 + ArcFace): scores, official CSVs, report."
    data_help = "dev_data/<type>/{train,test}/ and optionally eval_data/<type>/{train,test}/"
    rules = {
        **feature_lib.MEL_POWER_RULES,
        "features.mel_scale": recipe_lib.one_of(*feature_lib.MEL_SCALES),
        "features.mel_norm": recipe_lib.one_of(*feature_lib.MEL_NORMS),
        "features.input_frames": recipe_lib.non_negative,
        "model.head": recipe_lib.one_of(*HEADS),
        "model.scale": recipe_lib.positive,
        "model.margin": recipe_lib.non_negative,
        "model.embedding_dim": recipe_lib.positive,
        "model.dropout": recipe_lib.fraction,
        "model.blocks": recipe_lib.positive,
        "model.width": recipe_lib.positive,
        "train.setup": recipe_lib.one_of(*SETUPS),
        "train.loss": recipe_lib.one_of("CategoricalCrossentropy", "CategoricalFocalCrossentropy"),
        "train.warmup_epochs": recipe_lib.non_negative,
        "train.first_cycle_epochs": recipe_lib.positive,
        "train.cycle_mult": recipe_lib.positive,
        "train.mixup_alpha": recipe_lib.non_negative,
        "train.score_every": recipe_lib.positive,
        "finetune.epochs": recipe_lib.positive,
        "finetune.mixup_alpha": recipe_lib.non_negative,
        "score.method": recipe_lib.one_of(*scoring.SCORE_METHODS),
        "score.gmm_components": recipe_lib.positive,
        "score.lof_neighbors": recipe_lib.positive,
        "score.max_fpr": lambda value: None if 0 < value <= 1 else "must be in (0, 1]",
    }

    def load_recipe(self, profile: str | None = None, overrides: Sequence[str] = (), path: str | None = None) -> dict:
        """The recipe with a profile and overrides, validated; `setup=X` is short for `train.setup=X`."""
        overrides = [f"train.{item}" if item.split("=", 1)[0].strip() == "setup" else item for item in overrides]
        return super().load_recipe(profile, overrides, path)

    def check_recipe(self, recipe: dict) -> None:
        train_table = recipe["train"]
        if len(recipe["model"]["blocks"]) != 4:
            raise recipe_lib.RecipeError(f"model.blocks = {recipe['model']['blocks']}: must be four unit counts")
        if train_table["warmup_epochs"] >= train_table["first_cycle_epochs"]:
            raise recipe_lib.RecipeError(
                f"train.warmup_epochs = {train_table['warmup_epochs']} must be shorter than "
                f"train.first_cycle_epochs = {train_table['first_cycle_epochs']}"
            )

    def load(self, data_root: Path) -> data_lib.DcaseData:
        return data_lib.load_data(data_root)

    def prepare(self, run: Run, data: data_lib.DcaseData) -> Prepared:
        """Cached mel power of the training, development test and evaluation test clips, and the dB/z-score
        statistics of the training clips."""
        run.log(
            f"data: {len(data.machine_types)} machine types, {len(data.class_names)} IDs, {len(data.train)} "
            f"training, {len(data.dev_test)} development test, {len(data.eval_test)} evaluation test clips"
        )
        spec, features = feature_spec(run.recipe), run.recipe["features"]
        cached = {
            split: run.cached(spec, [clip.path for clip in clips], f"dcase-{split.replace(' ', '-')}")
            for split, clips in (("train", data.train), ("dev test", data.dev_test), ("eval test", data.eval_test))
            if clips
        }
        train_power = cached["train"][0]
        normalizer = feature_lib.Normalizer.fit(
            [train_power],
            features["db_reference"],
            features["top_db"],
            name=f"the training clips of {data.root} (<dataset>/<machine type>/train/)",
        )
        frames = features["input_frames"] or train_power.shape[2]
        return Prepared(
            class_names=data.class_names,
            inputs={INPUT: [train_power.shape[1], frames, 1]},
            unit="clips",
            splits={
                "train": len(data.train),
                "validation": 0,
                "dev_test": len(data.dev_test),
                "eval_test": len(data.eval_test),
            },
            features={INPUT: spec.to_manifest()},
            preprocessing={
                "normalization": normalizer.to_config(),
                "score": {"method": run.recipe["score"]["method"], "reference": scoring.REFERENCE_FILE},
            },
            data={
                "machine_types": data.machine_types,
                "clip_frames": int(train_power.shape[2]),
                "eval_ground_truth": data.eval_labels is not None,
                "ignored_files": data.ignored,
                "audio_changes": {split: meta["notes"] for split, (_, meta) in cached.items()},
            },
            trained_from={
                "features": cached["train"][1]["checksums"],
                "dev features": cached["dev test"][1]["checksums"],  # they choose the best epoch
                "normalization": normalizer.to_config(),
            },
            state=Arrays(train_power, cached["dev test"][0], cached.get("eval test", (None,))[0], normalizer, frames),
        )

    def groups(self, run: Run, data: data_lib.DcaseData, prepared: Prepared) -> list[Group]:
        """The set-up's seed ensembles in training order; the set-up's own are the run's ensemble."""
        families = model_groups(run.recipe["train"]["setup"], data.machine_types)
        return [
            self._group(run, data, prepared.state, name, types, family)
            for family, parts in families.items()
            for name, types in parts
        ]

    def _group(self, run: Run, data, arrays: Arrays, name: str, types: list[str], family: str) -> Group:
        recipe, class_names = run.recipe, data.class_names_of(types)
        rows, class_indices = rows_of(data.train, class_names)
        dev_rows, dev_indices = rows_of(data.dev_test, class_names)
        dev_clips = [data.dev_test[i] for i in dev_rows]
        dev_labels = np.array([clip.label for clip in dev_clips])
        dev_power = arrays.dev_power if name == "integrated" else arrays.dev_power[dev_rows]
        margin, finetune = recipe["model"]["head"] != "softmax", family == "finetune"
        batch_size = recipe["train"]["batch_size"]
        steps = max(1, -(-len(rows) // batch_size))
        batches = functools.partial(
            training_dataset,
            arrays,
            rows,
            class_indices,
            len(class_names),
            batch_size=batch_size,
            mixup_alpha=recipe["finetune" if finetune else "train"]["mixup_alpha"],
            margin=margin,
        )
        shape = (arrays.train_power.shape[1], arrays.frames, 1)
        run.log(f"{name}: {len(class_names)} IDs, {len(rows)} training clips, {steps} steps per epoch")

        def build(seed: int):
            if not finetune:
                return build_model(recipe, shape, len(class_names))
            import keras

            from models.dcase import finetune_model
            from replicate import train

            integrated = run.run_dir / "integrated" / "training" / f"{train.member_name(seed)}.keras"
            return finetune_model(
                keras.models.load_model(integrated, safe_mode=True), [data.class_names.index(n) for n in class_names]
            )

        score = recipe["score"]["max_fpr"], recipe["train"]["score_every"]
        return Group(
            name=name,
            build_model=build,
            train_data=lambda seed, epoch: batches(seed=seed, epoch=epoch),
            member_callbacks=lambda member_dir, member: [
                dev_score_callback(
                    dev_clips, dev_labels, dev_indices, dev_power, arrays.normalizer, arrays.frames, *score
                )
            ],
            recipe=train_recipe_for(recipe, steps, finetune=finetune, margin=margin),
            trained_from={
                "rows": rows,
                "classes": class_indices,
                "dev rows": dev_rows,
                "dev labels": dev_labels,
                "dev classes": dev_indices,
            },
            manifest={"class_names": class_names, "machine_types": types},
            after_training=export_members,
            ensemble=family == recipe["train"]["setup"],
        )

    def evaluate(self, run: Run, data: data_lib.DcaseData, prepared: Prepared) -> dict:
        """Every model group's members score the test clips by every method; the set-up's own group's average
        by `score.method` goes into the official files (dev/ and eval/), every member's scores of every
        method into test_scores.npz, and what each method needs of the training clips beside its members
        (`scoring.REFERENCE_FILE`), for `predict`."""
        setup, score = run.recipe["train"]["setup"], run.recipe["score"]
        method, max_fpr = score["method"], score["max_fpr"]
        dev_labels = np.array([clip.label for clip in data.dev_test])
        tests = {"dev": (data.dev_test, dev_labels), "eval": (data.eval_test, data.eval_labels)}
        tests = {split: test for split, test in tests.items() if test[0]}
        result, saved = {"method": method, "setup": setup, "groups": {}}, {}
        for family, parts in model_groups(setup, data.machine_types).items():
            scores, embedding_rows, embeddings = self._score_family(
                run, data, prepared.state, parts, tests, family == setup
            )
            result["groups"][family] = {"seeds": run.seeds} | {
                split: {m: scoring.summary(clips, labels, values, max_fpr) for m, values in scores[split].items()}
                for split, (clips, labels) in tests.items()
                if labels is not None
            }
            saved |= {f"{family}_{split}_{m}": v for split, by_method in scores.items() for m, v in by_method.items()}
            saved |= {f"{family}_dev_embeddings": embeddings, f"{family}_dev_embedding_rows": embedding_rows}
        for split, (clips, labels) in tests.items():
            scoring.write_score_files(run.run_dir / split, clips, saved[f"{setup}_{split}_{method}"].mean(axis=0))
            if labels is not None:
                evaluation = result["groups"][setup][split][method]["ensemble"]
                scoring.write_result_csv(run.run_dir / split / "result.csv", evaluation)
        files.write_npz(run.run_dir / "test_scores.npz", **saved)
        run.log(f"official files: {', '.join(str(run.run_dir / split) for split in tests)}")
        result["final_group"] = setup
        result["headline"] = report_lib.headline(result, run.recipe)
        return result

    def _score_family(self, run: Run, data, arrays: Arrays, parts, tests: dict, ensemble: bool):
        """One model group's (members, clips) scores per test split and method, filled in part by part (one
        seed ensemble per machine type, or the integrated one), and its first member's dev test embeddings
        with their rows. The references of the run's score method are saved for the ensemble's groups."""
        scores = {
            split: {m: np.full((len(run.seeds), len(clips)), np.nan) for m in scoring.SCORE_METHODS}
            for split, (clips, _) in tests.items()
        }
        embedding_rows, embeddings = [], []
        for name, types in parts:
            scored = self._score_group(run, data, arrays, name, types, ensemble)
            for split, (rows, by_method, split_embeddings) in scored.items():
                for method, values in by_method.items():
                    scores[split][method][:, rows] = values
                if split == "dev":
                    embedding_rows.append(rows)
                    embeddings.append(split_embeddings[0])
        return scores, np.concatenate(embedding_rows), np.concatenate(embeddings)

    def _score_group(self, run: Run, data, arrays: Arrays, name: str, types: list[str], save_reference: bool) -> dict:
        """{test split: (its rows of the group's machine types, {method: (members, clips) scores}, the members'
        embeddings)} of one seed ensemble, whose references are fitted on its training clips' embeddings."""
        from replicate.ensemble import Ensemble, clip_outputs

        ensemble = Ensemble.load(run.run_dir, groups=[name])
        class_names = data.class_names_of(types)
        rows, class_indices = rows_of(data.train, class_names)
        [train_embeddings] = clip_outputs(
            ensemble_outputs(ensemble, ["embedding"]), arrays.train_power, arrays.frames, rows, arrays.normalizer
        )
        references = {
            method: [
                scoring.fit_reference(method, embeddings, class_indices, run.recipe["score"], seed)
                for embeddings, seed in zip(train_embeddings, ensemble.seeds, strict=True)
            ]
            for method in scoring.SCORE_METHODS
        }
        if save_reference:
            method = run.recipe["score"]["method"]
            by_seed = dict(zip(ensemble.seeds, references[method], strict=True))
            scoring.save_reference(run.run_dir / name / scoring.REFERENCE_FILE, method, by_seed, class_names)
        splits = {}
        for split, clips, power in (
            ("dev", data.dev_test, arrays.dev_power),
            ("eval", data.eval_test, arrays.eval_power),
        ):
            scored = ensemble_scores(ensemble, clips, class_names, power, arrays.frames, references, arrays.normalizer)
            if len(scored[0]):  # a machine type may have no evaluation test clips
                splits[split] = scored
        run.log(f"{name}: {len(ensemble.members)} members scored by {', '.join(scoring.SCORE_METHODS)}")
        return splits

    def results(self, run: Run):
        return report_lib.results(run)

    def report(self, run: Run, data: data_lib.DcaseData, prepared: Prepared):
        return report_lib.report_parts(run, data)

    def inference_inputs(self, manifest: dict, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Normalised log-mel inputs of audio files (whole clips), with the run's feature definition and
        statistics; also of a run made before the manifest schema (one without the mel definition keys
        computed librosa's)."""
        spec, normalizer = feature_lib.saved_transform(manifest, INPUT, feature_spec, LIBROSA_DEFINITION)
        return normalizer(spec.compute(paths))

    def predict(self, ensemble, inputs: Sequence[str]) -> pd.DataFrame:
        """Anomaly scores of wav files (a folder stands for its wav files) by the run's `score.method`, as its
        evaluation scored its test clips: `file`, `machine_type`, `machine_id`, `anomaly_score`. The machine
        ID comes from the file name (`normal_id_00_…`, `anomaly_id_00_…` or `id_00_…`), the machine type from
        the folders above it (the official `<type>/test/<file>`)."""
        manifest = ensemble.manifest
        clips = [data_lib.clip_to_score(path, manifest["data"]["machine_types"]) for path in audio.wav_files(inputs)]
        for clip in clips:
            if clip.class_name not in manifest["class_names"]:
                raise DataError(
                    f"{clip.path}: {clip.class_name} is not a machine ID the run was trained on "
                    f"({listing(manifest['class_names'])})"
                )
        features = self.inference_inputs(manifest, [clip.path for clip in clips])
        method, scores = manifest["preprocessing"]["score"]["method"], np.full(len(clips), np.nan)
        frames = manifest["inputs"][INPUT][1]
        for name, group in manifest["groups"].items():
            if not any(clip.class_name in group["class_names"] for clip in clips):
                continue
            members = ensemble.group(name)
            path = ensemble.run_dir / name / manifest["preprocessing"]["score"]["reference"]
            by_member = list(scoring.load_reference(path, method, members.seeds, group["class_names"]).values())
            rows, by_method, _ = ensemble_scores(
                members, clips, group["class_names"], features, frames, {method: by_member}
            )
            scores[rows] = by_method[method].mean(axis=0)
        table_rows = [(str(clip.path), clip.machine_type, clip.machine_id) for clip in clips]
        return pd.DataFrame(table_rows, columns=["file", "machine_type", "machine_id"]).assign(anomaly_score=scores)

    def benchmark_member(self, recipe: dict) -> BenchmarkMember:
        """The integrated model (41 IDs) on whole 10-s clips, its warm-restart schedule and logits loss."""
        data, features = recipe["data"], recipe["features"]
        frames = features["input_frames"] or 1 + data["clip_samples"] // features["hop_length"]  # centred frames
        margin = recipe["model"]["head"] != "softmax"
        shape = (features["n_mels"], frames, 1)
        # steps per epoch only set the schedule's period; any count gives the same step time
        train_table = train_recipe_for(recipe, 100, finetune=False, margin=margin)["train"]
        return BenchmarkMember(
            lambda: build_model(recipe, shape, REAL_DATA_IDS), train_table, label_input="labels" if margin else ""
        )


TASK = DcaseTask()
