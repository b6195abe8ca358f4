"""Report pieces: tables, summaries and the generated README block."""

from __future__ import annotations

import pytest

from replicate import report


def test_markdown_table_and_summaries():
    table = report.markdown_table(("a", "b"), [(1, 0.123456), ("x", "y")])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | y |"]
    assert report.mean_std([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    assert report.mean_std([0.5]) == "0.5000"
    assert report.mean_std([84.0, 86.0], digits=2) == "85.00 ± 1.41"
    assert report.ensemble_sizes(3) == [1, 3]
    assert report.ensemble_sizes(15) == [1, 5, 10, 15]
    assert report.ensemble_sizes(12) == [1, 5, 10, 12]
    assert report.member_rows("test", [0.5, 0.7], {"1": 0.5, "2": 0.75}, ensemble="model average") == [
        ("ours: single member, mean ± std", "test", "0.6000 ± 0.1414"),
        ("ours: 1-model average", "test", "0.5000"),
        ("ours: 2-model average", "test", "0.7500"),
    ]
    assert report.audio_changes({"train": {"mixed_to_mono": 2, "padded": 0}, "test": {"padded": 0}}) == (
        "train: 2 mixed to mono"
    )
    assert report.audio_changes({"train": {"padded": 0}}) == "none"


def test_readme_block_is_replaced_and_only_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:dacon -->\nold\n<!-- /results:dacon -->\nafter\n")
    assert report.update_readme(readme, "dacon", "| new |\n")
    assert readme.read_text() == "intro\n<!-- results:dacon -->\n| new |\n<!-- /results:dacon -->\nafter\n"
    assert not report.update_readme(readme, "dacon", "| new |")
    with pytest.raises(ValueError, match="no '<!-- results:maic -->'"):
        report.update_readme(readme, "maic", "x")


def test_history_reader_skips_columns_csvlogger_fills_with_na(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("epoch,loss,val_loss\n0,3.5,NA\n1,3.0,NA\n")
    assert report.read_history(path) == {"loss": [3.5, 3.0]}


def test_confusion_matrix_plot_is_written(tmp_path):
    path = report.plot_confusion_matrix([[3, 1], [0, 2]], ["a", "b"], tmp_path / "confusion.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_per_class_table_counts_each_true_class_and_plots_the_matrix(tmp_path):
    table = report.per_class_table(
        [[3, 1], [0, 2]], [0.75, 1.0], ["a", "b"], ("class", "recall", "persons"), tmp_path / "c.png", title="t"
    )
    assert table.splitlines()[2:] == ["| a | 0.7500 | 4 |", "| b | 1.0000 | 2 |"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_machine_names_architecture_cpu_model_and_usable_cores():
    import os
    import platform

    described = report.machine()
    assert described.startswith(f"{platform.machine()} {platform.system()}, ")
    assert described.endswith(f", {len(os.sched_getaffinity(0))} CPU cores")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        assert not models or f", {models[0]}, " in described
