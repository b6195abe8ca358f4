"""The AI CUP 2023 source's network and loss, ported to PyTorch, to hold the Keras model and recipe to them.

The team trained each n_mfcc variant in its own notebook; the notebooks define the same `Network` module
(a CNN on the standardised MFCC image, an MLP on the 44 clinical values, a head ending in `nn.Softmax`) and
train it with `nn.CrossEntropyLoss(weight=1/count)` and `SGD(lr=0.01, weight_decay=1e-4)`. `SourceNetwork`
is that module as the notebooks define it, unused layers included, so its state dict has the layout of the
team's `.pth` files. `compare_with_source` runs the package's model and the port on the same weights and batch
under the current Keras backend; tests call it in this process (TensorFlow) and in a fresh one per other
backend (this module imports neither TensorFlow nor the test fixtures, so it runs where only Keras and
PyTorch are installed).
"""

from __future__ import annotations

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLINICAL = 44
NUM_CLASSES = 5
# The class counts of fold 0's training persons on the real data: 3/4 of about 536 / 220 / 168 / 44 / 32.
TRAINING_COUNTS = np.array([402, 165, 126, 33, 24])


class SourceNetwork(nn.Module):
    """The notebooks' `Network(pool=1, fc1=128, maxpool=2)`.

    Its constructor also builds conv4-conv7 with bn4-bn7 (bn6 sized 64 for conv6's 128 channels), two
    BatchNorm1d (l1, l2) and a dropout that forward() never calls: they hold parameters, but no output and
    no gradient depends on them.
    """

    def __init__(self, pool: int = 1, fc1: int = 128, maxpool: int = 2):
        super().__init__()
        self.maxpool = maxpool
        self.conv1 = nn.Conv2d(1, 16, kernel_size=(3, 3), stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool1 = nn.MaxPool2d(maxpool, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=(3, 10), stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool2 = nn.MaxPool2d(maxpool, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=(3, 10), stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool3 = nn.MaxPool2d(maxpool, padding=1)
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.bn4 = nn.BatchNorm2d(64)
        self.pool4 = nn.MaxPool2d(maxpool, padding=1)
        self.conv5 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.bn5 = nn.BatchNorm2d(64)
        self.conv6 = nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1)
        self.bn6 = nn.BatchNorm2d(64)
        self.conv7 = nn.Conv2d(128, 128, kernel_size=3, stride=1, padding=1)
        self.bn7 = nn.BatchNorm2d(128)
        self.pools = pool
        self.ave_pool = nn.AdaptiveAvgPool2d(pool)
        self.linear1 = nn.Linear(NUM_CLINICAL, 1024)
        self.l1 = nn.BatchNorm1d(1024)
        self.linear2 = nn.Linear(1024, 256)
        self.l2 = nn.BatchNorm1d(256)
        self.linear3 = nn.Linear(256, 128)
        self.fc1_num = fc1
        self.fc1 = nn.Linear(64 * pool * pool + 128, fc1)
        self.bnfc = nn.BatchNorm1d(fc1)
        self.fc2 = nn.Linear(fc1, NUM_CLASSES)
        self.soft = nn.Softmax(dim=1)
        self.drop = nn.Dropout(0.3)

    def forward(self, mfcc: torch.Tensor, medical: torch.Tensor) -> torch.Tensor:
        # Each block: convolution, CELU, then BatchNorm, then padded max pooling, in that order.
        audio = self.pool1(self.bn1(F.celu(self.conv1(mfcc))))
        audio = self.pool2(self.bn2(F.celu(self.conv2(audio))))
        audio = self.pool3(self.bn3(F.celu(self.conv3(audio))))
        audio = self.ave_pool(audio).view(-1, 64 * self.pools * self.pools)
        clinical = F.celu(self.linear1(medical))
        clinical = F.celu(self.linear2(clinical))
        clinical = F.celu(self.linear3(clinical))
        head = self.bnfc(F.celu(self.fc1(torch.cat((audio, clinical), 1))))
        return self.soft(self.fc2(head))


UNUSED_LAYERS = ("conv4", "bn4", "conv5", "bn5", "conv6", "bn6", "conv7", "bn7", "l1", "l2")

# Keras layer of `models.aicup.build_aicup_model` → the port's module.
LAYERS = {
    "block1_conv": "conv1",
    "block1_bn": "bn1",
    "block2_conv": "conv2",
    "block2_bn": "bn2",
    "block3_conv": "conv3",
    "block3_bn": "bn3",
    "clinical_dense1": "linear1",
    "clinical_dense2": "linear2",
    "clinical_dense3": "linear3",
    "head_dense": "fc1",
    "head_bn": "bnfc",
    "probabilities": "fc2",
}


def standardization(mfcc: np.ndarray) -> np.ndarray:
    """The notebooks' per-clip standardisation of an (n_mfcc, frames) matrix: each frame's coefficients
    minus their mean, over their standard deviation (numpy's, ddof 0), before the network."""
    return (mfcc - mfcc.mean(axis=0)) / mfcc.std(axis=0)


def to_torch_layout(keras_name: str, values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One Keras layer's weights as the port's parameters and buffers (name → array)."""
    if keras_name.endswith("_conv"):  # (kh, kw, in, out) → (out, in, kh, kw)
        return {"weight": values[0].transpose(3, 2, 0, 1), "bias": values[1]}
    if keras_name.endswith("_bn"):
        gamma, beta, moving_mean, moving_variance = values
        return {"weight": gamma, "bias": beta, "running_mean": moving_mean, "running_var": moving_variance}
    return {"weight": values[0].T, "bias": values[1]}  # Dense (in, out) → Linear (out, in)


def copy_weights(model: keras.Model, network: SourceNetwork) -> None:
    """Put the Keras model's weights (and BatchNorm statistics) into the port."""
    state = network.state_dict()
    for keras_name, torch_name in LAYERS.items():
        values = [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.get_layer(keras_name).weights]
        for key, value in to_torch_layout(keras_name, values).items():
            target = state[f"{torch_name}.{key}"]
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{keras_name} → {torch_name}.{key}: shape {value.shape}, the port's {target.shape}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def used_parameter_count(network: SourceNetwork) -> tuple[int, set[str]]:
    """Parameters that the source's loss depends on (those given a gradient) and the modules whose
    parameters get none."""
    network.zero_grad(set_to_none=True)
    network.train()
    mfcc = torch.randn(2, 1, 13, 126, dtype=next(network.parameters()).dtype)
    medical = torch.randn(2, NUM_CLINICAL, dtype=mfcc.dtype)
    network(mfcc, medical).sum().backward()
    used = sum(p.numel() for p in network.parameters() if p.grad is not None)
    unused = {name.split(".")[0] for name, p in network.named_parameters() if p.grad is None}
    network.zero_grad(set_to_none=True)
    return used, unused


def _perturb(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm scales, shifts and statistics, so that a wrong copy or epsilon shows, and a
    25× larger output layer, so that the probabilities are far from uniform and a softmax more or less in
    the loss changes it by much (at initialisation they are all near 0.2)."""
    output = model.get_layer("probabilities")
    output.set_weights([25.0 * keras.ops.convert_to_numpy(weight) for weight in output.weights])
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, size),
                    rng.normal(0.0, 0.1, size),
                    rng.normal(0.0, 0.1, size),
                    rng.uniform(0.5, 2.0, size),
                ]
            )


LOSSES = ("DoubleSoftmaxCrossentropy", "CategoricalCrossentropy")  # the recipe's train.loss: default, option


def source_loss(loss: str, probabilities: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What a recipe loss should equal on the source's side: for the default, the notebooks'
    `CrossEntropyLoss(weight=w)` applied to the softmax output; for the plain option, the cross-entropy of
    those probabilities themselves with the same weighted mean, Σ w_y·(−log p_y) / Σ w_y."""
    if loss == "DoubleSoftmaxCrossentropy":
        return nn.CrossEntropyLoss(weight=weights)(probabilities, labels)
    return F.nll_loss(torch.log(probabilities), labels, weight=weights)


def compare_with_source(batch: int = 8, seed: int = 0) -> dict:
    """The package's AI CUP model and recipe against the source's network and loss, in float64, under the
    current Keras backend: one n_mfcc 13 model with non-trivial BatchNorm statistics, its weights copied into
    `SourceNetwork`, the same batch (every class present, the real data's class weights).

    On TensorFlow everything runs in float64. Keras's other backends promote float64 with float32 to float32
    (JAX's rule), so there BatchNormalization, LayerNormalization and the loss's reduction still compute in
    float32; `assert_matches_source` allows for that.

    Returns:
        Plain numbers (JSON-ready):
        - `inference`: max |Δ| of the eval-mode probabilities;
        - `losses`: per recipe loss, (Keras, source) eval-mode loss of the batch (Keras's compiled loss);
        - `step_loss`: (Keras, source) loss of one training step, the recipe's default loss and optimizer
          against the notebooks' (training-mode BatchNorm);
        - `update`: per weight, (max |Δ| of the two one-step SGD updates, max |update|, max |weight|);
        - `moving_mean`, `moving_variance`: max |Δ| of the BatchNorm statistics after the step (the
          variance from what Keras is expected to store: see below);
        - parameter and statistic counts of both.
    """
    from models.aicup import build_aicup_model
    from replicate import aicup, train

    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(seed)
        model = build_aicup_model(n_mfcc=13)
        rng = np.random.default_rng(seed)
        _perturb(model, rng)
        network = SourceNetwork().double()
        copy_weights(model, network)

        mfcc = rng.normal(-20.0, 80.0, size=(batch, 13, 126))  # raw MFCCs: large, offset values
        clinical = rng.random((batch, NUM_CLINICAL))
        labels = np.arange(batch) % NUM_CLASSES  # 0-based, as the notebooks' `Disease category - 1`
        weights = 1.0 / TRAINING_COUNTS
        inputs = {"mfcc_13": mfcc[..., np.newaxis], "clinical": clinical}
        targets = (np.eye(NUM_CLASSES)[labels], weights[labels])  # one-hot labels, each row's class weight
        source_inputs = (
            torch.from_numpy(np.stack([standardization(m) for m in mfcc])[:, np.newaxis]),
            torch.from_numpy(clinical),
        )
        source_labels, source_weights = torch.from_numpy(labels), torch.from_numpy(weights)

        network.eval()
        with torch.no_grad():
            source_eval = network(*source_inputs)
        keras_eval = keras.ops.convert_to_numpy(model(inputs, training=False))
        losses = {}
        for loss in LOSSES:
            recipe = aicup.load_recipe(overrides=[f"train.loss='{loss}'"])["train"]
            train.compile_model(model, recipe)
            keras_loss = model.test_on_batch(inputs, targets[0], sample_weight=targets[1], return_dict=True)["loss"]
            expected = source_loss(loss, source_eval, source_labels, source_weights)
            losses[loss] = (float(keras_loss), expected.item())

        # One training step: the recipe's compiled model, and the notebooks' loop body on the same batch.
        recipe = aicup.load_recipe()["train"]
        train.compile_model(model, recipe)
        before = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
        logs = model.train_on_batch(inputs, targets[0], sample_weight=targets[1], return_dict=True)
        after = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
        network.train()
        optimizer = torch.optim.SGD(
            network.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"]
        )
        source_before = {key: value.clone() for key, value in network.state_dict().items()}
        optimizer.zero_grad()
        step_loss = nn.CrossEntropyLoss(weight=source_weights)(network(*source_inputs), source_labels)
        step_loss.backward()
        optimizer.step()
        source_after = network.state_dict()

        update, moving_mean, moving_variance = {}, 0.0, 0.0
        for keras_name, torch_name in LAYERS.items():
            layer = model.get_layer(keras_name)
            old = to_torch_layout(keras_name, [before[w.path] for w in layer.weights])
            new = to_torch_layout(keras_name, [after[w.path] for w in layer.weights])
            for key in ("weight", "bias"):
                source_update = (source_after[f"{torch_name}.{key}"] - source_before[f"{torch_name}.{key}"]).numpy()
                update[f"{keras_name}.{key}"] = (
                    float(np.abs((new[key] - old[key]) - source_update).max()),
                    float(np.abs(source_update).max()),
                    float(np.abs(old[key]).max()),
                )
            if keras_name.endswith("_bn"):
                source_mean = source_after[f"{torch_name}.running_mean"].numpy()
                moving_mean = max(moving_mean, float(np.abs(new["running_mean"] - source_mean).max()))
                # PyTorch averages the unbiased batch variance into running_var, Keras the biased one: with
                # momentum 0.1 Keras stores 0.9·v₀ + 0.1·σ²_unbiased·(n − 1)/n, n the values per channel.
                n = batch if keras_name == "head_bn" else batch * int(np.prod(layer.input.shape[1:3]))
                unbiased = (source_after[f"{torch_name}.running_var"].numpy() - 0.9 * old["running_var"]) / 0.1
                expected = 0.9 * old["running_var"] + 0.1 * unbiased * (n - 1) / n
                moving_variance = max(moving_variance, float(np.abs(new["running_var"] - expected).max()))

        used, unused = used_parameter_count(network)
        statistics = [
            buffer.numel()
            for name, buffer in network.named_buffers()
            if name.split(".")[0] not in unused and name.endswith(("running_mean", "running_var"))
        ]
        return {
            "backend": keras.backend.backend(),
            "inference": float(np.abs(keras_eval - source_eval.numpy()).max()),
            "losses": losses,
            "step_loss": (float(logs["loss"]), step_loss.item()),
            "update": update,
            "moving_mean": moving_mean,
            "moving_variance": moving_variance,
            "keras_trainable": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "keras_non_trainable": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
            "source_used": used,
            "source_unused_modules": sorted(unused),
            "source_statistics": int(sum(statistics)),
            "learning_rate": recipe["learning_rate"],
            "weight_decay": recipe["weight_decay"],
        }
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous_policy)


# Unit roundoffs: u = ε/2, float64 1.1e-16 and float32 6.0e-8.
FLOAT64_ROUNDOFF = float(np.finfo(np.float64).eps / 2)
FLOAT32_ROUNDOFF = float(np.finfo(np.float32).eps / 2)


def tolerance(backend: str) -> float:
    """How closely the two float64 computations must agree, relative to the magnitudes compared.

    Their rounding, forward and backward, is bounded by layers × terms × u of the magnitudes involved: about
    a dozen layers and sums of at most 13,104 terms (a BatchNorm over 8 × 13 × 126 values), so ≈ 2e-11 where
    everything is float64 (TensorFlow), ≈ 1e-2 in the worst case where the normalisations and the loss's
    reduction are float32 (the other backends), and ≈ log₂(13,104) × 12 × u₃₂ ≈ 1e-5 with the pairwise
    summation of PyTorch's CPU reductions. The tolerance is half of the precision's digits, √ε: 1.5e-8 and
    3.5e-4, far above the rounding and far below what a difference of semantics moves (the second softmax
    changes this batch's loss by tens of per cent; padding, weight layout or BatchNorm epsilon and statistics
    change the outputs by 1e-4 and more, which the float64 check on TensorFlow sees).
    """
    return float(np.sqrt(np.finfo(np.float64 if backend == "tensorflow" else np.float32).eps))


def assert_matches_source(result: dict) -> None:
    """Check `compare_with_source`'s numbers (from this process or a fresh one on another backend)."""
    where = f"backend {result['backend']}"
    tol = tolerance(result["backend"])
    assert result["inference"] <= tol, (where, result["inference"])  # probabilities: values in [0, 1]
    double_softmax, plain = (result["losses"][loss][1] for loss in LOSSES)
    assert abs(double_softmax - plain) > 100 * tol * plain, where  # the check below tells them apart
    for loss, (keras_loss, expected) in result["losses"].items():
        assert abs(keras_loss - expected) <= tol * expected, (where, loss, keras_loss, expected)
    keras_loss, expected = result["step_loss"]
    assert abs(keras_loss - expected) <= tol * expected, (where, "training step", keras_loss, expected)
    # Gradient rounding is relative to the backward pass's magnitudes, which the largest update measures (a
    # tensor whose gradient cancels, e.g. a BatchNorm shift, gets a small update but no smaller rounding).
    # TensorFlow casts the Python learning rate and weight decay to float64 through float32 constants, so
    # its decoupled decay lr·wd·w carries their float32 rounding: up to 2·u₃₂·lr·wd·|w| more.
    scale = max(size for _, size, _ in result["update"].values())
    decay = 2 * FLOAT32_ROUNDOFF * result["learning_rate"] * result["weight_decay"]
    for name, (difference, size, weight) in result["update"].items():
        assert size > 0, (where, name, "not updated")  # every weight of the source's forward learns
        assert difference <= tol * scale + decay * weight, (where, name, difference, scale)
    assert result["moving_mean"] <= tol and result["moving_variance"] <= tol, where  # statistics of order 1
    assert result["keras_trainable"] == result["source_used"] == 444_261, where
    assert result["keras_non_trainable"] == result["source_statistics"], where
    assert result["source_unused_modules"] == sorted(UNUSED_LAYERS), where
