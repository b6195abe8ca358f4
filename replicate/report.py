"""Run reports: markdown tables, training-curve and ensemble-size plots, and the README results block.

The engine's report frame (`replicate.runner`) and the tasks' report parts are made of these pieces; every
number in a report or in the README's results tables is written from a run's files, never typed by hand.

    python -m replicate.report runs/dacon/<run-id> --readme README.md   # refresh the README's table
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from replicate import files


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """ "m ± s" with the sample standard deviation (n − 1), or just the value for one member."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def audio_changes(changes_by_split: dict[str, dict[str, int]]) -> str:
    """ "none", or e.g. "train: 3 mixed to mono, 1 padded" for the counts that are not zero."""
    parts = []
    for split, changes in changes_by_split.items():
        done = [f"{count} {change.replace('_', ' ')}" for change, count in changes.items() if count]
        if done:
            parts.append(f"{split}: {', '.join(done)}")
    return "; ".join(parts) or "none"


def memory_line(peak: dict | None) -> str:
    """Peak resident memory of the run's process (features are extracted in its threads)."""
    if not peak:
        return "not measured"
    line = f"{peak['process']:.0f} MiB"
    if peak.get("workers"):  # runs from before extraction moved from worker processes to threads
        line += f" (main process), {peak['workers']:.0f} MiB (largest worker process)"
    return line


def machine() -> str:
    """This machine in a few words, e.g. "x86_64 Linux, AMD EPYC, 2 CPU cores" (the cores this process may use).

    The CPU's model is named because numbers measured on two machines with the same architecture and core
    count can differ severalfold (and BLAS kernels, hence last bits, differ between CPU models).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:  # not Linux: platform.processor() is all there is
        pass
    return ", ".join(filter(None, [f"{platform.machine()} {platform.system()}", model, f"{cores} CPU cores"]))


def environment_line(environment: dict) -> str:
    return (
        f"Python {environment['python']}, Keras {environment['keras']} ({environment['backend']} backend), "
        f"TensorFlow {environment['tensorflow']}, NumPy {environment['numpy']}, librosa {environment['librosa']}; "
        f"{environment['machine']}; commit {environment['git']}; {environment['date']}"
    )


def ensemble_sizes(available: int) -> list[int]:
    """The ensemble sizes a report shows: the sources' 1/5/10/15 that exist, and all members."""
    return sorted({size for size in (1, 5, 10, 15) if size <= available} | {available})


def member_rows(where: str, member_scores: Sequence[float], by_size: dict, ensemble: str = "member ensemble") -> list:
    """A results table's rows of ours on one split: the single members' mean ± std, then the ensembles of the
    first k members for `ensemble_sizes` (`by_size`: {"k": score}), e.g. "ours: 5-member ensemble"."""
    rows = [("ours: single member, mean ± std", where, mean_std(member_scores))]
    for size in ensemble_sizes(len(member_scores)):
        rows.append((f"ours: {size}-{ensemble}", where, f"{by_size[str(size)]:.4f}"))
    return rows


def read_history(path: str | os.PathLike) -> dict[str, list[float]]:
    """A Keras CSVLogger file as column → values; columns that are all "NA" (CSVLogger writes val_*
    columns even without validation data) are left out."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [key for key in (rows[0] if rows else {}) if key != "epoch"]
    return {key: [float(row[key]) for row in rows] for key in columns if any(row[key] != "NA" for row in rows)}


def plot_training_curves(histories: dict[str, dict[str, list[float]]], path: str | os.PathLike) -> Path:
    """Loss per epoch of every member (and validation loss where there is one), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for label, history in histories.items():
        (line,) = axes.plot(range(1, len(history["loss"]) + 1), history["loss"], label=f"{label} train")
        if "val_loss" in history:
            axes.plot(
                range(1, len(history["val_loss"]) + 1),
                history["val_loss"],
                "--",
                color=line.get_color(),
                label=f"{label} validation",
            )
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    axes.set_title("Training curves")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    return _save(figure, path)


def plot_history_metric(
    histories: dict[str, dict[str, list[float]]], key: str, path: str | os.PathLike, *, label: str | None = None
) -> Path:
    """One logged value (e.g. "val_macro_f1" written by `train.BestEpoch`) per epoch for every member that
    has it, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for name, history in histories.items():
        if key in history:
            axes.plot(range(1, len(history[key]) + 1), history[key], "o-", markersize=3, label=name)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_ylabel(label or key)
    axes.set_title(label or key)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_ensemble_size(
    sizes: Sequence[int],
    scores: Sequence[float],
    path: str | os.PathLike,
    *,
    metric: str,
    baselines: dict[str, float] | None = None,
) -> Path:
    """Score of the ensemble of the first k members against k, with horizontal baselines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot(sizes, scores, "o-", label="ensemble of the first k members")
    for (label, value), style in zip((baselines or {}).items(), (":", "-.", "--"), strict=False):
        axes.axhline(value, linestyle=style, color="grey", label=label)
    axes.set_xlabel("members averaged (k)")
    axes.set_ylabel(metric)
    axes.set_xticks(list(sizes))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, *, title: str = "Confusion matrix"
) -> Path:
    """Counts with rows = true class, columns = predicted class; cells shaded by the row's share."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axes = pyplot.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row, column in np.ndindex(matrix.shape):
        color = "white" if shares[row, column] > 0.5 else "black"
        axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center", color=color, fontsize=8)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    return _save(figure, path)


def per_class_table(
    confusion: Sequence[Sequence[int]],
    values: Sequence[float],
    class_names: Sequence[str],
    headers: Sequence[str],
    plot: str | os.PathLike,
    *,
    title: str,
) -> str:
    """A classifier's per-class part of a report: the markdown table of each class's value (e.g. its recall)
    beside its count (the confusion matrix's row), and the confusion matrix plotted to `plot`.

    Args:
        confusion: counts, rows = true class, columns = predicted class, in `class_names`' order.
        values: one value per class, in the same order.
        headers: the table's three column names: the class's, the value's and the count's.
    """
    confusion = np.asarray(confusion)
    plot_confusion_matrix(confusion, class_names, plot, title=title)
    counts = confusion.sum(axis=1)
    return markdown_table(headers, [(name, values[i], int(counts[i])) for i, name in enumerate(class_names)])


def plot_roc_curves(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: str | os.PathLike, *, title: str = "ROC curves"
) -> Path:
    """One panel per group (e.g. machine type) with one ROC curve per series (e.g. machine ID), AUC in the legend.

    Args:
        curves: group → series → (labels with 1 = positive/anomalous, scores higher for positive).
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from sklearn import metrics as sk_metrics

    columns = min(3, max(1, len(curves)))
    rows = -(-len(curves) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    for axis, (group, series) in zip(axes.flat, curves.items(), strict=False):
        for label, (truth, scores) in series.items():
            false_positive, true_positive, _ = sk_metrics.roc_curve(truth, scores)
            axis.plot(
                false_positive, true_positive, label=f"{label} (AUC {sk_metrics.roc_auc_score(truth, scores):.3f})"
            )
        axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.axvline(0.1, linestyle="--", color="grey", linewidth=0.8)  # the pAUC range
        axis.set_title(group)
        axis.set_xlabel("false-positive rate")
        axis.set_ylabel("true-positive rate")
        axis.legend(fontsize="x-small", loc="lower right")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(curves) :]:
        axis.axis("off")
    figure.suptitle(title)
    return _save(figure, path)


def plot_embeddings(
    groups: dict[str, tuple[np.ndarray, Sequence[str], np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str = "Embeddings (PCA)",
) -> Path:
    """One panel per group: a 2-D PCA of embeddings, coloured by class, normal as dots and anomalous as crosses.

    Args:
        groups: group (e.g. machine type) → (embeddings (n, d), class label per row, 0/1 anomaly flag per row).
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from sklearn.decomposition import PCA

    columns = min(3, max(1, len(groups)))
    rows = -(-len(groups) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    for axis, (group, (embeddings, classes, anomalous)) in zip(axes.flat, groups.items(), strict=False):
        embeddings = np.asarray(embeddings, dtype=np.float64)
        points = (
            PCA(n_components=2, random_state=0).fit_transform(embeddings) if len(embeddings) > 2 else embeddings[:, :2]
        )
        classes = np.asarray(classes)
        anomalous = np.asarray(anomalous).astype(bool)
        for index, name in enumerate(sorted(set(classes.tolist()))):
            color = pyplot.cm.tab10(index % 10)
            for flag, marker, kind in ((False, "o", "normal"), (True, "x", "anomaly")):
                rows_of = (classes == name) & (anomalous == flag)
                if rows_of.any():
                    axis.scatter(
                        *points[rows_of].T, s=12, marker=marker, color=color, label=f"{name} {kind}", alpha=0.8
                    )
        axis.set_title(group)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize="xx-small", ncol=2)
    for axis in list(axes.flat)[len(groups) :]:
        axis.axis("off")
    figure.suptitle(title)
    return _save(figure, path)


def _save(figure, path: str | os.PathLike) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    with files.atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110)
    pyplot.close(figure)
    return Path(path)


def update_readme(readme: str | os.PathLike, key: str, markdown: str) -> Path | None:
    """Replace the block between `<!-- results:KEY -->` and `<!-- /results:KEY -->` in the page that holds
    it: the README itself, or one of the pages of `docs/` beside it (e.g. docs/dacon.md).

    Returns:
        The page, if it changed; None if it already held this block.

    Raises:
        ValueError: neither the README nor a page of docs/ has the block.
    """
    readme = Path(readme)
    pattern = re.compile(rf"(<!-- results:{re.escape(key)} -->\n).*?(<!-- /results:{re.escape(key)} -->)", re.S)
    pages = [readme, *sorted((readme.parent / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        if pattern.search(text):
            updated = pattern.sub(lambda match: match.group(1) + markdown.rstrip() + "\n" + match.group(2), text)
            if updated == text:
                return None
            files.write_text(page, updated)
            return page
    raise ValueError(f"{readme}: no '<!-- results:{key} -->' ... '<!-- /results:{key} -->' block in it or in docs/")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m replicate.report", description="Write a run's results table into the README (or its page)."
    )
    parser.add_argument("run_dir", type=Path, help="a finished run folder (runs/<recipe>/<run-id>)")
    parser.add_argument(
        "--readme", type=Path, default=Path("README.md"), help="the README (the block may be in docs/ beside it)"
    )
    arguments = parser.parse_args(argv)
    from replicate import tasks

    name, table = tasks.results_block(arguments.run_dir)
    page = update_readme(arguments.readme, name, table)
    print(f"results:{name} {f'updated in {page}' if page else 'already up to date'}")


if __name__ == "__main__":
    main()
