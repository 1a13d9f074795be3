"""The scale of a model's input, and the stage defaults and warnings that follow from it.

A model's scale (:class:`InputScale`) is the range its values lie in and the shape
of one sample. :func:`declared_scale` reads it once per model, before its stages are
built (:func:`guard.runtime.build_runtime`, :func:`guard.tuning.space.typed_model`),
into ``StageEnv.scale``:

* the range: the ``min`` and ``max`` of the model's ``validate`` stage, else the
  ``input_range`` of a built-in model's sidecar (``model: builtin:NAME``), else unknown;
* the shape: the model's only input as its local copy declares it, else the
  ``validate`` stage's ``shape``, else unknown.

An option in input units derives its default from the scale (its ``derive=``); where
the scale is unknown it keeps the fixed default measured on the digits demo (values
0-16, 64 per row). The rules, each exact on digits (so a policy for digits behaves the
same with or without the keys):

* ``blacklight.quantize = 0.1875 x (max - min)``: 3.0 on 0-16; about Blacklight's
  50 of 255 (0.196) on 8-bit images; 0.1875 on [0, 1].
* ``blacklight.window = min(20, size // 3)`` (at least 1): the paper's 20 from 60
  values up (it used 20 on CIFAR's 3,072); shorter rows keep at least two thirds of
  their positions as window starts instead of one window over the whole row.
* ``blacklight.threshold = top // 2``, or half the row's windows when the row has no
  more than ``top // 2`` of them (else no two queries could ever match).
* ``provenance.distance = 3/64`` of the input space's diameter ``(max - min) x
  sqrt(size)``: 6.0 on digits; the same root-mean-square change per value (4.7% of the
  range) on any input, where a fixed L2 distance would link everything on small inputs
  and nothing on large ones.
* ``squeeze`` / ``squeeze_detect``: ``range`` is the declared range (``bits`` counts
  levels over it), and ``image`` the input's shape when it is an image (``[H, W, C]``
  with 1, 3 or 4 channels last, ``[C, H, W]`` first, or ``[H, W]``): a flat row is no
  image, so ``median`` still needs one declared.

:func:`scale_warnings` is what ``guard check`` says about values that load but make no
sense for the declared inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from guard.stages.shared import watched_input

if TYPE_CHECKING:
    from guard.config import StageEntry
    from guard.inference import ModelMetadata
    from guard.stages.env import StageEnv

QUANTIZE_PER_RANGE = 0.1875  # 3/16: digits' 3.0 on 0-16; Blacklight's 50/255 ~ 0.196
QUANTIZE = 3.0  # the fixed default, where the range is unknown
WINDOW = 20  # Blacklight's window, on rows of at least 3 x 20 values
DISTANCE_PER_DIAMETER = 3 / 64  # digits: 6.0 = 3/64 x 16 x sqrt(64)
SMALLEST_STEP = 1e-3  # a quantization step below this share of the range sees float noise


@dataclass(frozen=True, slots=True)
class InputScale:
    """What a model declares of its input: the values' range and one sample's shape."""

    range: tuple[float, float] | None = None
    shape: tuple[int, ...] | None = None  # batch excluded; every dimension known
    source: str = ""  # where the range comes from, for messages

    @property
    def span(self) -> float | None:
        return None if self.range is None else self.range[1] - self.range[0]

    @property
    def size(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)


UNKNOWN = InputScale()


def declared_scale(
    stages: Sequence[StageEntry], model_file: Path | None, metadata: ModelMetadata | None
) -> InputScale:
    """The scale a model's policy entry declares (see the module docstring). A ``validate``
    section whose ``min``/``max``/``shape`` do not read is skipped here: building that
    stage reports it."""
    checked = next((e.options for e in stages if e.kind == "validate"), None)
    bounds = _bounds(checked)
    source = "validate min/max"
    if bounds is None and (name := _builtin(model_file)) is not None:
        from guard.models import model_info

        bounds, source = sidecar_range(model_info(name)), f"the input_range of builtin:{name}"
    specs = metadata.inputs if metadata is not None else ()
    shape = _shape(specs[0].shape[1:]) if len(specs) == 1 else None
    if shape is None and checked is not None:
        shape = _shape(_get(checked, "shape"))
    return InputScale(bounds, shape, source if bounds is not None else "")


def sidecar_range(info: Mapping[str, Any]) -> tuple[float, float]:
    """A built-in's ``input_range``: ``[lo, hi]``, or per feature ``[[lo...], [hi...]]``
    (taken whole: the range one validate stage would declare)."""
    lo, hi = info["input_range"]
    return (float(np.min(lo)), float(np.max(hi)))


def row_shape(values: Mapping[str, Any], env: StageEnv | None) -> tuple[int, ...] | None:
    """One sample's shape of the input an option's stage watches (its ``input``): the
    model's, else the declared one; None when unknown."""
    if env is None:
        return None
    spec = watched_input(env, values.get("input"))
    shape = _shape(spec.shape[1:]) if spec is not None else None
    return shape if shape is not None else env.scale.shape


def row_size(values: Mapping[str, Any], env: StageEnv | None) -> int | None:
    """The values per row of the input an option's stage watches, when known."""
    shape = row_shape(values, env)
    return None if shape is None else math.prod(shape)


def windows(size: int, window: int, stride: int) -> int:
    """Windows Blacklight hashes in a row of ``size`` values (one, over all of a shorter row)."""
    return (size - min(window, size)) // stride + 1


# -- derived defaults (an option's ``derive``) -------------------------------------------


def quantize(values: Mapping[str, Any], env: StageEnv | None) -> Any:
    span = env.scale.span if env is not None else None
    return dataclasses.MISSING if span is None else QUANTIZE_PER_RANGE * span


def window(values: Mapping[str, Any], env: StageEnv | None) -> Any:
    size = row_size(values, env)
    return dataclasses.MISSING if size is None else window_for(size)


def window_for(size: int) -> int:
    """Blacklight's 20 on rows of 60 values or more; a third of a shorter row."""
    return min(WINDOW, max(1, size // 3))


def threshold(values: Mapping[str, Any], env: StageEnv | None) -> int:
    half = values["top"] // 2
    size = row_size(values, env)
    if size is None:
        return half
    count = windows(size, values["window"], values["stride"])
    return half if count > half else count // 2


def distance(values: Mapping[str, Any], env: StageEnv | None) -> Any:
    span, size = (env.scale.span, row_size(values, env)) if env is not None else (None, None)
    if span is None or size is None:
        return dataclasses.MISSING  # required
    return DISTANCE_PER_DIAMETER * span * math.sqrt(size)


def value_range(values: Mapping[str, Any], env: StageEnv | None) -> tuple[float, float] | None:
    return env.scale.range if env is not None else None


def image_shape(
    values: Mapping[str, Any], env: StageEnv | None
) -> tuple[int, int, int, Literal["HWC", "CHW"]] | None:
    """``(height, width, channels, layout)`` when the watched input's shape is an image."""
    from guard.defenses.squeeze import Image

    image = Image.from_shape(row_shape(values, env))
    if image is None:
        return None
    return (image.height, image.width, image.channels, image.layout)  # type: ignore[return-value]


# -- guard check --------------------------------------------------------------------------


def scale_warnings(
    model: str,
    entries: Sequence[StageEntry],
    stages: Sequence[object],
    scale: InputScale,
    metadata: ModelMetadata | None,
) -> list[str]:
    """What ``guard check`` says of model ``model``'s stages (built from ``entries``, in
    order) whose options load but make no sense for the inputs it declares: one line
    per finding, naming the option's path, its value and why."""
    from guard.stages.env import StageEnv

    env = StageEnv(model=model, backend=None, local=None, metadata=metadata, scale=scale)
    found = []
    for entry, stage in zip(entries, stages, strict=True):
        check, options = _CHECKS.get(entry.kind), getattr(stage, "options", None)
        if check is not None and options is not None:
            size = row_size({"input": getattr(options, "input", None)}, env)
            found += [f"{entry.path}.{line}" for line in check(model, options, scale, size)]
    return found


def _blacklight(model: str, o: Any, scale: InputScale, size: int | None) -> list[str]:
    found = []
    span = scale.span
    if span is None and o.quantize == QUANTIZE:
        found.append(
            f"quantize is {QUANTIZE:g}, the fixed default made for 0-16 pixels: model {model} "
            "declares no input range (its validate stage's min and max), so it cannot be "
            f"derived ({QUANTIZE_PER_RANGE} x range); set them, or quantize"
        )
    elif span is not None and o.quantize > span:
        found.append(
            f"quantize is {o.quantize:g}, larger than the input range {span:g} of model "
            f"{model} ({scale.source}): every value falls in one or two steps, so unrelated "
            f"inputs share fingerprints (derived: {QUANTIZE_PER_RANGE * span:g})"
        )
    elif span is not None and o.quantize < SMALLEST_STEP * span:
        found.append(
            f"quantize is {o.quantize:g}, below 1/1000 of the input range {span:g} of model "
            f"{model} ({scale.source}): the smallest change moves values across steps, so "
            f"near-duplicates share no windows (derived: {QUANTIZE_PER_RANGE * span:g})"
        )
    if size is None and o.window == WINDOW:
        found.append(
            f"window is {WINDOW}, the fixed default: the size of model {model}'s input is "
            "unknown (no local model copy, no validate shape), so it cannot be derived"
        )
    elif size is not None and o.window > size:
        found.append(
            f"window is {o.window}, longer than model {model}'s rows of {size} values: "
            "one window hashes the whole row, so any change breaks every match "
            f"(derived: {window_for(size)})"
        )
    if size is not None:
        held = min(o.top, windows(size, o.window, o.stride))
        if o.threshold >= held:
            found.append(
                f"threshold is {o.threshold}, but a fingerprint of model {model}'s rows of "
                f"{size} values holds at most {held} hashes: no query can ever match"
            )
    return found


def _provenance(model: str, o: Any, scale: InputScale, size: int | None) -> list[str]:
    if scale.span is None or size is None:
        return []
    diameter = scale.span * math.sqrt(size)
    if o.distance <= diameter:
        return []
    return [
        f"distance is {o.distance:g}, larger than the diameter {diameter:.4g} of model "
        f"{model}'s input space (range {scale.span:g} x sqrt({size})): every row links "
        f"to any earlier one (derived: {DISTANCE_PER_DIAMETER * diameter:.4g})"
    ]


def _squeeze(model: str, o: Any, scale: InputScale, size: int | None) -> list[str]:
    squeezers = getattr(o, "squeezers", (o,))  # squeeze_detect's, or squeeze's own
    if scale.range is None or o.range is None or not any(s.bits for s in squeezers):
        return []
    (lo, hi), (dlo, dhi) = o.range, scale.range
    if lo <= dlo and dhi <= hi and (hi - lo) <= 2 * (dhi - dlo):
        return []
    why = (
        "values outside it are clipped to its ends"
        if lo > dlo or hi < dhi
        else "most of the bit depth's levels fall where no input lies"
    )
    return [
        f"range is [{lo:g}, {hi:g}], but model {model} declares [{dlo:g}, {dhi:g}] "
        f"({scale.source}): bits counts levels over the stage's range, and {why}; "
        "leave range out to use the declared one"
    ]


_CHECKS = {
    "blacklight": _blacklight,
    "provenance": _provenance,
    "squeeze": _squeeze,
    "squeeze_detect": _squeeze,
}


# -- reading the declaration -------------------------------------------------------------


def _get(options: Any, key: str) -> Any:
    if isinstance(options, Mapping):
        return options.get(key)
    return getattr(options, key, None)


def _bounds(options: Any) -> tuple[float, float] | None:
    lo, hi = _get(options, "min"), _get(options, "max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not numbers or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        return None
    return (float(lo), float(hi))


def _shape(dims: Any) -> tuple[int, ...] | None:
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        return None
    return tuple(dims)


def _builtin(model_file: Path | None) -> str | None:
    """``NAME`` when ``model_file`` is the committed file of built-in model ``NAME``."""
    if model_file is None:
        return None
    from guard.models import MODELS, model_path

    return next((name for name in MODELS if model_path(name) == model_file), None)
