"""What MAIC's report adds to the engine's frame: the results beside the write-up's numbers, the focal
loss's scale, per split the per-diagnosis F1, the confusion matrix and masking's effect, the sub-class
table, the masking table, and the tokens' facts."""

from __future__ import annotations

import numpy as np

from replicate import report
from replicate.maic.data import DIAGNOSES, SEXES, MaicData
from replicate.maic.labels import BANDS, SubclassTable
from replicate.task import EnsembleCurve, ReportParts, ResultsTable, Run, listing


def headline(scores: dict, source: dict) -> str:
    """The run's result in a phrase (the command line's last line), beside the source's number."""
    for split, evaluation in scores["evaluations"].items():  # the test persons first, where they have answers
        size = len(evaluation["member_macro_f1"])
        return (
            f"{split.split()[0]} persons macro F1 {evaluation['ensemble_macro_f1_by_size'][str(size)]:.4f} "
            f"({size}-member ensemble; source: single model {source['test_macro_f1']:.4f} on the real hidden "
            "test set)"
        )
    validation = scores["validation"]
    if validation:
        return (
            f"validation tokens macro F1 {np.mean(validation['member_token_macro_f1']):.4f} (member mean; source: "
            f"single model {source['validation_f1']:.4f} on the real data's 5 % token split)"
        )
    return "not scored (the test persons have no answers and there is no validation split)"


def results(run: Run) -> ResultsTable:
    """The source's reported numbers beside ours (token-level F1 of the validation split, person-level macro
    F1 of the majority class, single members and the first-k ensembles)."""
    source, scores = run.recipe["source"], run.scores
    rows = [
        (
            f"source: single model, epoch {source['best_epoch']}",
            "real MAIC data, 5 % token validation split (528 tokens), token-level F1",
            f"{source['validation_f1']:.4f}",
        ),
        (
            "source: single model",
            "real MAIC data, hidden test set (164 persons), person-level macro F1",
            f"{source['test_macro_f1']:.4f}",
        ),
    ]
    validation = scores.get("validation")
    if validation:
        where = f"our synthetic data, {validation['split']} validation split ({validation['tokens']} tokens)"
        for over, key in (("sub-classes", "member_token_macro_f1"), ("diagnoses", "member_token_diagnosis_macro_f1")):
            what = f"{where}, token-level macro F1 over {over}"
            rows.append(("ours: single member, mean ± std (best epoch)", what, report.mean_std(validation[key])))
    for split, evaluation in scores["evaluations"].items():
        where = f"our synthetic data, {split} ({evaluation['persons']} persons), person-level macro F1"
        rows.append(
            (f"ours: majority class ({evaluation['majority_class']})", where, f"{evaluation['majority_macro_f1']:.4f}")
        )
        rows += report.member_rows(where, evaluation["member_macro_f1"], evaluation["ensemble_macro_f1_by_size"])
    return ResultsTable(
        headers=("model", "data", "macro F1"),
        rows=rows,
        metric="Macro F1, higher is better.",
        details=[
            f"{len(run.manifest['members'])} members",
            f"at most {run.recipe['train']['epochs']} epochs",
            f"{run.manifest['data']['splits']['train']} training tokens",
        ],
    )


def loss_scale_note(train_recipe: dict, source: dict) -> str:
    """How this run's loss values compare with the focal loss the write-up's figure draws (no α) and with the
    source's reported validation loss; "" for a loss other than the focal loss."""
    if train_recipe["loss"] != "CategoricalFocalCrossentropy":
        return ""
    options = train_recipe.get("loss_options", {})
    alpha, gamma = options.get("alpha", 0.25), options.get("gamma", 2.0)  # Keras's defaults where not set
    note = (
        f"Loss: Keras's `CategoricalFocalCrossentropy(alpha={alpha:g}, gamma={gamma:g})`, "
        f"−α·(1 − p)^γ·log p of the true class. The write-up's loss figure (RetinaNet's Figure 1) draws "
        "FL = −(1 − p)^γ·log p, without α, and neither it nor the text gives α or γ. "
    )
    if alpha == 1:
        return note + "With α = 1 this run's loss values are on the figure's scale."
    return note + (
        f"Here α multiplies every class's loss by exactly {alpha:g}, so this run's loss values (training and "
        f"validation, and the curves below) are {1 / alpha:g}× smaller than the figure's form: compare them with "
        f"the source's reported validation loss {source['validation_loss']} with that in mind. "
        "`--set train.loss_options.alpha=1.0` trains with the figure's form."
    )


def report_parts(run: Run, data: MaicData, tokens) -> ReportParts:
    """The report's MAIC parts; `tokens` is the prepared run (`task.Tokens`)."""
    evaluations, monitor = run.scores["evaluations"], run.recipe["train"]["monitor"]
    loss_note = loss_scale_note(run.recipe["train"], run.recipe["source"])
    sections = [loss_note, ""] if loss_note else []
    member_columns, curves = {}, []
    for split, evaluation in evaluations.items():
        sections += split_section(run, split, evaluation)
        members = evaluation["member_macro_f1"]
        member_columns[f"macro F1 {split}"] = members
        majority = {f"majority class ({evaluation['majority_class']})": evaluation["majority_macro_f1"]}
        by_size = evaluation["ensemble_macro_f1_by_size"]
        curves.append(EnsembleCurve.from_sizes(split, by_size, "person macro F1", majority, members=members))
    sections += subclass_sections(tokens.table, data, tokens.train)
    return ReportParts(
        intro=[
            "The source's numbers are on the real competition data; ours on the data named in each row. The",
            "competition's metric is the macro F1 over persons (the source's write-up calls its final 0.5759",
            '"Micro-F1" once, but "Macro F1-score" in its overview and leaderboard line).',
        ],
        sections=sections,
        member_columns=member_columns,
        ensemble_curves=curves,
        history_metrics={monitor: f"{monitor} (validation)"},
        notes=notes(run, tokens.train.lengths),
        notes_title="Data and tokens",
    )


def split_section(run: Run, split: str, evaluation: dict) -> list[str]:
    """A scored split's per-diagnosis F1 and confusion matrix (the ensemble) and what masking changes."""
    slug = split.split()[0]
    masking = "label masking" if evaluation["label_masking"] else "no label masking"
    per_diagnosis = report.per_class_table(
        evaluation["confusion_matrix"],
        [evaluation["per_class_f1"][name] for name in DIAGNOSES],
        list(DIAGNOSES),
        ("diagnosis", "F1", "persons"),
        run.run_dir / f"confusion_{slug}.png",
        title=f"Persons, {split}: ensemble, {masking}",
    )
    size = str(len(evaluation["member_macro_f1"]))
    token, kinds = evaluation["token"], ("masked", "unmasked")
    masking_rows = [
        (
            f"person macro F1, {size}-member ensemble",
            *(evaluation[f"ensemble_macro_f1_by_size_{kind}"][size] for kind in kinds),
        ),
        (
            "person macro F1, single member mean",
            *(float(np.mean(evaluation[f"member_macro_f1_{kind}"])) for kind in kinds),
        ),
        ("token accuracy (diagnosis of the argmax sub-class)", *(token[kind]["accuracy"] for kind in kinds)),
        ("token macro F1 (diagnoses)", *(token[kind]["macro_f1"] for kind in kinds)),
    ]
    return [
        f"### {split}: per diagnosis (ensemble of {size}, {masking})",
        "",
        per_diagnosis,
        "",
        f"Person accuracy {evaluation['accuracy']:.4f}.",
        "",
        f"![confusion matrix](confusion_{slug}.png)",
        "",
        f"### {split}: label masking",
        "",
        report.markdown_table(("", "with masking (source)", "without masking"), masking_rows),
        "",
        f"Token-level numbers are over the {evaluation['tokens']} tokens that voted "
        f"(at most {run.recipe['inference']['tokens_per_person']} per person; 0 = all).",
        "",
    ]


def subclass_sections(table: SubclassTable, data: MaicData, train_store) -> list[str]:
    """The sub-classes found in the training persons (with their persons and tokens) and the sub-classes
    each sex and age group can be assigned."""
    persons = np.array([table.subclass_of(person) for person in data.train])
    tokens = persons[train_store.person]
    subclass_rows = [
        (label, diagnosis, sex, band, int((persons == i).sum()), int((tokens == i).sum()))
        for i, (label, (diagnosis, sex, band)) in enumerate(zip(table.labels, table.entries, strict=True))
    ]
    masking_rows = []
    for sex in SEXES:
        for band in BANDS:
            age = table.age_threshold + 1 if band == BANDS[0] else table.age_threshold - 1  # an age in the band
            allowed = np.flatnonzero(table.mask(sex, age))
            labels = ", ".join(table.labels[i] for i in allowed)
            diagnoses = ", ".join(table.entries[i][0] for i in allowed)
            masking_rows.append((f"{sex}, {band}", labels, diagnoses, len(table.entries) - len(allowed)))
    return [
        "## Sub-classes (derived from the training persons)",
        "",
        report.markdown_table(("sub-class", "diagnosis", "sex", "age band", "persons", "tokens"), subclass_rows),
        "",
        f"{len(table.entries)} of {len(DIAGNOSES) * len(SEXES) * len(BANDS)} (diagnosis, sex, age band) "
        f"combinations occur (age band: under / at least {table.age_threshold:g} years).",
        "",
        "## Label masking: the sub-classes a person can be assigned",
        "",
        report.markdown_table(("group", "allowed sub-classes", "their diagnoses", "masked"), masking_rows),
        "",
    ]


def notes(run: Run, lengths: np.ndarray) -> list[str]:
    """The footer's lines: each split's tokens, the token lengths, the split, the normalisation, the speed."""
    recipe, manifest = run.recipe, run.manifest
    lines = []
    for split, counts in manifest["data"]["counts"].items():
        if counts:
            lines.append(
                f"{split}: {counts['persons']} persons, {counts['tokens_annotated']} annotated tokens, "
                f'{counts["tokens_kept"]} kept; {counts["tokens_skipped"]} skipped (token_skip = "skip") '
                f"and dropped; {counts['tokens_abnormal_pronounce']} kept tokens marked token_pronounce = "
                f'"abnormal"; persons without any kept token: {listing(counts["persons_without_tokens"]) or "none"}.'
            )
    frames, splits = recipe["features"]["frames"], manifest["data"]["splits"]
    inputs = manifest["preprocessing"]["inputs"]
    validation_persons = len(manifest["data"]["validation_persons"])
    return [
        *lines,
        f"Token lengths (training): median {int(np.median(lengths))} frames, {int((lengths > frames).sum())} "
        f"longer than {frames} (randomly cropped, anew every epoch), {int((lengths < frames).sum())} shorter "
        "(zero-padded at the end).",
        f"Split: `{recipe['split']['by']}`, {splits['train']} training and {splits['validation']} validation "
        "tokens" + (f" ({validation_persons} persons contribute validation tokens)." if splits["validation"] else "."),
        f"Normalisation: `{recipe['features']['normalization']}`, mean {inputs['mean']:.3f}, std {inputs['std']:.3f} "
        f"(training tokens); aux = [sex (M = 1), age / {inputs['age_scale']:g}].",
        f"Speed: the source reports about {recipe['source']['seconds_per_epoch']} s per epoch of 10,564 tokens on "
        "the competition GPU (~120 tokens/s with the full network); ours is the members' samples/s column above.",
    ]
