"""The engine alone: a tiny task of its own through the command line, the one run sequence, the manifest
schema, groups in their folders, the report frame and the README block."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from replicate import files, pipeline, report, runner, train
from replicate.ensemble import Ensemble
from replicate.task import (
    BenchmarkMember,
    DataError,
    EnsembleCurve,
    Group,
    Prepared,
    ReportParts,
    ResultsTable,
    Run,
    Task,
    holdout_rows,
    read_csv,
    stratified_fold_rows,
)

ROWS, WIDTH, CLASSES = 12, 4, 3


def _model(name="tiny"):
    inputs = keras.Input((WIDTH,), name="x")
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="out")(inputs), name=name)


class TinyTask(Task):
    """Rows of 4 numbers in data.npz, 3 classes; `groups` set by the test (default: one group)."""

    name = "tiny"
    title = "A tiny task"
    description = "a task of the engine's tests"
    data_help = "data.npz"

    def __init__(self, groups=None):
        self.make_groups = groups

    def load_recipe(self, profile=None, overrides=(), path=None):
        recipe = {
            "name": "tiny",
            "task": "tiny",
            "source": {"accuracy": 0.9},
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "optimizer": "Adam",
                "learning_rate": 0.01,
                "loss": "CategoricalCrossentropy",
            },
            "ensemble": {"seeds": 2, "first_seed": 0},
            "run": {"profile": profile or "full", "runs_dir": "runs", "cache_dir": "cache", "workers": 1},
        }
        for override in overrides:
            key, value = override.split("=")
            section, name = key.split(".")
            recipe[section][name] = int(value)
        return recipe

    def load(self, data_root):
        data = np.load(data_root / "data.npz")
        return data["x"], data["y"]

    def prepare(self, run, data):
        x, y = data
        run.log(f"data: {len(x)} rows")
        return Prepared(
            class_names=["a", "b", "c"],
            inputs={"x": [WIDTH]},
            unit="rows",
            splits={"train": len(x), "validation": 0},
            preprocessing={"scale": 1.0},
            data={"note": "made by the test"},
            trained_from={"x": x, "y": y},
            state=(x, y),
        )

    def groups(self, run, data, prepared):
        x, y = prepared.state
        if self.make_groups is not None:
            return self.make_groups(x, y)
        return [Group(build_model=lambda seed: _model(), train_data=_data(x, y))]

    def evaluate(self, run, data, prepared):
        x, y = prepared.state
        probabilities = Ensemble.load(run.run_dir).predict(x)
        accuracy = float(np.mean(probabilities.argmax(axis=1) == y.argmax(axis=1)))
        return {
            "accuracy": accuracy,
            "headline": f"accuracy {accuracy:.2f} (source {run.recipe['source']['accuracy']})",
        }

    def results(self, run):
        return ResultsTable(
            ("model", "accuracy"),
            [("source", run.recipe["source"]["accuracy"]), ("ours", run.scores["accuracy"])],
            "Accuracy, higher is better.",
            [f"{len(run.manifest['members'])} members", f"{run.manifest['data']['splits']['train']} rows"],
        )

    def report(self, run, data, prepared):
        return ReportParts(
            intro=["Tiny numbers."],
            sections=["## A section of the task", ""],
            member_columns={"its column": ["first", "second"][: len(run.manifest["members"])]},
            ensemble_curves=[EnsembleCurve("train rows", [1, 2], [0.5, 0.6], "accuracy", {"chance": 1 / 3})],
            notes=["A note of the task."],
        )

    def benchmark_member(self, recipe):
        return BenchmarkMember(_model, recipe["train"])


def _data(x, y):
    return lambda seed, epoch: pipeline.from_arrays(x, y, batch_size=4, shuffle=True, seed=seed, epoch=epoch)


@pytest.fixture
def data_root(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, ROWS)]
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return tmp_path


def test_a_task_runs_through_the_command_line_and_the_one_sequence(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert runner.main(TinyTask(), ["--data", str(data_root), "--run-dir", str(run_dir), "--no-progress"]) == 0
    scores = files.read_json(run_dir / "scores.json")
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [f"run folder: {run_dir}", "data: 12 rows"]
    assert out.splitlines()[-1] == f"done: {scores['headline']} — report {run_dir / 'report.md'}"

    manifest = files.read_json(run_dir / "manifest.json")
    assert list(manifest) == [
        "schema_version",
        "task",
        "recipe_name",
        "class_names",
        "inputs",
        "features",
        "preprocessing",
        "data",
        "prepare",
        "groups",
        "members",
        "environment",
        "peak_memory_mb",
    ]
    assert manifest["schema_version"] == runner.MANIFEST_SCHEMA_VERSION == 1
    assert (manifest["task"], manifest["class_names"], manifest["inputs"]) == ("tiny", ["a", "b", "c"], {"x": [4]})
    assert manifest["data"] == {
        "root": str(data_root.resolve()),
        "unit": "rows",
        "splits": {"train": 12, "validation": 0},
        "note": "made by the test",
    }
    assert manifest["groups"] == {"": {}} and manifest["preprocessing"] == {"scale": 1.0}
    assert [(m["seed"], m["group"], m["file"]) for m in manifest["members"]] == [
        (0, "", "members/seed-00.keras"),
        (1, "", "members/seed-01.keras"),
    ]
    assert set(manifest["prepare"]) == {"seconds", "peak_memory_mb"}
    assert [m["file"] for m in Ensemble.load(run_dir, groups=[""]).manifest["members"]] == [
        "members/seed-00.keras",
        "members/seed-01.keras",
    ]

    text = (run_dir / "report.md").read_text()
    assert text.startswith(f"# A tiny task — run `run`\n\nRecipe `tiny`, profile `full`; data `{data_root.resolve()}`.")
    for part in (
        "Tiny numbers.",
        "| source | 0.9000 |",
        "Accuracy, higher is better. Ours: profile `full`, 2 members, 12 rows; ",
        "### train rows: ensemble size\n\n![ensemble size](ensemble_size_train.png)",
        "## A section of the task",
        "| seed | epochs | final training loss | train s | samples/s | its column |",
        "![training curves](training_curves.png)",
        "## Features and data\n\n- A note of the task.\n- Preparation",
        "- Environment: Python ",
    ):
        assert part in text, part
    assert (
        text.index("## Results") < text.index("ensemble size") < text.index("## A section") < text.index("## Members")
    )
    assert (run_dir / "ensemble_size_train.png").is_file() and (run_dir / "training_curves.png").is_file()


def test_groups_train_in_their_folders_and_the_ensemble_is_the_groups_that_say_so(data_root, tmp_path):
    built = []

    def groups(x, y):
        def second(seed):  # a member may start from its own seed's member of an earlier group
            built.append(seed)
            return keras.models.load_model(tmp_path / "run" / "first" / "members" / f"seed-{seed:02d}.keras")

        return [
            Group(build_model=lambda seed: _model(), train_data=_data(x, y), name="first", ensemble=False),
            Group(build_model=second, train_data=_data(x, y), name="then/second", manifest={"kind": "follow-up"}),
        ]

    after = []
    task = TinyTask(groups)
    recipe = task.load_recipe()
    runner.run(task, recipe, data_root, tmp_path / "run", progress=False, log=after.append)
    assert built == [0, 1]
    manifest = files.read_json(tmp_path / "run" / "manifest.json")
    assert manifest["groups"] == {"then/second": {"kind": "follow-up"}}
    assert [m["file"] for m in manifest["members"]] == [
        "then/second/members/seed-00.keras",
        "then/second/members/seed-01.keras",
    ]
    first = files.read_json(tmp_path / "run" / "first" / "manifest.json")
    assert first["group"] == "first" and [m["file"] for m in first["members"]][0] == "members/seed-00.keras"
    assert Ensemble.load(tmp_path / "run").seeds == [0, 1]
    other = Ensemble.load(tmp_path / "run", groups=["first"])
    assert [m["file"] for m in other.manifest["members"]] == [
        "first/members/seed-00.keras",
        "first/members/seed-01.keras",
    ]
    assert "| seed | epochs |" in (tmp_path / "run" / "report.md").read_text()  # one group in the ensemble


def test_the_members_table_names_the_group_of_each_member_and_the_best_epoch_where_chosen():
    entry = {"epochs": 5, "final": {"loss": 0.5}, "train_seconds": 10.0, "samples_per_second": 20.0}
    manifest = {
        "groups": {"a": {}, "b": {}},
        "members": [
            {**entry, "seed": 0, "group": "a", "best_epoch": 3, "best": {"val_uar": 0.75}},
            {**entry, "seed": 0, "group": "b"},
        ],
    }
    table = runner.members_table(manifest, ReportParts(member_columns={"UAR": [0.7, 0.6]}))
    assert table.splitlines() == [
        "| seed | group | epochs | best epoch | best val_uar | final training loss | train s | samples/s | UAR |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 0 | a | 5 | 3 | 0.7500 | 0.5000 | 10 | 20.0 | 0.7000 |",
        "| 0 | b | 5 | - | - | 0.5000 | 10 | 20.0 | 0.6000 |",
    ]


@pytest.mark.parametrize(
    "names, message",
    [
        (["a", "a"], "distinct names"),
        (["", "b"], "a name each"),
        ([], "distinct names"),
        (["outside"], "no group is in the ensemble"),
    ],
)
def test_groups_are_checked_before_anything_trains(data_root, tmp_path, names, message):
    def groups(x, y):
        return [Group(lambda seed: _model(), _data(x, y), name=name, ensemble=name != "outside") for name in names]

    task = TinyTask(groups)
    with pytest.raises(ValueError, match=message):
        runner.run(task, task.load_recipe(), data_root, tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run" / "members").exists()


def test_an_evaluation_without_a_headline_is_a_bug_of_the_task(data_root, tmp_path, monkeypatch):
    task = TinyTask()
    monkeypatch.setattr(task, "evaluate", lambda run, data, prepared: {"accuracy": 1.0})
    with pytest.raises(TypeError, match="must return the scores with a 'headline'"):
        runner.run(task, task.load_recipe(), data_root, tmp_path / "run", progress=False, log=lambda _: None)


def test_a_csv_pandas_cannot_parse_is_a_data_error_naming_the_file(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("id,label\na,1\n")
    assert read_csv(good, dtype=str).to_dict("list") == {"id": ["a"], "label": ["1"]}
    for name, content in (("empty.csv", b""), ("ragged.csv", b'id\n"a\n'), ("latin.csv", b"id\n\xe9\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / name}: not a readable CSV (")):
            read_csv(tmp_path / name)
    (tmp_path / "folder.csv").mkdir()  # a file that cannot be read at all
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'folder.csv'}: not a readable CSV (")):
        read_csv(tmp_path / "folder.csv")


def test_an_ensemble_curve_is_read_from_a_scores_table_of_sizes():
    curve = EnsembleCurve.from_sizes("test", {"1": 0.5, "3": 0.75}, "macro F1", {"majority": 0.1})
    assert curve == EnsembleCurve("test", [1, 3], [0.5, 0.75], "macro F1", {"majority": 0.1})
    assert EnsembleCurve.from_sizes("test", {"2": 0.25}, "KL").baselines == {}
    with_members = EnsembleCurve.from_sizes("test", {"2": 0.5}, "KL", {"prior": 0.9}, members=[0.25, 0.5])
    assert list(with_members.baselines.items()) == [("prior", 0.9), ("single member (mean)", 0.375)]


def test_the_readme_block_is_written_into_the_page_that_holds_it(data_root, tmp_path):
    task = TinyTask()
    run_dir = runner.run(task, task.load_recipe(), data_root, tmp_path / "run", progress=False, log=lambda _: None)
    table = runner.results_table(Run.read(run_dir, task))
    assert table.startswith("| model | accuracy |\n|---|---|\n| source | 0.9000 |")
    readme = tmp_path / "README.md"
    readme.write_text("# top\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "tiny.md"
    page.write_text("intro\n<!-- results:tiny -->\nold\n<!-- /results:tiny -->\n")
    assert report.update_readme(readme, "tiny", table) == page
    assert page.read_text() == f"intro\n<!-- results:tiny -->\n{table}<!-- /results:tiny -->\n"
    assert readme.read_text() == "# top\n" and report.update_readme(readme, "tiny", table) is None


def test_an_engine_option_added_after_a_member_was_trained_counts_as_its_default():
    recipe = {"train": {"epochs": 3, "precision": "float32"}}
    current = train.training_setup(recipe, {})
    recorded = {"recipe": {"train.epochs": 3}, "data": {}}  # a record from before train.precision existed
    assert train.setup_changes(recorded, current) == []
    mixed = train.training_setup({"train": {"epochs": 3, "precision": "mixed_bfloat16"}}, {})
    assert train.setup_changes(recorded, mixed) == ['train.precision: "float32" → "mixed_bfloat16"']


def test_fused_members_with_their_own_callbacks_are_refused_before_training(data_root, tmp_path, capsys):
    def groups(x, y):
        return [Group(lambda seed: _model(), _data(x, y), member_callbacks=lambda folder, name: [])]

    arguments = ["--data", str(data_root), "--run-dir", str(tmp_path / "run"), "--set", "train.fused=2"]
    assert runner.main(TinyTask(groups), arguments) == 2
    assert capsys.readouterr().err == (
        "error: train.fused = 2: this recipe keeps per-member callbacks (best epoch, ReduceLROnPlateau, early "
        "stopping), which members trained as one fused model cannot run; set train.fused = 1\n"
    )
    assert not (tmp_path / "run" / "members").exists()


def test_read_csv_names_an_unreadable_file_and_csv_lines_name_rows_by_line_and_id(tmp_path):
    from replicate.task import DataError, csv_lines, read_csv

    with pytest.raises(DataError, match=r"missing\.csv: not a readable CSV"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "t.csv").write_text("ID,x\na,1\nb,2\nc,3\n")
    table = read_csv(tmp_path / "t.csv", dtype=str)
    assert csv_lines(table, table.index[table["x"] != "2"]) == "line 2, 4"
    assert csv_lines(table, table.index[table["x"] == "2"], "ID") == "line 3 (ID b)"


def test_read_json_parses_a_file_and_names_one_that_is_unreadable_or_not_json(tmp_path):
    from replicate.task import read_json

    (tmp_path / "good.json").write_text('{"a": [1, "é"]}', encoding="utf-8")
    assert read_json(tmp_path / "good.json") == {"a": [1, "é"]}
    for name, content in (("broken.json", b"{not json"), ("latin.json", b'{"a": "\xe9"}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / name}: not valid JSON (")):
            read_json(tmp_path / name)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'folder.json'}: cannot read the file (Is a")):
        read_json(tmp_path / "folder.json")


def test_repeated_rows_name_each_repeated_key_with_its_lines_and_values(tmp_path):
    from replicate.task import read_csv, repeated_rows

    (tmp_path / "t.csv").write_text("type,file,label\nfan,b,0\nfan,a,1\npump,a,1\nfan,b,1\nfan,a,0\nfan,a,1\n")
    table = read_csv(tmp_path / "t.csv")
    assert repeated_rows(table, ["type", "file"], "label", "labels ") == [  # in the order of the file
        "fan/b on lines 2, 5 (labels 0, 1)",
        "fan/a on lines 3, 6, 7 (labels 1, 0, 1)",
    ]
    assert repeated_rows(table, ["file"], "type") == [
        "b on lines 2, 5 (fan, fan)",
        "a on lines 3, 4, 6, 7 (fan, pump, fan, fan)",
    ]
    assert repeated_rows(table.drop_duplicates(["type", "file"]), ["type", "file"], "label") == []


def test_find_in_layout_looks_beside_then_in_the_root_and_one_level_down(tmp_path):
    from replicate.task import DataError, find_in_layout, layout_name

    assert layout_name(" Training Dataset ") == layout_name("training-dataset") == "training_dataset"
    (tmp_path / "Sub").mkdir()
    (tmp_path / "Sub" / "Training List.csv").write_text("")
    assert find_in_layout(tmp_path, "training_list.csv", directory=False) == tmp_path / "Sub" / "Training List.csv"
    assert find_in_layout(tmp_path, "training_list.csv", directory=True) is None
    (tmp_path / "training_list.csv").write_text("")
    assert (
        find_in_layout(tmp_path, "training_list.csv", directory=False, near=tmp_path) == tmp_path / "training_list.csv"
    )
    with pytest.raises(DataError, match="training_list.csv is there 2 times"):
        find_in_layout(tmp_path, "training_list.csv", directory=False)


def test_wav_files_by_id_in_the_ids_order_with_the_other_wavs_and_the_missing_ids_listed(tmp_path):
    from replicate.task import DataError, wav_files_by_id

    for name in ("b.wav", "a.WAV", "c.wav", "notes.txt"):
        (tmp_path / name).write_text("")
    paths, others = wav_files_by_id(tmp_path, ["b", "a"], tmp_path / "list.csv")
    assert paths == [tmp_path / "b.wav", tmp_path / "a.WAV"] and others == ["c"]
    with pytest.raises(DataError, match=rf"^2 IDs of .*list\.csv have no {tmp_path}/<ID>\.wav: d, notes$"):
        wav_files_by_id(tmp_path, ["a", "d", "notes"], tmp_path / "list.csv")


def test_header_names_match_columns_after_normalising_and_name_what_is_wrong():
    from replicate.task import DataError, header_names

    expected, optional = ["ID", "Age"], ["Label"]
    renames = header_names("t.csv", [" id", "AGE", "label"], expected, lambda n: n.strip().lower(), optional)
    assert renames == {" id": "ID", "AGE": "Age", "label": "Label"}
    assert header_names("t.csv", ["ID", "Age"], expected, str.lower, optional) == {"ID": "ID", "Age": "Age"}
    with pytest.raises(DataError, match=r"t\.csv: missing columns 'Age'; unknown columns 'Sex' \(expected the"):
        header_names("t.csv", ["ID", "Sex"], expected, str.lower)
    with pytest.raises(DataError, match=r"t\.csv: columns 'ID' and 'id' are the same column 'ID'"):
        header_names("t.csv", ["ID", "id", "Age"], expected, str.lower)


def test_fold_zero_of_a_seeded_stratified_four_fold_split():
    labels = np.repeat([1, 2, 3, 4, 5], [40, 20, 12, 4, 4])
    train_rows, validation_rows = stratified_fold_rows(labels, folds=4, fold=0, seed=0)
    assert len(validation_rows) == 20 and sorted([*train_rows, *validation_rows]) == list(range(80))
    assert (np.diff(train_rows) > 0).all() and (np.diff(validation_rows) > 0).all()
    assert np.bincount(labels[validation_rows])[1:].tolist() == [10, 5, 3, 1, 1]
    again = stratified_fold_rows(labels, folds=4, fold=0, seed=0)
    np.testing.assert_array_equal(again[1], validation_rows)
    assert not np.array_equal(stratified_fold_rows(labels, 4, 0, seed=1)[1], validation_rows)


def test_a_holdout_is_seeded_sorted_disjoint_and_holds_out_at_least_one_row():
    kept, held = holdout_rows(20, 0.25, seed=3)
    assert len(held) == 5 and sorted([*kept, *held]) == list(range(20))
    assert (np.diff(kept) > 0).all() and (np.diff(held) > 0).all()
    np.testing.assert_array_equal(holdout_rows(20, 0.25, seed=3)[1], held)
    assert not np.array_equal(holdout_rows(20, 0.25, seed=4)[1], held)
    assert len(holdout_rows(3, 0.01, seed=0)[1]) == 1
    kept, held = holdout_rows(4, 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2, 3] and held.size == 0 and held.dtype == np.int64
