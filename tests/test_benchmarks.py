"""The benchmarks measure what they say: the source's feature pipeline and ours agree on the same files, and
the README block is made from the results files."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from benchmarks import features, run, training
from tests.test_backends import SMALL_MODELS


def test_the_source_way_and_ours_give_the_same_decibels(tmp_path):
    paths = features.write_clips(tmp_path / "wav", 6)
    with threadpool_limits(1):  # as our extraction runs: more BLAS threads change the mel product's last bit
        source = features.source_way(paths)
    ours = features.our_way(paths, tmp_path / "cache", workers=2)
    assert source.shape == ours.shape == (6, 64, 101, 4)
    np.testing.assert_array_equal(ours, source)


def _measurement(fused, samples_per_second, backend="tensorflow", model="dacon", batch_size=16, steps=10):
    return {
        "model": model,
        "backend": backend,
        "device": "cpu",
        "precision": "float32",
        "fused": fused,
        "layout": "copies" if fused > 1 else "",
        "batch_size": batch_size,
        "steps": steps,
        "samples_per_second": samples_per_second,
        "peak_memory_mb": 1500.0,
        "peak_device_memory_mb": None,
    }


def test_the_readme_block_shows_ratios_and_the_extrapolation():
    stamp = {"date": "2026-12-01", "machine": "x86_64 Linux, 2 CPU cores", "command": "python -m benchmarks.run"}
    speeds = {"source_clips_per_second": 100.0, "ours_clips_per_second": 350.0, "speedup": 3.5}
    measured = {"source_start_up_seconds": 2.5, "ours_start_up_seconds": 2.4, "max_abs_difference_db": 7.6e-6}
    memory = {"source_peak_memory_mb": 1140.0, "ours_peak_memory_mb": 940.0}
    results = {
        "cpu": {
            "features": {**stamp, "clips": 3000, "workers": 2, **speeds, **measured, **memory},
            "training": {**stamp, "measurements": [_measurement(1, 25.0), _measurement(4, 50.0)]},
            "recipes": {**stamp, "runs": [{"recipe": "dacon", "command": "make recipe-dacon", "wall_seconds": 432.0}]},
        }
    }
    block = run.readme_block(results)
    assert "| ours: `features.melspectrogram` on chunks of clips, 2 threads, cached | 350.0 | 2.4 | 940 |" in block
    assert "3000 clips; ours is **3.5×** the source's way" in block
    assert "| dacon | tensorflow | cpu | float32 | 4 (copies) | 16 | 10 | 50.0 | 2.00× | 1500 | – |" in block
    assert "| make recipe-dacon | 7.2 min |" in block
    hours = 100_000 * 187 * 15 / 50.0 / 3600
    assert f"| {hours:,.1f} h | ≈ 142 h (9.5 h per model, RTX 2060 Super) |" in block


def test_the_readme_block_has_the_maic_and_dcase_rows_and_says_what_was_not_measured():
    stamp = {"date": "2026-12-01", "machine": "x86_64 Linux, 2 CPU cores", "command": "python -m benchmarks.run"}
    measurements = [
        _measurement(1, 9.0, model="maic", batch_size=32, steps=1),
        _measurement(2, 10.0, model="maic", batch_size=32, steps=1),
        _measurement(1, 3.0, model="dcase", batch_size=64, steps=1),
    ]
    skipped = [
        {"model": "dcase", "backend": "tensorflow", "fused": 4, "skipped": training.MODELS["dcase"].note},
        {"model": "dcase", "backend": "torch", "fused": 1, "skipped": "on a CPU, measured on tensorflow only"},
        {"model": "dcase", "backend": "torch", "fused": 4, "skipped": training.MODELS["dcase"].note},
    ]
    block = run.readme_block({"cpu": {"training": {**stamp, "measurements": measurements, "skipped": skipped}}})
    assert "| maic | tensorflow | cpu | float32 | 2 (copies) | 32 | 1 | 10.0 | 1.11× | 1500 | – |" in block
    assert "| dcase | tensorflow | cpu | float32 | 1 | 64 | 1 | 3.0 |  | 1500 | – |" in block
    assert f"Not measured:\n\n- dcase fused 4: {training.MODELS['dcase'].note}\n- dcase on torch: on a CPU" in block
    # MAIC: 10,564 tokens less 528 validation, 100 epochs, 15 seeds, at the best throughput (10 samples/s)
    maic_hours = 10_036 * 100 * 15 / 10.0 / 3600
    assert "| MAIC: 10,036 tokens × 100 epochs × 15 seeds | cpu: cpu (tensorflow, float32, 2 fused (copies))" in block
    assert f"| {maic_hours:,.1f} h | ≈ 37 h if 15 models (89 s per epoch × 100 epochs = 2.5 h per model" in block
    assert f"| {1_000 * 70 * 15 / 3.0 / 3600:,.1f} h | not reported |" in block
    assert "DCASE (integrated ArcFace): per 1,000 training clips × 70 epochs × 15 seeds" in block


def test_every_workload_has_a_model_and_the_source_figures_add_up():
    assert set(run.WORKLOADS) == set(training.MODELS)
    assert 89 * 100 / 3600 == pytest.approx(2.5, abs=0.05)  # MAIC: 89 s per epoch × 100 epochs
    assert 89 * 100 * 15 / 3600 == pytest.approx(37, abs=0.5)  # × 15 models


@pytest.mark.parametrize("name", ["maic", "dcase"])
def test_the_new_training_benchmarks_train_a_step_on_tensorflow(name):
    """The two-input MAIC model and DCASE's margin model with its labels input, small (the torch test in
    test_backends.py runs every entry, fused too)."""
    profile, overrides = SMALL_MODELS[name]
    options = dict(batch_size=2, profile=profile, overrides=overrides, cpu_limits=False, min_seconds=0)
    result = training.measure(name, steps=1, **options)
    assert result["backend"] == "tensorflow" and result["samples_per_second"] > 0
    assert result["recipe_changes"] == [f"profile {profile}", *overrides]


def test_fast_steps_are_timed_again_until_min_seconds_have_passed():
    profile, overrides = SMALL_MODELS["aicup"]
    options = dict(batch_size=2, profile=profile, overrides=overrides, cpu_limits=False)
    assert training.measure("aicup", steps=3, min_seconds=0, **options)["steps"] == 3
    repeated = training.measure("aicup", steps=3, min_seconds=1.0, **options)["steps"]
    assert repeated > 3 and repeated % 3 == 0  # whole passes over the 3 batches (a small step takes milliseconds)


def test_the_benchmark_builds_the_full_recipes_models():
    """The full profiles' models as the recipes build them (not trained: parameter counts and shapes)."""
    maic = training.setup_of("maic")
    model = maic.build()
    assert {t.name: tuple(t.shape) for t in model.inputs} == {"mel": (None, 128, 64, 1), "aux": (None, 2)}
    assert model.output_shape == (None, 21)
    assert (maic.train["optimizer"], maic.train["learning_rate"], maic.train["batch_size"]) == ("Adam", 0.001, 32)
    assert maic.train["loss"] == "CategoricalFocalCrossentropy"
    dcase = training.setup_of("dcase")
    assert dcase.label_input == "labels" and dcase.train["batch_size"] == 64 and dcase.train["optimizer"] == "Adam"
    assert dcase.train["loss_options"] == {"label_smoothing": 0.05, "from_logits": True}
    model = dcase.build()
    assert {t.name: tuple(t.shape) for t in model.inputs} == {"log_mel": (None, 128, 313, 1), "labels": (None, 41)}


def test_heavy_models_are_limited_on_a_cpu_only_and_dcase_is_never_fused():
    assert training.skip_reason("dcase", "jax", 8, on_cpu=False) == training.MODELS["dcase"].note
    assert training.skip_reason("dcase", "jax", 1, on_cpu=False) == ""  # a GPU measures every backend
    assert "tensorflow only" in training.skip_reason("dcase", "torch", 1, on_cpu=True)
    assert training.skip_reason("dcase", "tensorflow", 1, on_cpu=True) == ""
    assert "one member at a time" in training.skip_reason("maic", "torch", 4, on_cpu=True)
    assert training.skip_reason("maic", "torch", 8, on_cpu=False) == ""
    assert training.skip_reason("dacon", "torch", 4, on_cpu=True) == ""


def test_the_pipeline_benchmark_counts_every_members_samples(tmp_path):
    from benchmarks import pipeline

    features, targets = pipeline.write_cache(tmp_path, 40)
    assert isinstance(features, np.memmap) and features.shape == (40, 64, 101, 4) and targets.shape == (40, 30)
    transform = pipeline.normalizer_of(features)
    one = pipeline.measure(features, targets, transform, members=1, batch_size=8, min_seconds=0)
    fused = pipeline.measure(features, targets, transform, members=3, stacking="generic", batch_size=8, min_seconds=0)
    assert (one["samples"], one["epochs"], one["stacking"]) == (40, 1, "")
    assert (fused["samples"], fused["stacking"]) == (3 * 40, "generic")  # rows × members
    assert one["samples_per_second"] > 0 and fused["cpu_seconds_per_1000_samples"] > 0 and fused["cores_used"] > 0


def test_the_readme_block_has_the_pipeline_table_and_the_ray_row():
    stamp = {"date": "2026-12-02", "machine": "x86_64 Linux, 2 CPU cores", "command": "python -m benchmarks.run"}
    one = {
        "members": 1,
        "stacking": "",
        "batch_size": 16,
        "samples_per_second": 21000,
        "cpu_seconds_per_1000_samples": 0.07,
    }
    fused = {**one, "members": 15, "stacking": "one_step", "samples_per_second": 20500}
    pipeline = {**stamp, "clips": 6000, "shape": [64, 101, 4], "measurements": [one, fused], "load_average_before": 1.5}
    ray = {
        **stamp,
        "members": 2,
        "epochs": 1,
        "train_clips": 800,
        "ray_cpus": 2,
        "local_seconds": 100.0,
        "ray_seconds": 80.0,
        "speedup": 1.25,
        "local_member_train_seconds": [30.0, 31.0],
        "ray_member_train_seconds": [50.0, 52.0],
        "load_average_before": 1.0,
    }
    block = run.readme_block({"cpu": {"pipeline": pipeline, "ray": ray}})
    assert "| one member | 16 | 21,000 | 0.070 |" in block
    assert (
        "| 15 members fused, one step per fused batch (as `train.fused` reads `from_arrays` streams) | 16 | 20,500 |"
        in block
    )
    assert "memory-mapped cache of 6,000 clips of 64 × 101 × 4 float32" in block
    assert "| local executor: one after another, TensorFlow on every core | 100 s | 30 + 31 s |" in block
    assert (
        "| Ray: a local instance of 2 CPUs, 1 CPU (1 thread) per member, side by side | 80 s (1.25×) | 50 + 52 s |"
        in block
    )
    assert "| 2 DACON quick members, 1 epoch each, 800 clips |" in block
