"""The demo models shipped with guard, and the data they were trained on.

Each model ``NAME`` in :data:`MODELS` is ``NAME.onnx`` beside this module (input
``input`` FP32 ``[None, F]``; outputs ``label`` INT64 ``[None]`` and ``probabilities``
FP32 ``[None, C]``) with a ``NAME.json`` sidecar describing it: data set, seed, input
range, accuracies measured with onnxruntime, the file's sha256, and the member
(training) and non-member (held-out) indices. ``python -m guard.models.train``
rebuilds both.

Importing this module is cheap: scikit-learn is imported only by :func:`load_split`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("digits", "breast_cancer")
_DIR = Path(__file__).parent
_LOADERS = ("load_digits", "load_breast_cancer")


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
    with np.load(_DIR / f"{_check(name)}.samples.npz") as data:
        return data["x"], data["y"]


def load_split(name: str) -> Split:
    """The member / non-member data of ``name``, rebuilt from scikit-learn's bundled copy."""
    info = model_info(name)
    loader = info["dataset"]
    if loader not in _LOADERS:
        raise ValueError(
            f"{name}.json: dataset must be one of {', '.join(_LOADERS)}; got {loader!r}"
        )
    from sklearn import datasets  # heavy: only where the data is needed

    bunch = getattr(datasets, loader)()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    members = np.asarray(info["members"], dtype=np.intp)
    non_members = np.asarray(info["non_members"], dtype=np.intp)
    return Split(
        x_members=x[members],
        y_members=y[members],
        x_nonmembers=x[non_members],
        y_nonmembers=y[non_members],
    )
