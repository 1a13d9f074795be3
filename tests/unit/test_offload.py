"""Large bodies decoded in a worker process: the same requests, the same errors,
and a worker that dies is replaced."""

from __future__ import annotations

import os
import signal

import numpy as np
import orjson
import pytest

from guard.errors import Overloaded, RequestError
from guard.offload import Decoder
from guard.protocols import v2


def body(rows: int) -> bytes:
    x = np.random.default_rng(0).uniform(0, 16, (rows, 64)).astype(np.float32)
    tensor = {"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"id": "r1", "inputs": [tensor]})


KW = {"header_length": None, "model_name": "digits", "model_version": None}


async def test_a_large_body_decodes_in_the_worker_exactly_as_on_the_loop() -> None:
    decoder = Decoder(threshold=1000)
    try:
        data = body(100)
        assert decoder.offloads(len(data)) and not decoder.offloads(999)
        remote = await decoder(v2.decode_request, data, **KW)
        local = v2.decode_request(data, **KW)
        assert remote.id == local.id == "r1"
        np.testing.assert_array_equal(remote.inputs["input"], local.inputs["input"])
        assert decoder._pool is not None
    finally:
        decoder.close()


async def test_errors_raised_in_the_worker_keep_their_status_and_message() -> None:
    decoder = Decoder(threshold=10)
    try:
        with pytest.raises(RequestError) as caught:
            await decoder(v2.decode_request, b'{"inputs": "nope", "padding": "xxxxxxxx"}', **KW)
        assert caught.value.status == 400 and "inputs" in caught.value.message
    finally:
        decoder.close()


async def test_a_dead_worker_fails_its_request_with_503_and_is_replaced() -> None:
    decoder = Decoder(threshold=10)
    try:
        await decoder(v2.decode_request, body(2), **KW)
        assert decoder._pool is not None
        for pid in list(decoder._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(Overloaded):
            await decoder(v2.decode_request, body(2), **KW)
        again = await decoder(v2.decode_request, body(2), **KW)
        assert again.inputs["input"].shape == (2, 64)
    finally:
        decoder.close()


async def test_a_threshold_of_zero_never_offloads() -> None:
    decoder = Decoder(threshold=0)
    request = await decoder(v2.decode_request, body(3), **KW)
    assert request.inputs["input"].shape == (3, 64) and decoder._pool is None
