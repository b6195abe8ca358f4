"""DCASE ResNet-50 builders: torchvision's parameter count, the IR/margin structure, the built-in-only member
(equal to the training model's plain cosine logits, loading in a fresh process), training-model save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.dcase import build_ir_resnet50_margin, build_resnet50_softmax, finetune_model, inference_model
from replicate.layers import CosineMarginClassifier
from tests.conftest import run_python

SMALL = {"input_shape": (32, 16, 1), "num_classes": 5, "width": 8}
TINY = {**SMALL, "blocks": (1, 1, 1, 1)}  # save/load tests: the unit structure without the depth


def _inputs(seed=0, count=3, shape=(32, 16, 1)):
    return np.random.default_rng(seed).normal(size=(count, *shape)).astype(np.float32)


def test_softmax_resnet50_has_torchvision_resnet50_trainable_parameters():
    model = build_resnet50_softmax((128, 313, 1), num_classes=41)
    # torchvision resnet50: 25,557,032 = 23,508,032 + FC 2048×1000 + 1000; a 1-channel stem has 7·7·64·2 fewer
    # weights, and the classifier is 2048×41 + 41.
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    assert trainable == 25_557_032 - 2_049_000 - 7 * 7 * 64 * 2 + 2048 * 41 + 41
    assert model.name == "dcase_resnet50_softmax"
    assert model.get_layer("embedding").output.shape == (None, 2048)
    assert sum(layer.name.endswith("_add") for layer in model.layers) == 16  # 3 + 4 + 6 + 3 bottlenecks


def test_ir_margin_model_structure():
    model = build_ir_resnet50_margin(**SMALL, embedding_dim=24)
    assert model.name == "dcase_ir_resnet50_arcface"
    assert [tensor.name for tensor in model.inputs] == ["log_mel", "labels"]
    assert sum(layer.name.endswith("_add") for layer in model.layers) == 16
    assert sum(isinstance(layer, keras.layers.PReLU) for layer in model.layers) == 17  # stem + one per IR unit
    assert not any(isinstance(layer, keras.layers.GlobalAveragePooling2D) for layer in model.layers)
    head = ["head_bn1", "head_dropout", "head_flatten", "head_fc", "embedding", "classifier"]
    assert [model.get_layer(name).__class__.__name__ for name in head] == [
        "BatchNormalization",
        "Dropout",
        "Flatten",
        "Dense",
        "BatchNormalization",
        "CosineMarginClassifier",
    ]
    assert model.get_layer("embedding").output.shape == (None, 24)
    assert isinstance(model.get_layer("classifier"), CosineMarginClassifier)


@pytest.mark.parametrize(
    "arguments", [{"input_shape": (32, 16)}, {"num_classes": 1}, {"blocks": (3, 4, 6)}, {"dropout": 1.0}]
)
def test_bad_arguments_are_refused(arguments):
    with pytest.raises(ValueError):
        build_ir_resnet50_margin(**{**SMALL, **arguments})


def test_members_equal_plain_cosine_logits_and_load_without_the_package(tmp_path):
    inputs = _inputs()
    np.save(tmp_path / "inputs.npy", inputs)
    expected = {}
    for head in ("arcface", "cosface", "softmax"):
        if head == "softmax":
            model = build_resnet50_softmax(**TINY)
        else:
            model = build_ir_resnet50_margin(**TINY, margin_type=head, embedding_dim=12)
        member = inference_model(model)
        outputs = member.predict(inputs, verbose=0)
        embedder = keras.Model(model.get_layer("log_mel").output, model.get_layer("embedding").output)
        embeddings = embedder.predict(inputs, verbose=0)
        if head == "softmax":
            reference = model.predict(inputs, verbose=0)
        else:  # s · cos θ without margin, through the training model's own layer
            reference = keras.ops.convert_to_numpy(keras.ops.softmax(model.get_layer("classifier")(embeddings)))
        np.testing.assert_allclose(outputs["probabilities"], reference, atol=1e-5)
        np.testing.assert_allclose(outputs["embedding"], embeddings, atol=1e-5)
        assert all(layer.__class__.__module__.startswith("keras") for layer in member.layers)
        member.save(tmp_path / f"{head}.keras")
        expected[head] = outputs["probabilities"]
    run_python(
        "import sys, numpy as np, keras\n"
        f"inputs = np.load({str(tmp_path / 'inputs.npy')!r})\n"
        "for head in ('arcface', 'cosface', 'softmax'):\n"
        f"    member = keras.models.load_model({str(tmp_path)!r} + f'/{{head}}.keras', safe_mode=True)\n"
        f"    np.save({str(tmp_path)!r} + f'/{{head}}.npy', member.predict(inputs, verbose=0)['probabilities'])\n"
        "assert not any(name.split('.')[0] in ('replicate', 'models') for name in sys.modules)\n",
        cwd=tmp_path,  # outside the repository: nothing of the package can be imported
    )
    for head, probabilities in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{head}.npy"), probabilities, atol=1e-6)


def test_training_model_saves_and_loads_with_the_package(tmp_path):
    model = build_ir_resnet50_margin(**TINY, margin_type="cosface", embedding_dim=12)
    inputs, labels = _inputs(), np.eye(5, dtype=np.float32)[[0, 2, 4]]
    expected = model.predict([inputs, labels], verbose=0)
    model.save(tmp_path / "training.keras")
    restored = keras.models.load_model(tmp_path / "training.keras", safe_mode=True)
    np.testing.assert_allclose(restored.predict([inputs, labels], verbose=0), expected, atol=1e-5)
    assert restored.get_layer("classifier").get_config() == model.get_layer("classifier").get_config()


@pytest.mark.parametrize("head", ["arcface", "softmax"])
def test_finetune_model_trains_only_a_classifier_started_from_the_integrated_columns(head):
    model = build_ir_resnet50_margin(**TINY, embedding_dim=12) if head == "arcface" else build_resnet50_softmax(**TINY)
    classes = [1, 3, 4]
    tuned = finetune_model(model, classes)
    trainable = [layer.name for layer in tuned.layers if layer.trainable_weights and layer.trainable]
    assert trainable == ["classifier" if head == "arcface" else "probabilities"]
    inputs = _inputs(2)
    before = inference_model(model).predict(inputs, verbose=0)
    after = inference_model(tuned).predict(inputs, verbose=0)
    np.testing.assert_allclose(after["embedding"], before["embedding"], atol=1e-5)
    if head == "arcface":  # same cosines, restricted to the three classes
        restricted = before["probabilities"][:, classes]
        np.testing.assert_allclose(
            after["probabilities"], restricted / restricted.sum(axis=1, keepdims=True), atol=1e-5
        )
