"""``squeeze``: feature squeezing as preprocessing; the model sees the squeezed input.

Xu, Evans, Qi, NDSS 2018 (see :mod:`guard.defenses.squeeze`).

Keys: :class:`SqueezeOptions` (docs/stage-options.md).

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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from guard.defenses.squeeze import Image, Squeezer
from guard.errors import RequestError
from guard.inference import datatype_name
from guard.pipeline import RequestContext, Verdict
from guard.stages import scale
from guard.stages.env import StageEnv
from guard.stages.options import OptionError, OptionsStage, option
from guard.stages.shared import only_input, request_input, watched_input

# Inputs this large are squeezed in a worker thread (the kernels release the GIL)
# rather than on the event loop: about 50 µs of work.
OFFLOAD_VALUES = 1 << 16
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """The image each sample holds: flat (``[batch, H*W*C]``) or shaped (``[batch, H, W, C]``
    for ``HWC``, ``[batch, C, H, W]`` for ``CHW``, ``[batch, H, W]`` for one channel)."""

    height: int = option(min=1, doc="rows of the image")
    width: int = option(min=1, doc="columns of the image")
    channels: int = option(1, min=1, doc="channels of the image")
    layout: Literal["HWC", "CHW"] = option("HWC", doc="where the channels are")

    @property
    def image(self) -> Image:
        return Image(self.height, self.width, self.channels, self.layout)


@dataclass(frozen=True, kw_only=True)
class SqueezerOptions:
    """One squeezer: ``clip`` → ``bits`` → ``median`` whatever order they are written in."""

    clip: tuple[float, float] | None = option(None, doc="`[lo, hi]`: clip every value to it")
    bits: int | None = option(
        None, min=1, max=16, doc="keep this many bits of colour depth over `range`"
    )
    median: int | None = option(
        None,
        min=1,
        doc="k: each pixel becomes the median of the k x k window around it, per channel "
        "(edges reflected as scipy's `mode='reflect'`; an even k reaches one pixel further "
        "up and left); at most min(height, width) of `image`",
    )

    def __post_init__(self) -> None:
        if self.clip is None and self.bits is None and self.median is None:
            raise OptionError(None, "needs at least one of clip, bits, median")

    def check(
        self, value_range: tuple[float, float] | None, image: ImageOptions | None, at: str = ""
    ) -> None:
        """The rules with the stage's ``range`` and ``image`` (``at``: this squeezer's key)."""
        if self.bits is not None and value_range is None:
            raise OptionError(
                f"{at}bits",
                "needs range: [lo, hi] (the values' range) on the stage, or min and max on "
                "the model's validate stage",
            )
        if self.median is None:
            return
        if image is None:
            raise OptionError(
                f"{at}median", "needs image: {height, width, channels, layout} on the stage"
            )
        if self.median > min(image.height, image.width):
            raise OptionError(
                f"{at}median",
                f"window {self.median}x{self.median} does not fit the image ({image.image})",
            )

    def build(self, value_range: tuple[float, float] | None, image: Image | None) -> Squeezer:
        return Squeezer(
            clip=self.clip,
            bits=self.bits,
            median=self.median,
            value_range=value_range,
            image=image,
        )


def _image(shape: tuple[int, int, int, Literal["HWC", "CHW"]] | None) -> ImageOptions | None:
    if shape is None:
        return None
    height, width, channels, layout = shape
    return ImageOptions(height=height, width=width, channels=channels, layout=layout)


@dataclass(frozen=True, kw_only=True)
class SqueezedInputOptions:
    """What ``squeeze`` and ``squeeze_detect`` both take: the input, its range and image."""

    input: str | None = option(
        None,
        names="input",
        derive=only_input,
        doc="the input to squeeze; default: the model's only input (known from the local "
        "copy), else the request's only input",
    )
    range: tuple[float, float] | None = option(
        None,
        derive=scale.value_range,
        shown="the declared range",
        doc="`[lo, hi]`: the range of the values, over which `bits` counts levels "
        "(declared: the validate stage's min/max, else a built-in model's)",
    )
    image: ImageOptions | None = option(
        None,
        derive=lambda values, env: _image(scale.image_shape(values, env)),
        shown="the input's, when an image",
        doc="`{height, width, channels: 1, layout: HWC}`; required by `median`. The input "
        "is an image when its shape is `[H, W, C]` (1, 3 or 4 channels), `[C, H, W]` or "
        "`[H, W]`; a flat row is none",
    )


@dataclass(frozen=True, kw_only=True)
class SqueezeOptions(SqueezerOptions, SqueezedInputOptions):
    """The input's keys, then the squeezer's (at least one of clip, bits, median)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.range, self.image)


class Squeeze(OptionsStage[SqueezeOptions]):
    name = "squeeze"
    Options = SqueezeOptions

    def __init__(self, options: SqueezeOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        self.squeezer = options.build(options.range, image_of(options, env))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "squeezer": self.squeezer.name}

    async def on_request(self, ctx: RequestContext) -> Verdict:
        name, x = float_input(ctx, self.options.input)
        ctx.request.inputs[name] = await squeeze_input(self.squeezer, name, x)
        return Verdict.CONTINUE


# --- shared with squeeze_detect ---------------------------------------------------


def image_of(options: SqueezedInputOptions, env: StageEnv) -> Image | None:
    """The ``image`` of a stage's options, checked against the model's input shape."""
    if options.image is None:
        return None
    image = options.image.image
    spec = watched_input(env, options.input)
    if spec is not None and all(d >= 0 for d in spec.shape[1:]):
        values = math.prod(spec.shape[1:])
        if values != image.size:
            raise OptionError(
                "image",
                f"holds {image.size} values ({image}), but input {spec.name} of model "
                f"{env.model} has {values} per sample",
            )
    return image


def float_input(ctx: RequestContext, name: str | None) -> tuple[str, np.ndarray]:
    """The watched input of the request, refused with 400 unless float."""
    name, x = request_input(ctx, name, several="expected exactly one input to squeeze")
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
