"""Synthetic DCASE 2020 Task 2 data: the official names and IDs, determinism, distinct IDs, measurable faults."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from replicate import dcase
from replicate.features import MelResolution, mel_power
from replicate.synth import dcase as synth


def _log_bands(clip):
    """Mean and spread over time of the 64-band log-mel spectrogram: what tells machines apart."""
    power = mel_power(clip[None].astype(np.float32), 16000, [MelResolution(1024, 1024, 512, 64)])[0, :, :, 0]
    log_mel = np.log(power + 1e-10)
    return np.concatenate([log_mel.mean(axis=1), log_mel.std(axis=1)])


def test_default_ids_are_the_official_41():
    assert sum(len(synth.DEV_IDS[t]) + len(synth.EVAL_IDS[t]) for t in synth.MACHINE_TYPES) == 41
    assert synth.DEV_IDS["ToyCar"] == ("01", "02", "03", "04") and synth.EVAL_IDS["ToyConveyor"] == ("04", "05", "06")
    assert synth.DEV_IDS["fan"] == ("00", "02", "04", "06") and synth.EVAL_IDS["valve"] == ("01", "03", "05")


def test_layout_names_and_audio(tmp_path):
    summary = synth.generate(
        tmp_path,
        machine_types=["ToyCar", "pump"],
        dev_ids=1,
        eval_ids=1,
        train_per_id=2,
        test_per_id=2,
        seconds=0.25,
        seed=1,
        progress=False,
    )
    assert summary["ids"] == [("ToyCar", "01"), ("ToyCar", "05"), ("pump", "00"), ("pump", "01")]
    names = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.wav"))
    assert "dev_data/ToyCar/train/normal_id_01_00000001.wav" in names
    assert "dev_data/pump/test/anomaly_id_00_00000001.wav" in names
    assert "eval_data/pump/train/normal_id_01_00000000.wav" in names
    assert "eval_data/ToyCar/test/id_05_00000003.wav" in names
    assert len(names) == 4 * 2 + 2 * 4 + 2 * 4
    audio, rate = sf.read(tmp_path / names[0])
    assert rate == 16000 and audio.shape == (4000,) and sf.info(tmp_path / names[0]).subtype == "PCM_16"
    data = dcase.load_data(tmp_path)  # the package's own loader accepts it, ground truth included
    assert sorted(data.eval_labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown machine types"):
        synth.generate(tmp_path, machine_types=["drill"], progress=False)


@pytest.mark.parametrize("machine", synth.MACHINE_TYPES)
def test_same_seed_same_clip_and_ids_are_told_apart_by_their_spectra(machine):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    first = synth.render(machine, "02", 1.0, np.random.default_rng(3), None)
    np.testing.assert_array_equal(first, synth.render(machine, "02", 1.0, np.random.default_rng(3), None))
    ids = synth.DEV_IDS[machine]
    clips = 8
    features = np.array(
        [
            _log_bands(synth.render(machine, i, 2.0, np.random.default_rng(seed), None))
            for i in ids
            for seed in range(clips)
        ]
    )
    labels = np.repeat(np.arange(len(ids)), clips)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = cross_val_score(classifier, features, labels, cv=4).mean()
    assert accuracy >= 0.6, accuracy  # chance: 1 / len(ids); the IDs of a type are similar machines


@pytest.mark.parametrize("kind", ["bearing", "imbalance", "rubbing", "drift", "harmonics"])
def test_faults_change_the_sound_more_with_strength(kind):
    def distance(strength):
        normal = synth.machine_sound("fan", synth.id_parameters("fan", "02"), 1.0, np.random.default_rng(5), None)
        faulty = synth.machine_sound(
            "fan", synth.id_parameters("fan", "02"), 1.0, np.random.default_rng(5), {"kind": kind, "strength": strength}
        )

        return np.linalg.norm(_log_bands(faulty / np.std(faulty)) - _log_bands(normal / np.std(normal)))

    assert distance(1.0) > distance(0.25) > 0
