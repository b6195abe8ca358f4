"""Input-pipeline benchmark: what `pipeline.from_arrays` delivers alone (no model) for DACON's shapes.

A feature cache of `clips` rows of (64 mels, 101 frames, 4 resolutions) float32 mel power, as
`features.cached_features` leaves it (a `.npy` file opened as a read-only memory map), and DACON's 30-word
targets; the page cache is warmed by reading the file once before timing. Each measurement builds the
stream the training engine reads (`train._epoch_stream`): every epoch's dataset (`from_arrays` with the recipe's
transform, the `features.Normalizer`, shuffled by (seed, epoch)) read one after another through
`Dataset.range(epochs).flat_map`, and for K members the K members' streams stacked into fused batches by
`fused.stack_datasets`: in one numpy step per fused batch, as training reads them, and for comparison the
generic way (K pipelines and a concatenation) that streams mapped after `from_arrays` get. The stream is
consumed inside TensorFlow (`Dataset.reduce`), so what is timed is the pipeline, not Python's loop over it;
whole epochs are read until at least `min_seconds` have been timed, after one untimed epoch.

    python -m benchmarks.pipeline --clips 6000 --members 1,15      # one JSON line per measurement, then all
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (64, 101, 4)  # DACON: 64 mels × 101 frames (1 s, hop 160) × 4 resolutions (recipes/dacon.toml)
CLASSES = 30  # DACON's 30 words
BATCH_SIZE = 16  # recipes/dacon.toml train.batch_size
MIN_SECONDS = 5.0


def write_cache(folder: Path, clips: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A `features.npy` of `clips` rows of mel-power-like values (exponential: positive, as power is) opened
    read-only as a memory map, as the feature cache is read, and one target distribution per clip; the
    file is read once, so the measurement starts from a warm page cache."""
    rng = np.random.default_rng(seed)
    path = Path(folder) / "features.npy"
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(clips, *SHAPE))
    for start in range(0, clips, 512):
        features[start : start + 512] = rng.exponential(size=(min(512, clips - start), *SHAPE))
    features.flush()
    del features
    with open(path, "rb") as handle:  # into the page cache
        while handle.read(1 << 24):
            pass
    targets = rng.dirichlet(np.ones(CLASSES), size=clips).astype(np.float32)
    return np.load(path, mmap_mode="r"), targets


def normalizer_of(features: np.ndarray):
    """DACON's transform: the global-reference dB and z-score, with statistics of the first rows."""
    from replicate import features as feature_lib

    return feature_lib.Normalizer.fit([features[:256]], "global")


def measure(
    features: np.ndarray,
    targets: np.ndarray,
    transform,
    *,
    members: int,
    stacking: str = "one_step",
    batch_size: int = BATCH_SIZE,
    min_seconds: float = MIN_SECONDS,
) -> dict:
    """Samples per second (every member's) that the training stream of `members` members delivers.

    Args:
        stacking: for several members, "one_step" (`fused.stack_datasets` of the members' `from_arrays`
            streams, as `train.train_fused` reads them: one numpy step per fused batch) or "generic" (the
            same streams mapped once more, as a crop or mixup would: K pipelines and a concatenation).
    """
    import tensorflow as tf

    from replicate import fused, pipeline

    def member_epoch(seed, epoch):
        return pipeline.from_arrays(
            features,
            targets,
            batch_size=batch_size,
            indices=np.arange(len(features)),  # as the recipe passes its training rows
            transform=transform,
            shuffle=True,
            seed=seed,
            epoch=epoch,
        )

    def epoch_data(epoch):
        if members == 1:
            return member_epoch(0, epoch)
        streams = [member_epoch(seed, epoch) for seed in range(members)]
        if stacking == "generic":
            streams = [stream.map(lambda x, y: (x, y)) for stream in streams]
        return fused.stack_datasets(streams)

    def stream(first, epochs):
        dataset = tf.data.Dataset.range(first, first + epochs).flat_map(epoch_data).prefetch(tf.data.AUTOTUNE)
        return dataset.reduce(np.int64(0), lambda count, batch: count + tf.cast(tf.shape(batch[0])[0], tf.int64))

    stream(0, 1)  # tracing, the first reads
    started, processor_started = time.perf_counter(), time.process_time()
    rows = int(stream(1, 1).numpy())
    seconds = time.perf_counter() - started
    epochs = 1
    if seconds < min_seconds:
        more = int(np.ceil((min_seconds - seconds) / seconds))
        started = time.perf_counter()
        rows += int(stream(2, more).numpy())
        seconds += time.perf_counter() - started
        epochs += more
    processor_seconds = time.process_time() - processor_started
    samples = rows * members  # a fused batch stacks the members' rows along the channels
    return {
        "members": members,
        "stacking": stacking if members > 1 else "",
        "batch_size": batch_size,
        "epochs": epochs,
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds),
        # CPU time of every thread: what the pipeline costs, less sensitive than wall time to other work
        "cpu_seconds_per_1000_samples": round(processor_seconds / samples * 1000, 3),
        # the cores' worth of processor time the stream got: on a shared machine, what other work left to it
        "cores_used": round(processor_seconds / seconds, 2),
    }


def run(clips: int = 6000, members: tuple[int, ...] = (1, 15), min_seconds: float = MIN_SECONDS) -> dict:
    """Every measurement on one cache of `clips` rows (several members: both stackings)."""
    from benchmarks.training import peak_rss_mb

    with tempfile.TemporaryDirectory() as folder:
        features, targets = write_cache(Path(folder), clips)
        load = os.getloadavg()[0]
        transform = normalizer_of(features)
        measurements = []
        for count in members:
            for stacking in ("one_step", "generic") if count > 1 else ("",):
                measured = measure(
                    features, targets, transform, members=count, stacking=stacking, min_seconds=min_seconds
                )
                print(json.dumps(measured), flush=True)
                measurements.append(measured)
    return {
        "clips": clips,
        "shape": list(SHAPE),
        "measurements": measurements,
        "load_average_before": round(load, 2),
        "peak_memory_mb": peak_rss_mb(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6000, help="rows of the feature cache")
    parser.add_argument("--members", default="1,15", help="comma-separated member counts (K fused)")
    parser.add_argument("--min-seconds", type=float, default=MIN_SECONDS, help="epochs repeat until timed this long")
    arguments = parser.parse_args(argv)
    members = tuple(int(count) for count in arguments.members.split(","))
    print(json.dumps(run(arguments.clips, members, arguments.min_seconds)))


if __name__ == "__main__":
    main()
