"""The demo models shipped with guard, and the data they were trained on.

Each model ``NAME`` in :data:`MODELS` is ``NAME.onnx`` beside this module (input
``input`` FP32 ``[None, *input_shape]``; outputs ``label`` INT64 ``[None]`` and
``probabilities`` FP32 ``[None, C]``) with a ``NAME.json`` sidecar describing it: data
set, seed, input range and shape, accuracies measured with onnxruntime, the file's sha256,
and the member (training) and non-member (held-out) indices, and the rows of that split:
``NAME.members.npz`` and ``NAME.samples.npz`` (so the demo, the attacks and the tuner run
on a plain install, without scikit-learn).

* ``digits``: 8x8 digits, ``input_shape`` ``[64]``, pixel values in [0, 16];
* ``breast_cancer``: 30 tabular features, ``input_shape`` ``[30]``;
* ``shapes``: 32x32 colour images drawn by :mod:`guard.models.imagegen`, ``input_shape``
  ``[32, 32, 3]`` (NHWC), values in [0, 1]; its shipped rows are a few hundred of its
  training and held-out images, stored as uint8.

The rows are returned flat (``[N, F]``, ``F`` the product of ``input_shape``) and float32:
uint8 rows are scaled to [0, 1]. ``python -m guard.models.train`` rebuilds them all.

Importing this module is cheap: it needs numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("digits", "breast_cancer", "shapes")
_DIR = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class Split:
    """A model's training members and held-out non-members: ``x`` float32, ``y`` int64."""

    x_members: np.ndarray
    y_members: np.ndarray
    x_nonmembers: np.ndarray
    y_nonmembers: np.ndarray


def _check(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return name


def model_path(name: str) -> Path:
    """Path of the committed ``<name>.onnx``."""
    return _DIR / f"{_check(name)}.onnx"


def model_info(name: str) -> dict[str, Any]:
    """The parsed ``<name>.json`` sidecar (a fresh dict on every call)."""
    return json.loads((_DIR / f"{_check(name)}.json").read_text())


def load_samples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out (non-member) inputs and labels shipped beside the model; no scikit-learn needed."""
    return _rows(name, "samples")


def load_split(name: str) -> Split:
    """The member / non-member rows of ``name``, shipped beside the model (written by
    ``python -m guard.models.train``); no scikit-learn needed."""
    info = model_info(name)
    x_members, y_members = _rows(name, "members")
    x_nonmembers, y_nonmembers = _rows(name, "samples")
    for what, y, indices in (
        ("members", y_members, info["members"]),
        ("samples", y_nonmembers, info["non_members"]),
    ):
        if len(y) != len(indices):
            raise ValueError(
                f"{name}.{what}.npz has {len(y)} rows but {name}.json lists {len(indices)}: "
                "rerun python -m guard.models.train"
            )
    return Split(
        x_members=x_members,
        y_members=y_members,
        x_nonmembers=x_nonmembers,
        y_nonmembers=y_nonmembers,
    )


def _rows(name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 rows and int64 labels; uint8 images (0..255) come back in [0, 1]."""
    with np.load(_DIR / f"{_check(name)}.{part}.npz") as data:
        x, y = data["x"], data["y"]
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    return x.reshape(len(x), -1).astype(np.float32, copy=False), y
