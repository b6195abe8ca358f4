"""What AI CUP's report adds to the engine's frame: the results beside the source's UAR, audio only against
multimodal, each modality's per-class recall and confusion matrices, the per-variant splits, and the data's
facts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from replicate import report
from replicate.aicup.clinical import ClinicalEncoder
from replicate.aicup.data import CLASS_NAMES
from replicate.task import ReportParts, ResultsTable, Run

SPLIT_WHAT = {
    "validation": "validation fold (held-out training persons)",
    "validation_per_variant": "each variant's own validation fold (held-out training persons)",
    "public": "public test list (synthetic answers)",
    "private": "private test list (synthetic answers)",
}
MODALITY_WHAT = {"multimodal": "MFCC + clinical", "audio_only": "MFCC only"}


def headline(scores: dict, source: dict) -> str:
    """The run's result in a phrase (the command line's last line): the submission ensemble's UAR on the first
    scored split of public, private, validation, beside the source's number on that split."""
    modality = scores["main"]
    splits = scores["modalities"][modality]["splits"]
    split = next((name for name in ("public", "private", "validation") if "ensemble" in splits.get(name, {})), None)
    if split is None:
        return "not scored"
    members = scores["modalities"][modality]["members"]
    variants = len({member["n_mfcc"] for member in members})
    text = (
        f"{split} UAR {splits[split]['ensemble']['uar']:.4f} ({MODALITY_WHAT[modality]}, {variants} variant(s) × "
        f"{len(members) // max(1, variants)} seed(s)"
    )
    reported = next((entry for entry in source["reported"] if split in entry["split"]), None)
    if reported is None:
        return text + ")"
    return text + f"; source: {reported['what']} {reported['uar']:.4f} on the real data, {reported['split']})"


def results(run: Run) -> ResultsTable:
    """The source's reported numbers beside ours: each modality's n_mfcc 13 model alone and its ensemble, on
    every scored list, and the majority-class baseline."""
    rows = [
        (f"source: {entry['what']}", f"real AI CUP 2023 data, {entry['split']}", f"{entry['uar']:.4f}", "")
        for entry in run.recipe["source"]["reported"]
    ]
    for modality, modality_scores in run.scores["modalities"].items():
        variants = sorted({member["n_mfcc"] for member in modality_scores["members"]})
        seeds = len(modality_scores["members"]) // max(1, len(variants))
        first = str(variants[0])
        for split, split_scores in modality_scores["splits"].items():
            # no ensemble score: validation folds that differ between the variants
            what = SPLIT_WHAT[split if "ensemble" in split_scores else "validation_per_variant"]
            where = f"our synthetic data, {what}, {split_scores['persons'][first]} persons"
            uar = split_scores["variant_uar"][first]
            rows.append((f"ours: {MODALITY_WHAT[modality]}, n_mfcc {first} alone", where, f"{uar:.4f}", ""))
            if "ensemble" in split_scores:
                ensemble = split_scores["ensemble"]
                model = f"ours: {MODALITY_WHAT[modality]}, {len(variants)} variants × {seeds} seed(s)"
                rows.append((model, where, f"{ensemble['uar']:.4f}", f"{ensemble['macro_f1']:.4f}"))
    chance = sorted({round(value, 4) for value in run.scores["majority_uar"].values()})
    chance_uar = ", ".join(f"{value:.4f}" for value in chance)
    rows.append(("ours: always the majority class", "our synthetic data, every split above", chance_uar, ""))
    split = run.manifest["data"]["split"]
    training_persons = sorted({variant["train_persons"] for variant in split["variants"].values()})
    return ResultsTable(
        headers=("model", "data", "UAR", "macro F1"),
        rows=rows,
        metric="UAR (the competition metric: mean per-class recall; chance 0.2) and macro F1.",
        details=[
            f"{run.recipe['train']['epochs']} epochs per member",
            "the epoch with the best validation-fold UAR kept (so validation-fold scores are optimistic, as the "
            "source's 0.7305 is; the test lists are unseen persons)",
            f"{' or '.join(map(str, training_persons))} training persons",
            split_line(split),
        ],
    )


def split_line(split: Mapping) -> str:
    """How the manifest's splits were drawn, in words."""
    seeds = ", ".join(f"{k}: {variant['seed']}" for k, variant in split["variants"].items())
    how = f"fold {split['validation_fold']} of a stratified {split['folds']}-fold split"
    if split["per_variant"]:
        return f"{how} per variant, as the source's notebooks drew them (seeds by n_mfcc {seeds})"
    return f"{how} shared by every variant (seed {next(iter(split['variants'].values()))['seed']})"


def report_parts(run: Run) -> ReportParts:
    scores, data = run.scores, run.manifest["data"]
    sections = _comparison(scores["modalities"]) if len(scores["modalities"]) > 1 else []
    for modality, modality_scores in scores["modalities"].items():
        sections += _modality_section(run, modality, modality_scores, in_ensemble=modality == scores["main"])
    encoder = run.manifest["preprocessing"]["clinical_encoder"]
    features = next(iter(run.manifest["features"].values()))
    test_lists = {name: count for name, count in data["splits"].items() if name not in ("train", "validation")}
    return ReportParts(
        intro=[
            f"The submission ensemble is the `{scores['main']}` one. The source's numbers are on the real competition "
            "data; ours on the data named in each row. UAR: unweighted average recall (mean of the five per-class "
            "recalls), chance 0.2."
        ],
        sections=[*sections, "## Splits", "", _splits_table(data["split"]), ""],
        history_metrics={"val_uar": "validation UAR"},
        notes=[
            f"Persons: {data['training_list_persons']} in the training list, split into training and validation "
            f"persons by {split_line(data['split'])}; test lists: {test_lists or 'none'}.",
            f"MFCC: {features['sample_rate']} Hz, first {features['audio']['num_samples']} samples, n_fft "
            f"{features['n_fft']}, hop {features['hop_length']}, n_mfcc {run.recipe['features']['n_mfcc']}; "
            "standardised per frame over the coefficients (the model's first layer).",
            "Audio changed to be usable (padded: shorter than 1 s, zero-padded; cropped: longer, first second kept): "
            f"{report.audio_changes(data['audio_changes'])}.",
            f"Empty clinical cells filled with 0: {_empty_cells_line(data['empty_cells_filled'])}. Wav files without "
            f"a row (ignored): {_counts_line(data['extra_wavs'])}.",
            f"Clinical encoder: {ClinicalEncoder.from_config(encoder).width} inputs, fitted on "
            f"{encoder['fitted_on']['rows']} training rows (saved in manifest.json's `preprocessing`).",
        ],
    )


def _comparison(modalities: Mapping[str, dict]) -> list[str]:
    """The ensembles' UAR and macro F1 side by side on the lists both score."""
    splits = [name for name, scores in next(iter(modalities.values()))["splits"].items() if "ensemble" in scores]
    columns = {"uar": "UAR", "macro_f1": "macro F1"}
    headers = ("ensemble", *(f"{title} {s}" for title in columns.values() for s in splits))
    rows = [
        (MODALITY_WHAT[modality], *(scores["splits"][s]["ensemble"][key] for key in columns for s in splits))
        for modality, scores in modalities.items()
    ]
    return ["### Audio only vs multimodal", "", report.markdown_table(headers, rows), ""]


def _modality_section(run: Run, modality: str, modality_scores: dict, *, in_ensemble: bool) -> list[str]:
    """A modality's scores per list: the variants' and members' UAR, and where every variant predicted the same
    persons, the ensemble's per-class recall and confusion matrix (a plot in the run folder)."""
    lines = [f"## {MODALITY_WHAT[modality]} (`{modality}`)", ""]
    if not in_ensemble:
        best = ", ".join(
            f"n_mfcc {m['n_mfcc']} seed {m['seed']}: {m['best_epoch']}" for m in modality_scores["members"]
        )
        lines += [f"Not in the submission ensemble. Its members' best epochs (by validation UAR): {best}.", ""]
    for split, scores in modality_scores["splits"].items():
        variant_line = (
            "UAR of each variant's seed ensemble: "
            + ", ".join(f"n_mfcc {k}: {v:.4f}" for k, v in scores["variant_uar"].items())
            + f"; single members: {report.mean_std(scores['member_uar'])} (mean ± std)."
        )
        if "ensemble" not in scores:
            lines += [
                f"### {SPLIT_WHAT['validation_per_variant']}",
                "",
                "No ensemble score: each variant was validated on its own fold, as in the source, so a person held "
                "out by one variant trained another (`data.split_per_variant = false` shares one split).",
                "",
                variant_line,
                "",
            ]
            continue
        ensemble, plot = scores["ensemble"], f"confusion_{modality}_{split}.png"
        class_names = [f"{i + 1} {name}" for i, name in enumerate(CLASS_NAMES)]
        title = f"{MODALITY_WHAT[modality]}, {split}"
        recall = ("class", "recall", "persons")
        lines += [
            f"### {SPLIT_WHAT[split]}: UAR {ensemble['uar']:.4f}, macro F1 {ensemble['macro_f1']:.4f}",
            "",
            report.per_class_table(
                ensemble["confusion"], ensemble["recall"], class_names, recall, run.run_dir / plot, title=title
            ),
            "",
            variant_line,
            "",
            f"![confusion matrix]({plot})",
            "",
        ]
    return lines


def _splits_table(split: Mapping) -> str:
    """Each variant's split: its seed, persons, class counts and class weights."""
    rows = [
        (
            k,
            variant["seed"],
            variant["train_persons"],
            variant["validation_persons"],
            f"{variant['class_counts']['train']}; {variant['class_counts']['validation']}",
            np.round(variant["class_weights"], 5).tolist(),
        )
        for k, variant in split["variants"].items()
    ]
    headers = ("n_mfcc", "split seed", "training", "validation", "class counts 1-5 (training; validation)", "weights")
    return report.markdown_table(headers, rows)


def _empty_cells_line(empty: Mapping[str, Mapping[str, int]]) -> str:
    parts = [
        f"{split}: " + ", ".join(f"{n} {column}" for column, n in cells.items())
        for split, cells in empty.items()
        if any(cells.values())
    ]
    return "; ".join(parts) or "none"


def _counts_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in counts.items() if n) or "none"
