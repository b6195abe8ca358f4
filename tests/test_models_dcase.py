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
    assert sum(isinstance(layer, keras.layers.PReLU) for layer in model.layers) == 16  # one per IR unit
    assert model.get_layer("stem_act").get_config()["activation"] == "relu"  # torchvision's stem
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


def test_ir_depths_have_the_documented_parameter_counts():
    """The default (torchvision's resnet50 stages 3-4-6-3 of IR units) and the ArcFace paper's IR-50 (3-4-14-3),
    at the default input and 41 IDs: the counts the module docstring, the recipe and docs/dcase.md give."""
    counts = {}
    for blocks in ((3, 4, 6, 3), (3, 4, 14, 3)):
        model = build_ir_resnet50_margin(blocks=blocks)
        counts[blocks] = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
        keras.backend.clear_session()
    assert counts == {(3, 4, 6, 3): 63_323_008, (3, 4, 14, 3): 72_774_528}


PORT = {"input_shape": (32, 40, 1), "num_classes": 6, "embedding_dim": 16, "width": 8}  # full depth, narrow


def _torch_ir_resnet(torch, blocks, width, in_shape, embedding_dim, num_classes, margin_type, scale, margin):
    """The write-up's margin model written afresh in PyTorch: torchvision's resnet50 with the ArcFace IR unit.

    Readings where the write-up is silent, with the reason:
    - stem, stages, strides and downsampling are torchvision's resnet50 code, which the write-up says it started
      from: 7×7/2 convolution (padding 3), BN, ReLU, 3×3/2 max-pool (padding 1); stages of `blocks` units at
      widths 64-128-256-512 (× width / 64), stride 2 in the first unit of stages 2-4; the shortcut is
      torchvision's `downsample` (1×1 convolution with the stride, BN) where the shape changes, else the
      identity. Only the unit and the pooling are said to be replaced, so the stem keeps its ReLU.
    - the unit is the ArcFace paper's IR unit in the write-up's order BN-Conv-BN-PReLU-Conv-BN, 3×3
      convolutions with padding 1, the stride on the second (as in the paper), PReLU with one slope per
      channel, nothing after the addition.
    - the head is BN-Dropout-FC-BN in that order on the flattened last feature map (the ArcFace paper's "E"
      output layer), the FC with a bias (nn.Linear's default).
    - the classifier: cos θ_j between the L2-normalised embedding and class j's L2-normalised weight vector,
      logits s · cos θ_j, with the target's replaced by s · cos(θ_y + m) (ArcFace) or s · (cos θ_y − m)
      (CosFace). No "easy margin" or threshold variant: the write-up names none, and at m = 0.05 they would
      only act at cos θ_y < −0.9988.
    """
    nn = torch.nn

    class IRUnit(nn.Module):
        def __init__(self, in_channels, channels, stride):
            super().__init__()
            self.residual = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.PReLU(channels),
                nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
                nn.BatchNorm2d(channels),
            )
            self.downsample = None
            if stride != 1 or in_channels != channels:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
                )

        def forward(self, x):
            return self.residual(x) + (x if self.downsample is None else self.downsample(x))

    class IRResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            stages, in_channels = [], width
            for index, (units, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True)):
                channels = width * 2**index
                for unit in range(units):
                    stages.append(IRUnit(in_channels, channels, stride if unit == 0 else 1))
                    in_channels = channels
            self.stages = nn.Sequential(*stages)
            with torch.no_grad():
                height, frames = self.stages(self.maxpool(self.conv1(torch.zeros(1, 1, *in_shape)))).shape[2:]
            self.head = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.Dropout(0.4),
                nn.Flatten(),
                nn.Linear(in_channels * height * frames, embedding_dim),
                nn.BatchNorm1d(embedding_dim),
            )
            self.classifier = nn.Parameter(torch.empty(embedding_dim, num_classes))

        def embed(self, x):
            return self.head(self.stages(self.maxpool(self.relu(self.bn1(self.conv1(x))))))

        def forward(self, x, labels):
            embedding = self.embed(x)
            cosine = nn.functional.normalize(embedding, dim=1) @ nn.functional.normalize(self.classifier, dim=0)
            if margin_type == "arcface":
                target = torch.cos(torch.acos(cosine) + margin)
            else:
                target = cosine - margin
            return scale * torch.where(labels.bool(), target, cosine), embedding, cosine

    return IRResNet().double().eval()


def _randomise_normalisation(model: keras.Model, seed: int) -> None:
    """BN statistics, BN affine parameters and PReLU slopes away from their initial values (all 1, 0 or 0.25),
    so a layer in the wrong place or with the wrong parameter cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = (keras.ops.convert_to_numpy(w) for w in layer.weights)
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.2, mean.shape),
                    rng.uniform(0.5, 1.5, variance.shape),
                ]
            )
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([rng.uniform(0.0, 0.5, layer.weights[0].shape)])


def _copy_into_torch(torch, model: keras.Model, port, blocks) -> None:
    """Keras weights into the port, matched by role (layer names), channels-last kernels to channels-first."""

    def load(parameter, layer_name, index=0, transform=lambda value: value):
        value = transform(keras.ops.convert_to_numpy(model.get_layer(layer_name).weights[index]))
        assert tuple(parameter.shape) == value.shape, (layer_name, tuple(parameter.shape), value.shape)
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))

    def conv(module, name):
        load(module.weight, name, transform=lambda kernel: kernel.transpose(3, 2, 0, 1))  # (h, w, in, out) → OIHW

    def norm(module, name):
        for index, parameter in enumerate((module.weight, module.bias, module.running_mean, module.running_var)):
            load(parameter, name, index)  # Keras: gamma, beta, moving mean, moving variance

    names = [f"stage{stage}_unit{unit}" for stage, units in enumerate(blocks, 1) for unit in range(1, units + 1)]
    with torch.no_grad():
        conv(port.conv1, "stem_conv")
        norm(port.bn1, "stem_bn")
        for unit, name in zip(port.stages, names, strict=True):
            for module, suffix in zip(unit.residual, ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3"), strict=True):
                if isinstance(module, torch.nn.PReLU):
                    load(module.weight, f"{name}_prelu", transform=lambda alpha: alpha.reshape(-1))
                elif isinstance(module, torch.nn.Conv2d):
                    conv(module, f"{name}_{suffix}")
                else:
                    norm(module, f"{name}_{suffix}")
            if unit.downsample is not None:
                conv(unit.downsample[0], f"{name}_shortcut_conv")
                norm(unit.downsample[1], f"{name}_shortcut_bn")
        norm(port.head[0], "head_bn1")
        height, frames, channels = model.get_layer("head_flatten").input.shape[1:]
        # Keras flattens (h, w, c), torch (c, h, w): the FC's input rows in torch's order.
        load(
            port.head[3].weight,
            "head_fc",
            transform=lambda kernel: (
                kernel.reshape(height, frames, channels, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)
            ),
        )
        load(port.head[3].bias, "head_fc", 1)
        norm(port.head[4], "embedding")
        load(port.classifier, "classifier")


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
def test_ir_model_equals_an_independent_pytorch_port_of_the_write_up(margin_type):
    """Same weights, same outputs: the builder is the write-up's network, not just one of the same shape.

    The network runs in float64 on both sides, so what remains is round-off of float64 sums: at most K·u per
    layer (K ≤ 9·64 terms in a convolution, u = 2⁻⁵³ ≈ 1.1e-16), ~7e-14 per layer and ~3e-12 over the ~40
    layers, relative to the outputs' scale; 1e-9 of it leaves a margin of 300 for amplification by the layers,
    while any structural difference (padding, order, flatten layout, a missing BN) changes outputs by O(1).
    The margin layer computes in float32 by design: cos θ of float32-normalised d-vectors is off by at most
    (3d + 6)·u₃₂ (normalisation of both vectors and the d-term dot product), and ArcFace's cos(arccos c + m)
    amplifies that by sin(θ + m) / sin θ (checked ≤ 2 on these inputs) plus a few u₃₂ of its own: the logits'
    tolerance is s · 2 · (3d + 16) · u₃₂.
    """
    torch = pytest.importorskip("torch")
    previous_policy, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = build_ir_resnet50_margin(**PORT, margin_type=margin_type)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.config.set_floatx(previous_floatx)
    _randomise_normalisation(model, seed=1)
    scale, margin = model.get_layer("classifier").scale, model.get_layer("classifier").margin
    port = _torch_ir_resnet(
        torch, (3, 4, 6, 3), PORT["width"], PORT["input_shape"][:2], PORT["embedding_dim"], PORT["num_classes"],
        margin_type, scale, margin,
    )  # fmt: skip
    _copy_into_torch(torch, model, port, (3, 4, 6, 3))

    keras_trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    keras_statistics = sum(int(np.prod(weight.shape)) for weight in model.non_trainable_weights)
    assert keras_trainable == sum(parameter.numel() for parameter in port.parameters())
    assert keras_statistics == sum(
        buffer.numel() for name, buffer in port.named_buffers() if not name.endswith("num_batches_tracked")
    )

    inputs = np.random.default_rng(2).normal(size=(4, *PORT["input_shape"]))
    labels = np.eye(PORT["num_classes"])[[0, 3, 5, 3]]
    embedder = keras.Model(model.get_layer("log_mel").output, model.get_layer("embedding").output)
    embeddings = keras.ops.convert_to_numpy(embedder(inputs, training=False))
    logits = keras.ops.convert_to_numpy(model([inputs, labels], training=False))
    with torch.no_grad():
        port_outputs = port(torch.from_numpy(inputs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
    port_logits, port_embeddings, port_cosine = (tensor.numpy() for tensor in port_outputs)

    assert embeddings.dtype == np.float64
    np.testing.assert_allclose(embeddings, port_embeddings, rtol=0, atol=1e-9 * np.abs(port_embeddings).max())
    theta = np.arccos(port_cosine[labels == 1])
    assert np.all(np.sin(theta + margin) / np.sin(theta) <= 2)
    unit_roundoff = np.finfo(np.float32).eps / 2
    np.testing.assert_allclose(
        logits, port_logits, rtol=0, atol=scale * 2 * (3 * PORT["embedding_dim"] + 16) * unit_roundoff
    )
    # The labels reached the margin: each target logit is ~s·m·sin θ ≈ 1.5 below its plain s · cos θ.
    assert np.all(scale * port_cosine[labels == 1] - logits[labels == 1] > 1.0)
