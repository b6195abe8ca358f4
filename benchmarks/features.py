"""Features benchmark: DACON wav files → features, the source's way against ours, on the same files.

The source's way (its blog post, ../shared/seeds/dacon_overlap_3rd_place.md, "Preprocessing"): load every
file with librosa, then for each of the 4 resolutions compute one clip's mel spectrogram at a time in one
process, stack, and convert the whole array to dB with `ref=np.max`. Ours: `features.cached_features`
(batched librosa calls in worker processes, written to the on-disk cache) and the `Normalizer`'s dB.
Each method runs in its own process, so its peak memory is its own.

    python -m benchmarks.features --clips 1000      # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.training import peak_rss_mb

SAMPLE_RATE = 16000
RESOLUTIONS = ((256, 200), (512, 400), (1024, 800), (2048, 1600))  # (n_fft, win_length), hop 160, 64 mels


def write_clips(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 1-s 16-bit clips of tones in noise (the content does not change the cost of the transform)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    time_axis = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    paths = []
    for index in range(count):
        frequencies = rng.uniform(100, 4000, size=3)
        clip = sum(np.sin(2 * np.pi * f * time_axis) for f in frequencies) / 6 + rng.normal(0, 0.05, SAMPLE_RATE)
        paths.append(folder / f"{index}.wav")
        sf.write(paths[-1], clip.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return paths


def source_way(paths: list[Path]) -> np.ndarray:
    """The source's pipeline: (clips, 64, 101, 4) dB with one reference per resolution."""
    import librosa

    audio = [librosa.load(path, sr=None)[0] for path in paths]
    channels = []
    for n_fft, win_length in RESOLUTIONS:
        power = np.array(
            [
                librosa.feature.melspectrogram(
                    y=clip, sr=SAMPLE_RATE, n_fft=n_fft, win_length=win_length, hop_length=160, n_mels=64
                )
                for clip in audio
            ]
        )
        channels.append(librosa.power_to_db(power, ref=np.max))
    return np.stack(channels, axis=-1)


def our_way(paths: list[Path], cache_dir: Path, workers: int) -> np.ndarray:
    """Ours: cached batched mel power, then the global-reference dB of the Normalizer (before z-scoring)."""
    from replicate import features
    from replicate.dacon import resolutions

    recipe_features = {
        "n_fft": [r[0] for r in RESOLUTIONS],
        "win_length": [r[1] for r in RESOLUTIONS],
        "hop_length": 160,
        "n_mels": 64,
    }
    power, _ = features.cached_features(
        paths,
        audio=features.AudioSpec(SAMPLE_RATE, SAMPLE_RATE),
        extractor=features.mel_power_extractor(SAMPLE_RATE, resolutions(recipe_features)),
        params={"benchmark": "dacon"},
        cache_dir=cache_dir,
        name="bench",
        workers=workers,
        progress=False,
    )
    reference = np.asarray(power).max(axis=(0, 1, 2))
    return features.power_to_db(np.asarray(power), reference)


def _measure(method: str, folder: Path, workers: int, output: Path) -> dict:
    paths = sorted(folder.glob("*.wav"), key=lambda path: int(path.stem))
    started = time.perf_counter()
    if method == "source":
        result = source_way(paths)
    else:
        with tempfile.TemporaryDirectory() as cache_dir:
            result = our_way(paths, Path(cache_dir), workers)
    seconds = time.perf_counter() - started
    np.save(output, result)
    own = peak_rss_mb()
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "peak_memory_mb": round(own, 1), "worker_peak_memory_mb": round(workers_peak, 1)}


def run(clips: int, workers: int | None = None) -> dict:
    """Both methods on the same `clips` files, each in a fresh process; returns speeds, ratio and agreement."""
    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_clips(scratch / "wav", clips)
        results = {}
        for method in ("source", "ours"):
            command = [
                sys.executable,
                "-m",
                "benchmarks.features",
                "--measure",
                method,
                "--folder",
                str(scratch / "wav"),
            ]
            command += ["--workers", str(workers), "--output", str(scratch / f"{method}.npy")]
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise RuntimeError(f"{method} features failed:\n{completed.stderr[-3000:]}")
            results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
        source, ours = np.load(scratch / "source.npy"), np.load(scratch / "ours.npy")
    return {
        "clips": clips,
        "workers": workers,
        "source_clips_per_second": round(clips / results["source"]["seconds"], 1),
        "ours_clips_per_second": round(clips / results["ours"]["seconds"], 1),
        "speedup": round(results["source"]["seconds"] / results["ours"]["seconds"], 2),
        "source_peak_memory_mb": results["source"]["peak_memory_mb"],
        "ours_peak_memory_mb": results["ours"]["peak_memory_mb"],
        "ours_worker_peak_memory_mb": results["ours"]["worker_peak_memory_mb"],
        "max_abs_difference_db": float(np.max(np.abs(source - ours))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.features", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="our worker processes (0: all cores)")
    parser.add_argument("--measure", choices=("source", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.measure:
        print(json.dumps(_measure(arguments.measure, arguments.folder, arguments.workers, arguments.output)))
        return
    print(json.dumps(run(arguments.clips, arguments.workers or None), indent=2))


if __name__ == "__main__":
    main()
