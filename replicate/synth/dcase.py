"""Synthetic machine sounds in the exact layout of DCASE 2020 Task 2 (dev_data/ and eval_data/).

Every machine type is its own physically motivated sound process, every machine ID its own parameters
(spread over the type's range so IDs are distinguishable, as real machines of one type are), every clip
a small random variation of its ID plus background noise. Anomalies are faults of varying strength
(so AUC is informative, not 1): bearing-fault impulses, imbalance modulation, rubbing noise, frequency
drift, missing or extra harmonics.

    fan          rotating blades: blade-pass harmonics of rotation rate × blade count + broadband airflow
    pump         periodic pressure pulses (decaying resonances) over motor hum
    slider       back-and-forth bursts: band-limited sliding noise with end-stop knocks
    valve        clicks: short decaying resonances in an ID-specific rhythm
    ToyCar       motor whine (harmonic) whose pitch follows load changes, plus gear noise
    ToyConveyor  belt rumble (low-passed noise), belt-joint thumps and motor hum

Layout written (the official DCASE 2020 Task 2 names; docs/dcase.md describes the layout)::

    out_dir/dev_data/<type>/train/normal_id_<ID>_<8 digits>.wav
    out_dir/dev_data/<type>/test/normal_id_<ID>_<8 digits>.wav, anomaly_id_<ID>_<8 digits>.wav
    out_dir/eval_data/<type>/train/normal_id_<ID>_<8 digits>.wav
    out_dir/eval_data/<type>/test/id_<ID>_<8 digits>.wav             (normal and anomalous, shuffled)
    out_dir/eval_ground_truth.csv     machine_type,file,label (1 = anomaly): only synthetic data have it
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal
from tqdm import tqdm

from replicate import files

MACHINE_TYPES = ("ToyCar", "ToyConveyor", "fan", "pump", "slider", "valve")
DEV_IDS = {
    "ToyCar": ("01", "02", "03", "04"),
    "ToyConveyor": ("01", "02", "03"),
    **{machine: ("00", "02", "04", "06") for machine in ("fan", "pump", "slider", "valve")},
}
EVAL_IDS = {
    "ToyCar": ("05", "06", "07"),
    "ToyConveyor": ("04", "05", "06"),
    **{machine: ("01", "03", "05") for machine in ("fan", "pump", "slider", "valve")},
}
ANOMALIES = {
    "fan": ("bearing", "imbalance", "harmonics", "drift", "rubbing"),
    "pump": ("drift", "harmonics", "rubbing", "bearing"),
    "slider": ("rubbing", "bearing", "drift"),
    "valve": ("drift", "extra_clicks", "harmonics", "rubbing"),
    "ToyCar": ("bearing", "imbalance", "harmonics", "drift"),
    "ToyConveyor": ("bearing", "rubbing", "drift", "imbalance"),
}
BASE_RANGES = {  # the rate that sets each machine's rhythm or pitch, Hz, over a type's IDs
    "fan": (12.0, 40.0),
    "pump": (4.0, 12.0),
    "slider": (0.6, 2.0),
    "valve": (2.5, 8.0),
    "ToyCar": (90.0, 320.0),
    "ToyConveyor": (1.0, 4.0),
}
STRENGTH_RANGE = (0.25, 1.0)  # anomaly strength, uniform: weak faults are hard to tell from normal
SNR_RANGE_DB = (8.0, 20.0)  # machine sound over background noise, per clip
RMS = 0.05
SAMPLE_RATE = 16000


def id_parameters(machine: str, machine_id: str) -> dict:
    """The fixed parameters of one machine: its type's family values, moved by ID-specific amounts.

    IDs of a type are machines of one kind (as in MIMII and ToyADMOS): they share the blade count,
    resonances, harmonic profile and hum of their type and differ by steps of a few percent to ~20 % in
    each, along differently ordered axes, so telling them apart needs the fine detail that faults disturb.
    """
    ids = sorted(DEV_IDS[machine] + EVAL_IDS[machine])
    rank = (ids.index(machine_id) + 0.5) / len(ids)
    family = _rng("type", machine)
    rng = _rng("id", machine, machine_id)
    low, high = BASE_RANGES[machine]

    def around(value, what, spread):  # value × spread^(±1/2), the ID's place along one axis
        return value * spread ** (_permuted_rank(what, machine, ids, machine_id) - 0.5)

    return {
        "rank": rank,
        "base": low * (high / low) ** rank,  # rotation / pulse / click rate, log-spaced over the IDs
        "blades": int(family.integers(3, 8)),
        "resonance": around(float(family.uniform(500, 3000)), "resonance", 1.6),
        "harmonics": family.uniform(0.2, 1.0, size=8) ** 2 * rng.uniform(0.6, 1.4, size=8),
        "hum": around(float(family.uniform(60, 120)), "hum", 1.4),
        "cutoff": around(float(family.uniform(300, 2000)), "cutoff", 2.0),
        "decay": float(family.uniform(60, 300)) * rng.uniform(0.85, 1.15),
        "noise_level": float(family.uniform(0.2, 0.6)) * rng.uniform(0.85, 1.15),
    }


def _permuted_rank(what: str, machine: str, ids: Sequence[str], machine_id: str) -> float:
    """The ID's place in [0, 1] along a second (or third) axis, in another order than the first one, so
    that IDs close in one parameter are far apart in another."""
    order = _rng("order", what, machine).permutation(len(ids))
    return (float(order[list(ids).index(machine_id)]) + 0.5) / len(ids)


def machine_sound(machine: str, parameters: dict, seconds: float, rng: np.random.Generator, anomaly: dict | None):
    """One clip of one machine (float64, before levelling); `anomaly` = {"kind", "strength"} or None."""
    n = int(round(seconds * SAMPLE_RATE))
    time = np.arange(n) / SAMPLE_RATE
    p = dict(parameters)
    p["base"] *= rng.uniform(0.985, 1.015)  # operating-point variation of one clip
    kind = anomaly["kind"] if anomaly else None
    strength = anomaly["strength"] if anomaly else 0.0
    if kind == "drift":  # speed and resonance drift (towards the middle of the type's range, where other IDs are)
        direction = 1.0 if p["rank"] < 0.5 else -1.0
        p["base"] *= 1 + direction * 0.15 * strength
        p["resonance"] *= 1 + rng.choice([-1, 1]) * 0.15 * strength
    harmonics = p["harmonics"].copy()
    if kind == "harmonics":
        # among the first three harmonics, which every machine's tonal part uses
        if rng.random() < 0.5:
            harmonics[int(np.argmax(harmonics[:3]))] *= 1 - strength  # a missing harmonic
        else:
            harmonics[int(rng.integers(3))] += 1.5 * strength  # an extra one
    generate = {
        "fan": _fan,
        "pump": _pump,
        "slider": _slider,
        "valve": _valve,
        "ToyCar": _toy_car,
        "ToyConveyor": _toy_conveyor,
    }[machine]
    sound = generate(time, p, harmonics, rng, kind, strength)
    level = np.sqrt(np.mean(sound**2)) + 1e-12
    if kind == "imbalance":  # amplitude modulation at the rotation rate (or the motor's)
        rate = p["base"] if machine == "fan" else p["hum"] / 4
        sound = sound * (1 + 0.8 * strength * np.sin(2 * np.pi * rate * time + rng.uniform(0, 2 * np.pi)))
    elif kind == "bearing":  # periodic impulses of a damaged race, ringing at a high resonance
        sound = sound + 1.5 * strength * level * _impulses(
            time, rng.uniform(40, 160), rng.uniform(3000, 6000), 800, rng
        )
    elif kind == "rubbing":  # intermittent band-limited friction noise
        bursts = _band_noise(n, rng.uniform(1500, 4000), 0.6, rng) * _gate(time, rng.uniform(2, 6), 0.5, rng)
        sound = sound + 1.5 * strength * level * bursts
    return sound


def _harmonic(time, fundamental, amplitudes, rng):
    """Σ a_k sin(2π k ∫f dt + φ_k) for a (possibly time-varying) fundamental."""
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(fundamental, time.shape)) / SAMPLE_RATE
    nyquist = SAMPLE_RATE / 2 * 0.95
    top = float(np.max(fundamental))
    return sum(
        amplitude * np.sin((k + 1) * phase + rng.uniform(0, 2 * np.pi))
        for k, amplitude in enumerate(amplitudes)
        if (k + 1) * top < nyquist
    ) / np.sqrt(np.sum(np.square(amplitudes)))


def _band_noise(n, center, relative_width, rng):
    low, high = center * (1 - relative_width / 2), min(center * (1 + relative_width / 2), 0.45 * SAMPLE_RATE)
    sos = signal.butter(2, [low, high], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    noise = signal.sosfilt(sos, rng.normal(size=n))
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _low_noise(n, cutoff, rng):
    sos = signal.butter(2, cutoff, btype="lowpass", fs=SAMPLE_RATE, output="sos")
    noise = signal.sosfilt(sos, rng.normal(size=n))
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _ringing(frequency, decay, seconds=0.05):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * frequency * t) * np.exp(-decay * t)


def _impulses(time, rate, frequency, decay, rng, jitter=0.02):
    """A train of ringing impulses at `rate` per second with a little timing jitter, unit RMS."""
    train = np.zeros_like(time)
    period = 1.0 / rate
    moments = np.arange(rng.uniform(0, period), time[-1], period)
    moments = moments + rng.normal(0, jitter * period, size=moments.shape)
    indices = np.clip((moments * SAMPLE_RATE).astype(int), 0, len(time) - 1)
    train[indices] = rng.uniform(0.7, 1.0, size=indices.shape)
    out = signal.fftconvolve(train, _ringing(frequency, decay), mode="full")[: len(time)]
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def _gate(time, rate, duty, rng):
    """A smooth on/off envelope: `duty` of every 1/rate seconds on."""
    phase = (time * rate + rng.uniform()) % 1.0
    return signal.sosfiltfilt(signal.butter(1, 30, fs=SAMPLE_RATE, output="sos"), (phase < duty).astype(float))


def _fan(time, p, harmonics, rng, kind, strength):
    blade_pass = p["base"] * p["blades"]
    tonal = _harmonic(time, blade_pass, harmonics[:6], rng)
    air = _low_noise(len(time), p["cutoff"], rng)
    return tonal + p["noise_level"] * 2 * air


def _pump(time, p, harmonics, rng, kind, strength):
    pulses = _impulses(time, p["base"], p["resonance"], p["decay"], rng, jitter=0.01)
    hum = _harmonic(time, p["hum"], harmonics[:5], rng)
    return pulses + 0.6 * hum + p["noise_level"] * _low_noise(len(time), p["cutoff"], rng)


def _slider(time, p, harmonics, rng, kind, strength):
    motion = np.abs(np.sin(np.pi * p["base"] * time + rng.uniform(0, np.pi)))  # speed of the back-and-forth
    sliding = _band_noise(len(time), p["resonance"], 0.5, rng) * motion
    knocks = _impulses(time, 2 * p["base"], p["resonance"] / 3, p["decay"], rng, jitter=0.005)
    return sliding + 0.5 * knocks + 0.3 * _harmonic(time, p["hum"], harmonics[:3], rng)


def _valve(time, p, harmonics, rng, kind, strength):
    rate = p["base"] * (1 + 0.5 * strength if kind == "extra_clicks" else 1)
    clicks = _impulses(time, rate, p["resonance"] * 1.5, p["decay"] * 2, rng, jitter=0.03)
    second = _impulses(time, rate, p["resonance"] * 0.7, p["decay"], rng, jitter=0.03)
    sound = clicks + 0.5 * second + 0.15 * _low_noise(len(time), p["cutoff"], rng)
    if kind == "harmonics":  # a contaminated seat: the click rings at an extra resonance
        sound = sound + 1.5 * strength * _impulses(time, rate, rng.uniform(500, 6000), p["decay"], rng, jitter=0.03)
    return sound


def _toy_car(time, p, harmonics, rng, kind, strength):
    # load changes: a slow random walk of ±8 % in the motor speed
    steps = np.cumsum(rng.normal(0, 1, size=max(2, int(time[-1] * 4) + 2)))
    load = np.interp(time, np.linspace(0, time[-1], len(steps)), steps / (np.abs(steps).max() + 1e-9))
    fundamental = p["base"] * (1 + 0.08 * load)
    whine = _harmonic(time, fundamental, harmonics, rng)
    gears = _band_noise(len(time), p["resonance"], 0.3, rng)
    return whine + 0.4 * gears


def _toy_conveyor(time, p, harmonics, rng, kind, strength):
    rumble = _low_noise(len(time), p["cutoff"] / 4 + 60, rng)
    thumps = _impulses(time, p["base"], p["resonance"] / 6 + 80, p["decay"] / 2, rng, jitter=0.01)
    hum = _harmonic(time, p["hum"] * 2, harmonics[:4], rng)
    return rumble + 0.8 * thumps + 0.5 * hum


def render(machine: str, machine_id: str, seconds: float, rng: np.random.Generator, anomaly: dict | None):
    """A finished clip: machine sound at a random SNR over background noise, levelled, float32."""
    sound = machine_sound(machine, id_parameters(machine, machine_id), seconds, rng, anomaly)
    sound = sound / (np.sqrt(np.mean(sound**2)) + 1e-12)
    snr = rng.uniform(*SNR_RANGE_DB)
    background = _low_noise(len(sound), rng.uniform(2000, 7000), rng) * 10 ** (-snr / 20)
    clip = (sound + background) * RMS * 10 ** (rng.uniform(-3, 3) / 20)
    return np.clip(clip, -1, 1).astype(np.float32)


def generate(
    out_dir: str | os.PathLike,
    *,
    machine_types: Sequence[str] = MACHINE_TYPES,
    dev_ids: int | None = None,
    eval_ids: int | None = None,
    train_per_id: int = 100,
    test_per_id: int = 20,
    seconds: float = 10.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a synthetic DCASE 2020 Task 2 data set.

    Args:
        out_dir: where dev_data/, eval_data/ and eval_ground_truth.csv go.
        machine_types: the types to write (default all six).
        dev_ids: the first this many development IDs of each type (default all: 41 IDs with eval_ids).
        eval_ids: the first this many evaluation IDs of each type (default all; 0: no eval_data).
        train_per_id: normal training clips per ID.
        test_per_id: normal and as many anomalous test clips per ID.
        seconds: clip length (the real data: 10 s).
        seed: random seed.
        progress: show a progress bar.

    Returns:
        {"out_dir", "n_train", "n_test", "ids"}.
    """
    unknown = [machine for machine in machine_types if machine not in MACHINE_TYPES]
    if unknown:
        raise ValueError(f"unknown machine types {unknown}; known: {', '.join(MACHINE_TYPES)}")
    if train_per_id < 1 or test_per_id < 1 or seconds <= 0:
        raise ValueError("train_per_id, test_per_id and seconds must be positive")
    out_dir = Path(out_dir)
    jobs = _clip_jobs(machine_types, dev_ids, eval_ids, train_per_id, test_per_id, seed)
    ground_truth = ["machine_type,file,label"]
    for path, machine, machine_id, label in tqdm(jobs, desc="synthetic machine sounds", disable=not progress):
        _write_clip(out_dir, path, machine, machine_id, label, seconds, seed)
        if path.startswith("eval_data/") and "/test/" in path:
            ground_truth.append(f"{machine},{Path(path).name},{label}")
    if len(ground_truth) > 1:
        files.write_text(out_dir / "eval_ground_truth.csv", "\n".join(ground_truth) + "\n")
    n_train = sum("/train/" in job[0] for job in jobs)
    return {
        "out_dir": str(out_dir),
        "n_train": n_train,
        "n_test": len(jobs) - n_train,
        "ids": sorted({(job[1], job[2]) for job in jobs}),
    }


def _clip_jobs(
    machine_types: Sequence[str],
    dev_ids: int | None,
    eval_ids: int | None,
    train_per_id: int,
    test_per_id: int,
    seed: int,
) -> list[tuple[str, str, str, int]]:
    """Every clip to write, as (path under out_dir, machine type, ID, label: 1 = anomaly), in writing order."""
    jobs = []
    for machine in machine_types:
        for machine_id in DEV_IDS[machine][:dev_ids]:
            jobs += [
                (f"dev_data/{machine}/train/normal_id_{machine_id}_{i:08d}.wav", machine, machine_id, 0)
                for i in range(train_per_id)
            ]
            jobs += [
                (f"dev_data/{machine}/test/normal_id_{machine_id}_{i:08d}.wav", machine, machine_id, 0)
                for i in range(test_per_id)
            ]
            jobs += [
                (f"dev_data/{machine}/test/anomaly_id_{machine_id}_{i:08d}.wav", machine, machine_id, 1)
                for i in range(test_per_id)
            ]
        for machine_id in EVAL_IDS[machine][:eval_ids]:
            jobs += [
                (f"eval_data/{machine}/train/normal_id_{machine_id}_{i:08d}.wav", machine, machine_id, 0)
                for i in range(train_per_id)
            ]
            labels = _rng("eval-order", machine, machine_id, seed).permutation([0] * test_per_id + [1] * test_per_id)
            jobs += [
                (f"eval_data/{machine}/test/id_{machine_id}_{i:08d}.wav", machine, machine_id, int(label))
                for i, label in enumerate(labels)
            ]
    return jobs


def _write_clip(out_dir: Path, path: str, machine: str, machine_id: str, label: int, seconds: float, seed: int) -> None:
    """Render one clip (an anomalous one with a fault of random kind and strength) from its own random
    stream, keyed by its path, and write it atomically as 16-bit WAV."""
    rng = _rng("clip", path, seed)
    anomaly = None
    if label:
        anomaly = {"kind": str(rng.choice(ANOMALIES[machine])), "strength": float(rng.uniform(*STRENGTH_RANGE))}
    clip = render(machine, machine_id, seconds, rng, anomaly)
    with files.atomic_path(out_dir / path, suffix=".wav") as temporary:
        sf.write(temporary, clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
