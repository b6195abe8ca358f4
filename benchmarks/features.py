"""Features benchmark: DACON wav files → features, the source's way against ours, on the same files.

The source's way (its blog post's "Preprocessing" section; docs/dacon.md): load every
file with librosa, then for each of the 4 resolutions compute one clip's mel spectrogram at a time in one
process, stack, and convert the whole array to dB with `ref=np.max`. Ours: `features.cached_features`
(`features.melspectrogram` on chunks of clips in worker threads, written to the on-disk cache), then the
global-reference dB of the `Normalizer`, chunk by chunk. Each method runs in its own process, so its peak
memory is its own; each is timed after its imports and a warm-up call on two clips (start-up costs of a
few seconds on either side that do not grow with the data), and the two are timed on the same files.

    python -m benchmarks.features --clips 1000      # prints one JSON object
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.training import peak_rss_mb

SAMPLE_RATE = 16000
RESOLUTIONS = ((256, 200), (512, 400), (1024, 800), (2048, 1600))  # (n_fft, win_length), hop 160, 64 mels
PAD_MODE = "reflect"  # librosa's default when the source ran (librosa <= 0.8), the recipe's `features.pad_mode`
DB_CHUNK = 256  # clips per dB conversion: the recipes convert batch by batch, never the whole cache at once


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
                    y=clip,
                    sr=SAMPLE_RATE,
                    n_fft=n_fft,
                    win_length=win_length,
                    hop_length=160,
                    n_mels=64,
                    pad_mode=PAD_MODE,
                )
                for clip in audio
            ]
        )
        channels.append(librosa.power_to_db(power, ref=np.max))
    return np.stack(channels, axis=-1)


def our_way(paths: list[Path], cache_dir: Path, workers: int) -> np.ndarray:
    """Ours: cached batched mel power, then the global-reference dB of the Normalizer (before z-scoring)."""
    from replicate import features

    resolutions = tuple(features.MelResolution(n_fft, win, 160, 64, PAD_MODE) for n_fft, win in RESOLUTIONS)
    spec = features.MelPowerSpec(features.AudioSpec(SAMPLE_RATE, SAMPLE_RATE), resolutions)
    power, _ = spec.cached(paths, cache_dir=cache_dir, name="bench", workers=workers, progress=False)
    reference = features.channel_max([power])
    decibels = np.empty(power.shape, dtype=np.float32)
    for start in range(0, len(power), DB_CHUNK):
        decibels[start : start + DB_CHUNK] = features.power_to_db(power[start : start + DB_CHUNK], reference)
    return decibels


def _measure(method: str, folder: Path, workers: int, output: Path) -> dict:
    paths = sorted(folder.glob("*.wav"), key=lambda path: int(path.stem))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        method_way = source_way if method == "source" else functools.partial(our_way, workers=workers)
        arguments = {} if method == "source" else {"cache_dir": Path(cache_dir) / "warm-up"}
        method_way(paths[:2], **arguments)  # imports, librosa's lazy modules, first-call set-up
        start_up = time.perf_counter() - started
        started = time.perf_counter()
        arguments = {} if method == "source" else {"cache_dir": Path(cache_dir) / "timed"}
        result = method_way(paths, **arguments)
        seconds = time.perf_counter() - started
    np.save(output, result)
    return {"seconds": seconds, "start_up_seconds": round(start_up, 2), "peak_memory_mb": peak_rss_mb()}


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
        "source_start_up_seconds": results["source"]["start_up_seconds"],
        "ours_start_up_seconds": results["ours"]["start_up_seconds"],
        "source_peak_memory_mb": results["source"]["peak_memory_mb"],
        "ours_peak_memory_mb": results["ours"]["peak_memory_mb"],
        "max_abs_difference_db": float(np.max(np.abs(source - ours))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.features", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="our worker threads (0: all cores)")
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
