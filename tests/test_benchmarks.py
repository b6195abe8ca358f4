"""The benchmarks measure what they say: the source's feature pipeline and ours agree on the same files, and
the README block is made from the results files."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks import features, run


def test_the_source_way_and_ours_give_the_same_decibels(tmp_path):
    paths = features.write_clips(tmp_path / "wav", 6)
    with threadpool_limits(1):  # as our extraction runs: more BLAS threads change the mel product's last bit
        source = features.source_way(paths)
    ours = features.our_way(paths, tmp_path / "cache", workers=2)
    assert source.shape == ours.shape == (6, 64, 101, 4)
    np.testing.assert_array_equal(ours, source)


def _measurement(fused, samples_per_second, backend="tensorflow"):
    return {
        "model": "dacon",
        "backend": backend,
        "device": "cpu",
        "precision": "float32",
        "fused": fused,
        "layout": "copies" if fused > 1 else "",
        "batch_size": 16,
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
    assert "| dacon | tensorflow | cpu | float32 | 4 (copies) | 16 | 50.0 | 2.00× | 1500 | – |" in block
    assert "| make recipe-dacon | 7.2 min |" in block
    hours = 100_000 * 187 * 15 / 50.0 / 3600
    assert f"| {hours:,.1f} h | ≈ 142 h (9.5 h per model, RTX 2060 Super) |" in block
