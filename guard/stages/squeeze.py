"""``squeeze``: feature squeezing as preprocessing; the model sees the squeezed input.

Xu, Evans, Qi, NDSS 2018 (see :mod:`guard.defenses.squeeze`). YAML keys:

``input``   the input to squeeze; default: the model's only input (known from
            the local copy), else the request's only input
``range``   ``[lo, hi]``: the range of the values, over which ``bits`` counts levels
``image``   ``{height, width, channels: 1, layout: HWC}``: the image each sample
            holds, flat (``[batch, H*W*C]``) or shaped (``[batch, H, W, C]`` for
            ``HWC``, ``[batch, C, H, W]`` for ``CHW``, ``[batch, H, W]`` for one
            channel); required by ``median``
``clip``    ``[lo, hi]``: clip every value to this range
``bits``    keep this many bits of colour depth (1 to 16) over ``range`` (required)
``median``  k: replace each pixel by the median of the k x k window around it,
            per channel (edges reflected, as ``scipy.ndimage.median_filter``'s
            default ``mode='reflect'``; an even k reaches one pixel further up
            and left); 1 <= k <= min(height, width)

At least one of ``clip``, ``bits``, ``median``. They run in the order clip →
bits → median whatever order the keys are written in (only clip and bits could
disagree about order: the median commutes with both). Example::

    - squeeze: {bits: 4, median: 2, range: [0, 16], image: {height: 8, width: 8}}

Failure mode: an input that is not FP32/FP64 or does not hold the declared
image is a 400 naming the input; nothing else can fail. Place it after
``validate`` (which casts to the model's datatype and rejects NaN) and never
before ``certify`` or ``squeeze_detect`` (``guard check`` warns; see
:func:`guard.defenses.squeeze.squeeze_warnings`).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from guard.configreader import Section
from guard.defenses.squeeze import LAYOUTS, Image, Squeezer
from guard.errors import RequestError
from guard.inference import datatype_name
from guard.pipeline import BaseStage, RequestContext, Verdict
from guard.stages.env import StageEnv

# Inputs this large are squeezed in a worker thread (the kernels release the GIL)
# rather than on the event loop: about 50 µs of work.
OFFLOAD_VALUES = 1 << 16
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Squeeze(BaseStage):
    name = "squeeze"

    def __init__(self, *, input_name: str | None, squeezer: Squeezer) -> None:
        self.input_name = input_name
        self.squeezer = squeezer

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Squeeze:
        input_name = read_input(section, env)
        value_range = read_range(section, "range")
        image = read_image(section, env, input_name)
        stage = cls(input_name=input_name, squeezer=read_squeezer(section, value_range, image))
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {"input": self.input_name, **describe_squeezer(self.squeezer)}

    async def on_request(self, ctx: RequestContext) -> Verdict:
        name, x = take_input(ctx, self.input_name)
        ctx.request.inputs[name] = await squeeze_input(self.squeezer, name, x)
        return Verdict.CONTINUE


# --- shared with squeeze_detect ---------------------------------------------------


def read_input(section: Section, env: StageEnv) -> str | None:
    """The ``input`` key; defaults to the model's only input when the metadata is known."""
    name = section.str("input", None)
    specs = [s.name for s in env.metadata.inputs] if env.metadata else []
    if name is not None and specs and name not in specs:
        raise section.error(
            "input", f"names no input of model {env.model}; it has {', '.join(specs)}"
        )
    if name is None and len(specs) == 1:
        name = specs[0]
    return name


def read_range(section: Section, key: str) -> tuple[float, float] | None:
    """A ``[lo, hi]`` key: two finite numbers with ``lo < hi``; None when absent."""
    if not section.has(key) or section.data[key] is None:
        section.str(key, None)  # mark as read
        return None
    values = [v for _, v in section.section_list(key)]
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise section.error(key, f"must be [lo, hi], two finite numbers; got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not lo < hi or not math.isfinite(hi - lo):
        raise section.error(key, f"needs lo < hi; got [{lo:g}, {hi:g}]")
    return lo, hi


def read_image(section: Section, env: StageEnv, input_name: str | None) -> Image | None:
    """The ``image`` key, checked against the model's input shape when that is known."""
    if not section.has("image"):
        section.child("image")  # mark as read
        return None
    child = section.child("image")
    height = child.int("height", min=1)
    width = child.int("width", min=1)
    channels = child.int("channels", 1, min=1)
    layout = child.choice("layout", LAYOUTS, "HWC")
    child.finish()
    image = Image(height, width, channels, layout)
    specs = {s.name: s for s in env.metadata.inputs} if env.metadata else {}
    spec = specs.get(input_name) if input_name else None
    if spec is not None and all(d >= 0 for d in spec.shape[1:]):
        values = math.prod(spec.shape[1:])
        if values != image.size:
            raise section.error(
                "image",
                f"holds {image.size} values ({image}), but input {spec.name} of model "
                f"{env.model} has {values} per sample",
            )
    return image


def read_squeezer(
    section: Section, value_range: tuple[float, float] | None, image: Image | None
) -> Squeezer:
    """The ``clip``, ``bits`` and ``median`` keys of one squeezer."""
    clip = read_range(section, "clip")
    bits = section.int("bits", None, min=1, max=16)
    median = section.int("median", None, min=1)
    if clip is None and bits is None and median is None:
        raise section.error(None, "needs at least one of clip, bits, median")
    if bits is not None and value_range is None:
        raise section.error("bits", "needs range: [lo, hi] (the values' range) on the stage")
    if median is not None:
        if image is None:
            raise section.error(
                "median", "needs image: {height, width, channels, layout} on the stage"
            )
        if median > min(image.height, image.width):
            raise section.error(
                "median", f"window {median}x{median} does not fit the image ({image})"
            )
    return Squeezer(clip=clip, bits=bits, median=median, value_range=value_range, image=image)


def describe_squeezer(squeezer: Squeezer) -> dict[str, Any]:
    return {
        "squeezer": squeezer.name,
        "range": list(squeezer.value_range) if squeezer.value_range else None,
        "image": str(squeezer.image) if squeezer.image else None,
    }


def take_input(ctx: RequestContext, name: str | None) -> tuple[str, np.ndarray]:
    """The named input of the request (or its only one), refused with 400 unless float."""
    inputs = ctx.request.inputs
    if name is None:
        if len(inputs) != 1:
            raise RequestError(
                f"inputs: expected exactly one input to squeeze; got {len(inputs)} "
                "(the policy can name one with `input`)"
            )
        name = next(iter(inputs))
    if name not in inputs:
        raise RequestError(f"inputs: input {name!r} is required")
    x = inputs[name]
    if x.dtype not in _FLOATS:
        raise RequestError(
            f"inputs.{name}: squeezing needs FP32 or FP64 values; got {datatype_name(x.dtype)} "
            "(a validate stage before it can cast)"
        )
    return name, x


async def squeeze_input(squeezer: Squeezer, name: str, x: np.ndarray) -> np.ndarray:
    """``squeezer(x)``, in a worker thread when ``x`` is large; a bad shape is a 400."""
    try:
        if x.size < OFFLOAD_VALUES:
            return squeezer(x)
        return await asyncio.get_running_loop().run_in_executor(None, squeezer, x)
    except ValueError as exc:
        raise RequestError(f"inputs.{name}: {exc}") from exc
