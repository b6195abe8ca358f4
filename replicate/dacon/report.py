"""What DACON's report adds to the engine's frame: the results beside the blog's numbers, KL by ensemble
size, the members' KL, and the features' facts."""

from __future__ import annotations

import numpy as np

from replicate import report
from replicate.task import EnsembleCurve, ReportParts, ResultsTable, Run


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


def results(run: Run) -> ResultsTable:
    """The source's reported numbers beside ours (the training prior, single members, k-model averages)."""
    rows = [
        (f"source: {entry['what']}", "real DACON data, " + entry["split"], f"{entry['kl']:.4f}")
        for entry in run.recipe["source"]["reported"]
    ]
    for split, evaluation in run.scores["evaluations"].items():
        where = f"our synthetic data, {split}, {evaluation['clips']} clips"
        rows.append(("ours: predict the training prior", where, f"{evaluation['prior_kl']:.4f}"))
        rows += report.member_rows(where, evaluation["member_kl"], evaluation["ensemble_kl_by_size"], "model average")
    return ResultsTable(
        headers=("model", "data", "KL"),
        rows=rows,
        metric="KL divergence, lower is better.",
        details=[
            f"{len(run.manifest['members'])} members × {run.recipe['train']['epochs']} epochs",
            f"{run.manifest['data']['splits']['train']} training clips",
        ],
    )


def report_parts(run: Run) -> ReportParts:
    features, manifest = run.recipe["features"], run.manifest
    evaluations = run.scores["evaluations"]
    normalization = manifest["preprocessing"]["normalization"]
    splits = manifest["data"]["splits"]
    return ReportParts(
        intro=[
            "The source's numbers are on the real competition data (public/private leaderboard); ours are on the",
            "data named in each row. KL divergence, lower is better.",
        ],
        ensemble_curves=[
            EnsembleCurve.from_sizes(
                split,
                evaluation["ensemble_kl_by_size"],
                "KL divergence",
                {"training prior": evaluation["prior_kl"]},
                members=evaluation["member_kl"],
            )
            for split, evaluation in evaluations.items()
        ],
        member_columns={f"KL {split}": evaluation["member_kl"] for split, evaluation in evaluations.items()},
        notes=[
            f"Resolutions (n_fft/win_length): {list(zip(features['n_fft'], features['win_length'], strict=True))}, "
            f"hop {features['hop_length']}, {features['n_mels']} mels, signal edges padded by "
            f"`{features['pad_mode']}` → input {tuple(manifest['inputs']['log_mel'])}.",
            f"dB reference: `{normalization['reference']}`; z-score statistics from `{features['normalization']}` "
            f"(mean {np.round(normalization['mean'], 3).tolist()}, std {np.round(normalization['std'], 3).tolist()}).",
            f"Clips: {splits['train']} training, {splits['validation']} validation, {splits['test']} test. Audio "
            f"changed to be usable: {report.audio_changes(manifest['data']['audio_changes'])}.",
        ],
    )
