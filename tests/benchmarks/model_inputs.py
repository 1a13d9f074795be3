"""What the measurement scripts need to know about a built-in model's inputs.

Everything comes from the model's sidecar (``guard/models/<name>.json``, read by
:func:`guard.models.model_info`):

- ``input_shape``: the shape of one sample, e.g. ``[32, 32, 3]`` for ``shapes``
  (NHWC images). Sidecars written before that key existed lack it; their models
  take flat rows, so the shape is ``[n_features]``.
- ``input_range``: ``[lo, hi]``, the range of every value (``[0, 16]`` on digits,
  ``[0, 1]`` on shapes).

The scripts keep every attack and statistic on flat rows ``[N, F]``
(``F = prod(input_shape)``), as the attack suite does, and reshape a batch to
``[N, *input_shape]`` only where it goes to the model: :func:`to_model` before an
onnxruntime call, and :func:`onnx_target` / :func:`http_target` for the suite's
targets (which send ``[N, *input_shape]`` themselves once their spec carries the
shape; the wrapper here does it for a spec that does not, and is a no-op for a
flat model).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.attacks.targets import Answers, HttpTarget, OnnxTarget, Target, TargetSpec  # noqa: E402
from guard.models import MODELS, model_info  # noqa: E402


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one sample of ``name`` (``[n_features]`` for an old sidecar)."""
    info = model_info(name)
    shape = info.get("input_shape") or [info["n_features"]]
    return tuple(int(d) for d in shape)


def n_features(name: str) -> int:
    """Values per sample: the product of :func:`input_shape`."""
    return math.prod(input_shape(name))


def input_range(name: str) -> tuple[float, float]:
    """The declared ``(lo, hi)`` of every input value."""
    lo, hi = model_info(name)["input_range"]
    return float(lo), float(hi)


def span(name: str) -> float:
    """``hi - lo``: the unit the suite's default radii are fractions of."""
    lo, hi = input_range(name)
    return hi - lo


def to_model(x: np.ndarray, name: str) -> np.ndarray:
    """Flat rows ``[N, F]`` (or one row ``[F]``) as the model's batch ``[N, *input_shape]``,
    float32."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(-1, *input_shape(name))


def flat(x: np.ndarray) -> np.ndarray:
    """A batch ``[N, ...]`` as flat rows ``[N, F]``."""
    x = np.asarray(x)
    return x.reshape(len(x), -1)


class _Reshaping:
    """Mixin: sends each batch as ``[N, *shape]`` (the rows stay flat for the attack)."""

    shape: tuple[int, ...]

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        return super()._send(x.reshape(len(x), *self.shape))  # type: ignore[misc]


class _ReshapingOnnx(_Reshaping, OnnxTarget):
    pass


class _ReshapingHttp(_Reshaping, HttpTarget):
    pass


def _needs_reshape(spec: TargetSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) > 1 and getattr(spec, "input_shape", None) is None


def onnx_target(name: str, **kwargs: Any) -> Target:
    """The bare built-in model ``name`` as an attack target taking flat rows."""
    spec = TargetSpec.builtin(name)
    shape = input_shape(name)
    if not _needs_reshape(spec, shape):
        return OnnxTarget.builtin(name, **kwargs)
    from guard.models import model_path

    target = _ReshapingOnnx(model_path(name), spec, **kwargs)
    target.shape = shape
    return target


def http_target(url: str, served: str, name: str, **kwargs: Any) -> HttpTarget:
    """A V2 endpoint serving built-in model ``name`` (as model ``served``), taking flat rows
    and sending ``[N, *input_shape]``."""
    spec = kwargs.pop("spec", None) or TargetSpec.builtin(name)
    shape = input_shape(name)
    if not _needs_reshape(spec, shape):
        return HttpTarget(url, served, spec, **kwargs)
    target = _ReshapingHttp(url, served, spec, **kwargs)
    target.shape = shape
    return target


def model_choices() -> tuple[str, ...]:
    """The built-in models a ``--model`` flag accepts."""
    return tuple(MODELS)


def samples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The held-out rows of ``name`` as flat float rows ``[N, F]``, and their labels."""
    from guard.models import load_samples

    x, y = load_samples(name)
    return flat(x), y


def image(name: str) -> Any:
    """How one sample of ``name`` lays out an image (:class:`guard.defenses.squeeze.Image`,
    HWC), or None for a model whose rows are not images: ``[H, W, C]`` and ``[H, W]``
    shapes as they are, a flat row of a square number of values as one grey square
    (digits' 64 = 8x8), anything else None (breast_cancer's 30 features)."""
    from guard.defenses.squeeze import Image

    shape = input_shape(name)
    if len(shape) == 3:
        return Image(shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return Image(shape[0], shape[1])
    side = math.isqrt(shape[0])
    if len(shape) == 1 and side > 1 and side * side == shape[0]:
        return Image(side, side)
    return None
