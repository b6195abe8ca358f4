"""What DCASE's report adds to the engine's frame: the results beside the write-up's numbers, the per-type and
per-ID tables beside the source's and the official baseline's, ROC curves, the embeddings, every model group
and score method, and the features' facts."""

from __future__ import annotations

import numpy as np

from replicate import report
from replicate.dcase import scoring
from replicate.dcase.data import DcaseData
from replicate.task import ReportParts, ResultsTable, Run, listing

GROUP_TITLES = {
    "integrated": "one integrated model",
    "per_machine": "six individual models",
    "finetune": "integrated + per-machine fine-tuned classifier",
}
SPLIT_NAMES = {"dev": "development", "eval": "evaluation"}


def headline(scores: dict, recipe: dict) -> str:
    """The run's result in a phrase (the command line's last line), beside the source's number for the same
    set-up and head on the same split."""
    group = scores["groups"][scores["final_group"]]
    split = next((split for split in ("eval", "dev") if split in group), None)
    if split is None:
        return "not scored (no labelled test clips)"
    method = scores["method"]
    result = group[split][method]
    text = (
        f"{SPLIT_NAMES[split]} AUC {100 * result['ensemble']['mean_auc']:.2f} / pAUC "
        f"{100 * result['ensemble']['mean_pauc']:.2f} ({len(result['members'])}-member average, {method} score"
    )
    same_setup = [entry for entry in recipe["source"]["reported"] if entry["setup"] == scores["setup"]]
    same_head = [entry for entry in same_setup if recipe["model"]["head"] in entry["what"].lower()]
    source = (same_head or same_setup or [None])[0]
    if source is not None:
        auc, pauc = source[f"{split}_auc"], source[f"{split}_pauc"]
        text += f"; source: {source['what']} {auc:.2f} / {pauc:.2f} on the real data"
    return text + ")"


def results(run: Run) -> ResultsTable:
    """The source's reported numbers (and the official baseline's) beside ours: single members and the
    ensemble, by the run's score method and the source's softmax score, on each labelled test split."""
    recipe, scores = run.recipe, run.scores
    baseline = np.array(list(recipe["source"]["baseline_dev"].values()))
    rows = [
        ("source: official baseline (autoencoder)", "real data, development", *(f"{v:.2f}" for v in baseline.mean(0)))
    ]
    for entry in recipe["source"]["reported"]:
        for split, name in SPLIT_NAMES.items():
            values = (entry[f"{split}_auc"], entry[f"{split}_pauc"])
            rows.append((f"source: {entry['what']}", f"real data, {name}", *(f"{v:.2f}" for v in values)))
    shown = [scores["method"]] + (["softmax"] if scores["method"] != "softmax" else [])  # the source's score too
    for group, group_scores in scores["groups"].items():
        for split, method in ((split, method) for split in SPLIT_NAMES for method in shown if split in group_scores):
            result, where = group_scores[split][method], f"our synthetic data, {SPLIT_NAMES[split]} test"
            label = f"ours: {GROUP_TITLES[group]} ({recipe['model']['head']}, {method} score)"
            members, ensemble = result["members"], result["ensemble"]
            single = [report.mean_std([100 * m[key] for m in members], digits=2) for key in ("mean_auc", "mean_pauc")]
            rows.append((f"{label}, single member", where, *single))
            average = (f"{100 * ensemble['mean_auc']:.2f}", f"{100 * ensemble['mean_pauc']:.2f}")
            rows.append((f"{label}, {len(members)}-member average", where, *average))
    final = scores["groups"][scores["final_group"]]
    return ResultsTable(
        headers=("model", "data", "AUC", "pAUC"),
        rows=rows,
        metric=f"Mean over machine types of AUC and pAUC (p = {recipe['score']['max_fpr']}), in % (50 = chance).",
        details=[
            f"set-up `{recipe['train']['setup']}`",
            f"{len(final['seeds'])} seeds × {recipe['train']['epochs']} epochs",
            f"{len(run.manifest['class_names'])} IDs",
            f"{run.manifest['data']['splits']['train']} training clips of "
            f"{recipe['data']['clip_samples'] / recipe['data']['sample_rate']:g} s",
        ],
    )


def report_parts(run: Run, data: DcaseData) -> ReportParts:
    recipe, scores = run.recipe, run.scores
    final, method = scores["final_group"], scores["method"]
    final_dev = scores["groups"][final]["dev"][method]["ensemble"]
    return ReportParts(
        intro=[
            f"Set-up `{recipe['train']['setup']}`, head `{recipe['model']['head']}`, anomaly score `{method}`.",
            "The source's numbers are on the real DCASE 2020 Task 2 data; ours on the data named in each row.",
        ],
        sections=[
            "## Per machine type (development test, ensemble)",
            "",
            _type_table(final_dev, recipe["source"]),
            "",
            f"Mean AUC {100 * final_dev['mean_auc']:.2f}, pAUC {100 * final_dev['mean_pauc']:.2f}; harmonic mean "
            f"AUC {100 * final_dev['hmean_auc']:.2f}, pAUC {100 * final_dev['hmean_pauc']:.2f} "
            "(ours; source columns: real data).",
            "",
            *_plots(run, data),
            "## Per machine ID (development test, ensemble)",
            "",
            report.markdown_table(
                ("machine type", "ID", "clips", "AUC", "pAUC"),
                [
                    (machine_type, machine_id, item["clips"], f"{100 * item['auc']:.2f}", f"{100 * item['pauc']:.2f}")
                    for machine_type, values in final_dev["types"].items()
                    for machine_id, item in values["ids"].items()
                ],
            ),
            "",
            "## Every model group and anomaly score (ensemble, %)",
            "",
            _method_table(scores),
            "",
        ],
        history_metrics={"dev_score": "development test Σ over machine types of (AUC + pAUC)"},
        notes=_notes(run),
    )


def _type_table(final_dev: dict, source: dict) -> str:
    whose = ("ours", "source integrated", "official baseline")
    headers = ("machine type", *(f"{who} {area}" for who in whose for area in ("AUC", "pAUC")))
    rows = []
    for machine_type, values in final_dev["types"].items():
        # a machine type outside the six of DCASE 2020 has no source numbers: "-"
        integrated = source["integrated_dev"].get(machine_type, (None, None))
        baseline = source["baseline_dev"].get(machine_type, (None, None))
        cells = (100 * values["auc"], 100 * values["pauc"], *integrated, *baseline)
        rows.append((machine_type, *("-" if value is None else f"{value:.2f}" for value in cells)))
    return report.markdown_table(headers, rows)


def _method_table(scores: dict) -> str:
    keys = ("mean_auc", "mean_pauc", "hmean_auc", "hmean_pauc")
    rows = [
        (GROUP_TITLES[group], split, method, *(f"{100 * group_scores[split][method]['ensemble'][k]:.2f}" for k in keys))
        for group, group_scores in scores["groups"].items()
        for split in ("dev", "eval")
        if split in group_scores
        for method in scoring.SCORE_METHODS
    ]
    return report.markdown_table(("models", "split", "score", "mean AUC", "mean pAUC", "hmean AUC", "hmean pAUC"), rows)


def _plots(run: Run, data: DcaseData) -> list[str]:
    """ROC curves per machine type and ID of the ensemble's development test scores, and a PCA plot of the
    first member's development test embeddings (test_scores.npz)."""
    final, method = run.scores["final_group"], run.scores["method"]
    with np.load(run.run_dir / "test_scores.npz") as saved:
        dev_scores = saved[f"{final}_dev_{method}"].mean(axis=0)
        embeddings, embedding_rows = saved[f"{final}_dev_embeddings"], saved[f"{final}_dev_embedding_rows"]
    labels = np.array([clip.label for clip in data.dev_test])
    curves = {machine_type: {} for machine_type in data.machine_types}
    for machine_type, machine_id in sorted({(clip.machine_type, clip.machine_id) for clip in data.dev_test}):
        rows = np.array([(c.machine_type, c.machine_id) == (machine_type, machine_id) for c in data.dev_test])
        curves[machine_type][f"id_{machine_id}"] = (labels[rows], dev_scores[rows])
    title = f"ROC, development test ({GROUP_TITLES[final]})"
    report.plot_roc_curves(curves, run.run_dir / "roc_dev.png", title=title)
    clips = [data.dev_test[i] for i in embedding_rows]
    types = np.array([clip.machine_type for clip in clips])
    ids = np.array([f"id_{clip.machine_id}" for clip in clips])
    flags = np.array([clip.label for clip in clips])
    masks = {machine_type: types == machine_type for machine_type in data.machine_types}
    groups = {machine_type: (embeddings[mask], ids[mask], flags[mask]) for machine_type, mask in masks.items()}
    report.plot_embeddings(groups, run.run_dir / "embeddings_dev.png", title="Development test embeddings (PCA)")
    return ["![ROC curves](roc_dev.png)", "", "![embeddings](embeddings_dev.png)", ""]


def _notes(run: Run) -> list[str]:
    features, manifest = run.recipe["features"], run.manifest
    data, normalization = manifest["data"], manifest["preprocessing"]["normalization"]
    shape, splits, ignored = manifest["inputs"]["log_mel"], data["splits"], data["ignored_files"]
    whole = shape[1] == data["clip_frames"]
    input_note = "whole clip" if whole else "random crops in training, the mean over windows in testing"
    official = ["`dev/anomaly_score_<type>_id_<ID>.csv`", "`dev/result.csv`"]
    official += ["`eval/anomaly_score_<type>_id_<ID>.csv`"] if splits["eval_test"] else []
    official += ["`eval/result.csv`"] if data["eval_ground_truth"] else []
    return [
        f"Log-mel: {run.recipe['data']['sample_rate']} Hz, n_fft {features['n_fft']}, hop {features['hop_length']}, "
        f"{features['n_mels']} mels ({features['mel_scale']} scale, filter norm {features['mel_norm']}, "
        f"`{features['pad_mode']}` padding); clips of {data['clip_frames']} frames, model input {tuple(shape)} "
        f"({input_note}).",
        f"dB reference `{features['db_reference']}`, top_db {features['top_db']}; z-score from the training clips "
        f"(mean {normalization['mean'][0]:.3f}, std {normalization['std'][0]:.3f}).",
        f"Clips: {splits['train']} training, {splits['dev_test']} development test, {splits['eval_test']} evaluation "
        f"test (ground truth: {'yes, synthetic' if data['eval_ground_truth'] else 'none'}). Audio changed to be "
        f"usable: {report.audio_changes(data['audio_changes'])}. Files ignored (not .wav): "
        f"{len(ignored)}{': ' + listing(ignored) if ignored else ''}.",
        f"Official files: {', '.join(official)}; anomaly scores of new clips: `python -m replicate.predict`.",
    ]
