"""Train the ``shapes`` CNN on procedurally drawn images and write it as ONNX.

Run through ``python -m guard.models.train shapes``; needs the ``train`` extra
(``pip install 'inference-guard[train]'``: PyTorch, CPU build). The runtime never imports
this module or torch: the graph is written with ``onnx.helper`` from the trained weights,
so the file holds only standard operators and depends on no exporter.

The data set is :func:`guard.models.imagegen.dataset` of the seed: rows ``0 ..
TRAIN_SIZE - 1`` are the members (training rows), the next ``TEST_SIZE`` rows are held out.
The first :data:`SHIPPED` rows of each are shipped (``shapes.members.npz``,
``shapes.samples.npz``, uint8) and listed in the sidecar's ``members`` / ``non_members``.

The network (``input`` FP32 ``[N, 32, 32, 3]``, NHWC, values in [0, 1]; transposed to NCHW
inside the graph)::

    per-image channel means removed, x4
    conv3x3(3->16) relu maxpool2 | conv3x3(16->32) relu maxpool2 | conv3x3(32->64) relu maxpool2
    flatten | dense(1024->64) relu | dense(64->10) softmax -> probabilities, argmax -> label

(batch normalization after each convolution while training, folded into it in the graph).

Training: Adam with a one-cycle learning rate, cross-entropy, :data:`EPOCHS` epochs in
batches of :data:`BATCH`, each image with unclipped Gaussian noise of a standard deviation
drawn per sample and per epoch from :data:`TRAIN_SIGMAS` (in [0, 1] units; ramped up from 0
over the first :data:`NOISE_WARMUP` epochs, a curriculum: the shapes are learned first), so
randomized smoothing (Cohen et al., ICML 2019) at sigma 0.25 or 0.5 certifies it. One
torch thread and a seeded torch generator: the same seed and library versions give the same
weights.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from guard.models import imagegen
from guard.models.train import noisy_accuracies, onnx_accuracy

INPUT_SHAPE = (imagegen.SIZE, imagegen.SIZE, 3)
N_CLASSES = len(imagegen.CLASS_NAMES)
TRAIN_SIZE = 20_000
TEST_SIZE = 4_000
SHIPPED = 300  # rows of each of members.npz and samples.npz
TRAIN_SIGMAS = (0.0, 0.25, 0.5)
EVAL_SIGMAS = (0.25, 0.5, 1.0)
EPOCHS = 14
BATCH = 32
LEARNING_RATE = 3e-3
NOISE_WARMUP = 2  # epochs over which the noise ramps up from 0 to full
OPSET = 17
IR_VERSION = 8
DATASET = "procedural shapes (guard.models.imagegen)"

_CONVS = (0, 4, 8)  # indices of the convolutions in network(), each followed by its BN
_DENSES = (13, 15)


@dataclass(frozen=True, slots=True)
class TrainedShapes:
    """The fitted network's weights (numpy, by layer) and what the run measured."""

    seed: int
    weights: dict[str, np.ndarray]
    seconds: float


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels to the model's FP32 [0, 1] inputs."""
    return x.astype(np.float32) / np.float32(255.0)


def network() -> nn.Sequential:
    """The CNN, NCHW, on inputs centred by :func:`centre`."""
    return nn.Sequential(
        *_block(3, 16),
        *_block(16, 32),
        *_block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, N_CLASSES),
    )


def _block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def fold_batchnorm(
    state: dict[str, np.ndarray], conv: int, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias of block ``conv`` (index in :func:`network`) with its batch
    normalization (eval mode: running statistics) folded in."""
    bn = conv + 1
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + eps)
    weight = state[f"{conv}.weight"] * scale[:, None, None, None]
    bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
    return weight.astype(np.float32), bias.astype(np.float32)


def centre(x: torch.Tensor) -> torch.Tensor:
    """What the graph does before the first convolution: each image's per-channel mean
    removed (colours and lighting vary; shapes do not), times 4."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) * 4.0


def train_shapes(seed: int = 0, *, log: Any = print) -> TrainedShapes:
    """Fit the network on the members of the data set of ``seed``."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y = imagegen.dataset(seed, 0, TRAIN_SIZE)
    images = torch.from_numpy(to_float(x)).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = EPOCHS * ((TRAIN_SIZE + BATCH - 1) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
    sigmas = torch.tensor(TRAIN_SIGMAS)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        order = torch.randperm(TRAIN_SIZE, generator=gen)
        total, correct = 0.0, 0
        for first in range(0, TRAIN_SIZE, BATCH):
            batch = order[first : first + BATCH]
            xb = images[batch]
            sigma = sigmas[torch.randint(len(TRAIN_SIGMAS), (len(batch),), generator=gen)]
            ramp = min(1.0, epoch / NOISE_WARMUP) if NOISE_WARMUP else 1.0
            noise = torch.randn(xb.shape, generator=gen) * (ramp * sigma[:, None, None, None])
            logits = model(centre(xb + noise))
            loss = loss_fn(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == labels[batch]).sum())
        log(
            f"shapes: epoch {epoch + 1}/{EPOCHS} loss {total / TRAIN_SIZE:.4f} "
            f"noisy train accuracy {correct / TRAIN_SIZE:.4f}"
        )
    model.eval()
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return TrainedShapes(seed=seed, weights=weights, seconds=time.perf_counter() - start)


def to_onnx_bytes(state: dict[str, np.ndarray], name: str = "shapes") -> bytes:
    """The serialized graph of :func:`network` with the trained ``state`` (its state dict as
    numpy arrays); batch normalization is folded into the convolutions."""
    tensors = {"scale": np.array(4.0, np.float32)}
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["nchw"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["nchw", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["h0"]),
    ]
    h = "h0"
    for i, conv in enumerate(_CONVS):
        tensors[f"conv{i}.weight"], tensors[f"conv{i}.bias"] = fold_batchnorm(state, conv)
        nodes += [
            helper.make_node(
                "Conv",
                [h, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node(
                "MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        h = f"pool{i}"
    for i, dense in enumerate(_DENSES):
        tensors[f"dense{i}.weight"] = state[f"{dense}.weight"]
        tensors[f"dense{i}.bias"] = state[f"{dense}.bias"]
    nodes += [
        helper.make_node("Flatten", [h], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "dense0.weight", "dense0.bias"], ["dense"], transB=1),
        helper.make_node("Relu", ["dense"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "dense1.weight", "dense1.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", N_CLASSES]),
        ],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in tensors.items()],
    )
    model = helper.make_model(
        graph,
        producer_name="guard.models.train_shapes",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export(trained: TrainedShapes, out_dir: Path) -> dict[str, Any]:
    """Write ``shapes.onnx``, ``shapes.json`` and the shipped rows; return the sidecar."""
    seed = trained.seed
    onnx_bytes = to_onnx_bytes(trained.weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shapes.onnx").write_bytes(onnx_bytes)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x_train, y_train = imagegen.dataset(seed, 0, TRAIN_SIZE)
    x_test, y_test = imagegen.dataset(seed, TRAIN_SIZE, TRAIN_SIZE + TEST_SIZE)
    test = to_float(x_test)
    members = np.arange(SHIPPED)
    non_members = TRAIN_SIZE + np.arange(SHIPPED)
    n_features = int(np.prod(INPUT_SHAPE))
    info = {
        "name": "shapes",
        "dataset": DATASET,
        "seed": seed,
        "n_features": n_features,
        "n_classes": N_CLASSES,
        "class_names": list(imagegen.CLASS_NAMES),
        "input_range": [0.0, 1.0],
        "input_shape": list(INPUT_SHAPE),
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, N_CLASSES]},
        ],
        "train_accuracy": onnx_accuracy(session, to_float(x_train), y_train),
        "test_accuracy": onnx_accuracy(session, test, y_test),
        "train_noise_sigmas": list(TRAIN_SIGMAS),
        "noisy_test_accuracy": noisy_accuracies(session, test, y_test, EVAL_SIGMAS, seed),
        "train_size": TRAIN_SIZE,
        "test_size": TEST_SIZE,
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "members": members.tolist(),
        "non_members": non_members.tolist(),
    }
    from guard.models.train import _dumps

    (out_dir / "shapes.json").write_text(_dumps(info))
    for suffix, x, y in (
        ("members", x_train[:SHIPPED], y_train[:SHIPPED]),
        ("samples", x_test[:SHIPPED], y_test[:SHIPPED]),
    ):
        with (out_dir / f"shapes.{suffix}.npz").open("wb") as f:
            np.savez_compressed(f, x=x, y=y)
    return info
