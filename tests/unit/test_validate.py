"""The validate stage on its own: casting rules and messages."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.errors import RequestError
from guard.inference import InferRequest
from guard.pipeline import RequestContext
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from guard.stages.validate import Validate, ValidateOptions


def stage(**options: Any) -> Validate:
    env = StageEnv(model="m", backend=None, local=None, metadata=None)
    return Validate.from_config(Section(options, source="p.yaml", path="validate"), env)


async def run(v: Validate, x: np.ndarray) -> np.ndarray:
    ctx = RequestContext(
        request_id="r",
        model="m",
        client=Client("c"),
        request=InferRequest(model_name="m", inputs={"x": x}),
    )
    await v.on_request(ctx)
    return ctx.request.inputs["x"]


@pytest.mark.parametrize(
    ("options", "x", "dtype"),
    [
        ({"dtype": "FP32"}, np.ones((2, 3), np.float64), np.float32),
        ({"dtype": "FP32"}, np.ones((2, 3), np.int64), np.float32),
        ({"dtype": "INT64"}, np.ones((2, 3), np.int32), np.int64),
        ({}, np.ones((2, 3), np.float16), np.float16),
        ({"shape": [-1, 3]}, np.ones((2, 5, 3), np.float32), np.float32),
    ],
)
async def test_accepted_and_cast(options: dict[str, Any], x: np.ndarray, dtype: type) -> None:
    out = await run(stage(**options), x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, x.astype(dtype))


@pytest.mark.parametrize(
    ("options", "x", "message"),
    [
        (
            {"dtype": "INT64"},
            np.ones((1, 2), np.float32),
            "inputs.x: datatype FP32 cannot be used as INT64",
        ),
        (
            {"dtype": "FP32"},
            np.ones((1, 2), np.bool_),
            "inputs.x: datatype BOOL cannot be used as FP32",
        ),
        (
            {},
            np.array([[b"a"]], dtype=object),
            "inputs.x: datatype BYTES is not accepted; expected numbers",
        ),
        (
            {"dtype": "INT32"},
            np.array([[1, 2**40]], np.int64),
            "inputs.x[0, 1]: value 1099511627776 does not fit the model's datatype INT32",
        ),
        (
            {"min": -1.0},
            np.array([[0.0, -2.0]], np.float32),
            "inputs.x[0, 1]: value -2.0 is below the minimum -1",
        ),
        ({}, np.array([[0.0], [np.inf]]), "inputs.x[1, 0]: value inf is infinite"),
        (
            {"shape": [3]},
            np.ones((1, 4), np.float32),
            "inputs.x: shape [1, 4] does not match ['batch', 3]",
        ),
        ({}, np.float32(1.0).reshape(()), "inputs.x: expected a batch; got a scalar"),
        (
            {"max_bytes": 1024},
            np.ones((2, 200), np.float32),
            "inputs: 1600 bytes of tensors exceed the limit of 1024",
        ),
    ],
)
async def test_refused_with_the_field(options: dict[str, Any], x: np.ndarray, message: str) -> None:
    with pytest.raises(RequestError) as info:
        await run(stage(**options), x)
    assert str(info.value) == message


async def test_nonfinite_allowed_when_asked() -> None:
    out = await run(stage(allow_nonfinite=True, max=1.0), np.array([[np.nan, np.inf, 0.5]]))
    assert np.isnan(out[0, 0]) and np.isinf(out[0, 1])


def test_bounds_in_the_wrong_order_are_refused_in_code_too() -> None:
    with pytest.raises(OptionError, match=r"^min must be <= max \(1\); got 5"):
        ValidateOptions(min=5, max=1)
