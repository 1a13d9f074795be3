from __future__ import annotations

import math
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from guard.errors import GuardError, RequestError, UpstreamError
from guard.inference import DATATYPES, InferRequest, InferResponse, RequestedOutput
from guard.protocols import v2

SHAPES = [(0,), (3,), (2, 3), (0, 4), (1, 2, 2), ()]


def random_array(
    rng: np.random.Generator, datatype: str, shape: tuple[int, ...], *, json_safe: bool
) -> np.ndarray:
    """Values spanning the datatype: integer extremes, every float bit pattern
    (finite only when the array must travel as JSON), non-UTF-8 bytes for binary."""
    dtype = DATATYPES[datatype]
    n = math.prod(shape)
    if datatype == "BYTES":
        if json_safe:
            values = [
                "".join(map(chr, rng.integers(0x20, 0xD7FF, rng.integers(0, 6)))).encode()
                for _ in range(n)
            ]
        else:
            values = [rng.bytes(int(rng.integers(0, 9))) for _ in range(n)]
        out = np.empty(n, dtype=object)
        out[:] = values
    elif datatype == "BOOL":
        out = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        out = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        out[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    else:
        bits = np.dtype(f"u{dtype.itemsize}")
        out = rng.integers(0, np.iinfo(bits).max, n, dtype=bits, endpoint=True).view(dtype)
        if json_safe:
            out[~np.isfinite(out)] = 0
    return out.reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype.kind == "O":
        assert actual.tolist() == expected.tolist()
    else:  # bitwise: distinguishes -0.0 and NaN payloads
        assert actual.tobytes() == expected.tobytes()


def header_length(headers: dict[str, str]) -> int | None:
    return v2.parse_header_length(headers.get(v2.HEADER_LENGTH))


def decode(doc: dict[str, Any], raw: bytes | None = None) -> InferRequest:
    head = orjson.dumps(doc)
    return v2.decode_request(
        head + (raw or b""),
        header_length=None if raw is None else len(head),
        model_name="m",
        model_version="1",
    )


def tensor(
    name: str = "x", shape: list[int] | None = None, datatype: str = "FP32", **extra: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "shape": [2] if shape is None else shape,
        "datatype": datatype,
    }
    if "data" not in extra and "parameters" not in extra:
        extra["data"] = [1, 2]
    return entry | extra


# -- decode_request: every malformed input is a 400 naming its field ---------------

# fmt: off
BAD_JSON = [
    ("not json", b"{", "request body: invalid JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', "request body: invalid JSON"),
    ("not an object", b"[1]", "request body: must be a JSON object; got [1]"),
    ("no inputs", b"{}", "inputs: must be a non-empty list"),
    ("empty inputs", {"inputs": []}, "inputs: must be a non-empty list"),
    ("unknown key", {"inputs": [tensor()], "input": 1}, "request: unknown key 'input'"),
    ("input not object", {"inputs": [3]}, "inputs[0]: must be an object; got 3"),
    ("unknown input key", {"inputs": [tensor(value=1)]}, "inputs[0]: unknown key 'value'"),
    ("no name", {"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]},
     "inputs[0].name: must be a non-empty string; got null"),
    ("duplicate", {"inputs": [tensor(), tensor()]}, "inputs[1].name: duplicate tensor name 'x'"),
    ("no datatype", {"inputs": [tensor(datatype=None)]},
     "inputs[0].datatype: must be a string; got null"),
    ("bad datatype", {"inputs": [tensor(datatype="FP8")]},
     "inputs[0].datatype: unsupported datatype 'FP8'"),
    ("bf16", {"inputs": [tensor(datatype="BF16")]},
     "inputs[0].datatype: unsupported datatype 'BF16'"),
    ("negative dim", {"inputs": [tensor(shape=[-1, 64])]},
     "inputs[0].shape: must be a list of non-negative integers; got [-1, 64]"),
    ("bool dim", {"inputs": [tensor(shape=[True])]},
     "inputs[0].shape: must be a list of non-negative integers; got [true]"),
    ("shape not list", {"inputs": [tensor(shape="2")]},
     'inputs[0].shape: must be a list of non-negative integers; got "2"'),
    ("too many dims", {"inputs": [tensor(shape=[1] * 33)]},
     "inputs[0].shape: at most 32 dimensions; got 33"),
    ("huge shape", {"inputs": [tensor(shape=[1 << 20, 1 << 20])]},
     "inputs[0].shape: [1048576, 1048576] exceeds the limit of 2147483648 elements"),
    ("short data", {"inputs": [tensor(shape=[2, 64], data=[0.5] * 127)]},
     "inputs[0].data: shape [2, 64] needs 128 values; got 127"),
    ("data not list", {"inputs": [tensor(data=1)]}, "inputs[0].data: must be a list; got 1"),
    ("string for FP32", {"inputs": [tensor(data=[1, "2"])]},
     'inputs[0].data[1]: expected numbers for FP32; got "2"'),
    ("null for FP32", {"inputs": [tensor(data=[None, 1])]},
     "inputs[0].data[0]: expected numbers for FP32; got null"),
    ("bool for FP32", {"inputs": [tensor(data=[True, 1])]},
     "inputs[0].data[0]: expected numbers for FP32; got true"),
    ("fraction for INT64", {"inputs": [tensor(datatype="INT64", data=[1, 1.5])]},
     "inputs[0].data[1]: expected integers for INT64; got 1.5"),
    ("inexact float for INT64", {"inputs": [tensor(datatype="INT64", data=[1, 1e17])]},
     "inputs[0].data[1]: expected integers for INT64; got 1e+17"),
    ("bool for INT32", {"inputs": [tensor(datatype="INT32", data=[1, False])]},
     "inputs[0].data[1]: expected integers for INT32; got false"),
    ("int for BOOL", {"inputs": [tensor(datatype="BOOL", data=[True, 1])]},
     "inputs[0].data[1]: expected true or false for BOOL; got 1"),
    ("INT8 overflow", {"inputs": [tensor(datatype="INT8", data=[1, 128])]},
     "inputs[0].data[1]: 128 is out of range for INT8 [-128, 127]"),
    ("negative UINT64", {"inputs": [tensor(datatype="UINT64", data=[-1, 0])]},
     "inputs[0].data[0]: -1 is out of range for UINT64"),
    ("UINT64 past max",
     b'{"inputs":[{"name":"x","shape":[1],"datatype":"UINT64","data":[18446744073709551616]}]}',
     "inputs[0].data[0]: expected integers for UINT64"),
    ("FP32 overflow", {"inputs": [tensor(data=[1, 1e39])]},
     "inputs[0].data[1]: 1e+39 is out of range for FP32"),
    ("FP16 overflow", {"inputs": [tensor(datatype="FP16", data=[70000, 1])]},
     "inputs[0].data[0]: 70000 is out of range for FP16"),
    ("number for BYTES", {"inputs": [tensor(datatype="BYTES", data=["a", 2])]},
     "inputs[0].data[1]: expected strings for BYTES; got 2"),
    ("nested element", {"inputs": [tensor(shape=[2, 2], data=[[1, 2], [3, "x"]])]},
     'inputs[0].data element 3: expected numbers for FP32; got "x"'),
    ("mixed nesting", {"inputs": [tensor(shape=[2, 2], data=[[1, 2], 3, 4])]},
     "inputs[0].data: mixes nested lists and values"),
    ("too deep", {"inputs": [tensor(data=[[1], [2]])]},
     "inputs[0].data: nested deeper than the shape's 1 dimensions"),
    ("very deep", {"inputs": [tensor(shape=[1], data=[[[[[[[[[[[[1]]]]]]]]]]]])]},
     "inputs[0].data: nested deeper than the shape's 1 dimensions"),
    ("beyond parser depth", b'{"inputs": [{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}]}",
     "request body: invalid JSON"),
    ("no data", {"inputs": [tensor(parameters={})]},
     "inputs[0]: needs data or parameters.binary_data_size"),
    ("shared memory", {"inputs": [tensor(parameters={"shared_memory_region": "r"})]},
     "inputs[0].parameters.shared_memory_region: shared memory is not supported"),
    ("parameters not object", {"inputs": [tensor(parameters=[1])]},
     "inputs[0].parameters: must be an object; got [1]"),
    ("data and binary", {"inputs": [tensor(data=[1, 2], parameters={"binary_data_size": 8})]},
     "inputs[0]: has both data and parameters.binary_data_size"),
    ("binary without header", {"inputs": [tensor(parameters={"binary_data_size": 8})]},
     "inputs[0].parameters.binary_data_size: binary data needs the "
     "Inference-Header-Content-Length header"),
    ("bad id", {"id": 7, "inputs": [tensor()]}, "id: must be a string; got 7"),
    ("request parameters", {"parameters": "x", "inputs": [tensor()]},
     'parameters: must be an object; got "x"'),
    ("binary_data_output", {"parameters": {"binary_data_output": 1}, "inputs": [tensor()]},
     "parameters.binary_data_output: must be true or false; got 1"),
    ("outputs not list", {"inputs": [tensor()], "outputs": {}},
     "outputs: must be a list; got {}"),
    ("output not object", {"inputs": [tensor()], "outputs": ["y"]},
     'outputs[0]: must be an object; got "y"'),
    ("output unknown key", {"inputs": [tensor()], "outputs": [{"name": "y", "shape": [1]}]},
     "outputs[0]: unknown key 'shape'"),
    ("output name", {"inputs": [tensor()], "outputs": [{"name": ""}]},
     'outputs[0].name: must be a non-empty string; got ""'),
    ("output duplicate", {"inputs": [tensor()], "outputs": [{"name": "y"}, {"name": "y"}]},
     "outputs[1].name: duplicate output name 'y'"),
    ("binary_data",
     {"inputs": [tensor()], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
     'outputs[0].parameters.binary_data: must be true or false; got "yes"'),
]

SIZE = "inputs[0].parameters.binary_data_size"
BAD_BINARY = [
    ("negative size", tensor(parameters={"binary_data_size": -8}), b"",
     f"{SIZE}: must be a non-negative integer; got -8"),
    ("size vs shape", tensor(parameters={"binary_data_size": 6}), b"\0" * 6,
     f"{SIZE}: shape [2] of FP32 needs 8 bytes; got 6"),
    ("past the body", tensor(parameters={"binary_data_size": 8}), b"\0" * 4,
     f"{SIZE}: 8 bytes exceed the 4 bytes left in the body"),
    ("left over", tensor(parameters={"binary_data_size": 8}), b"\0" * 12,
     "inputs: 4 bytes after the JSON are claimed by no tensor's binary_data_size"),
    ("bytes after JSON", tensor(), b"\0", "inputs: 1 bytes after the JSON"),
    ("BOOL byte 2", tensor(datatype="BOOL", parameters={"binary_data_size": 2}), b"\1\2",
     f"{SIZE}: BOOL bytes must be 0 or 1"),
    ("BYTES overrun", tensor(datatype="BYTES", parameters={"binary_data_size": 9}),
     b"\1\0\0\0a\x09\0\0\0", f"{SIZE}: BYTES element 1 of 9 bytes overruns the 9 bytes"),
    ("BYTES left over", tensor(datatype="BYTES", parameters={"binary_data_size": 11}),
     b"\1\0\0\0a\1\0\0\0bc", f"{SIZE}: 1 bytes left after 2 BYTES elements"),
    ("BYTES short", tensor(datatype="BYTES", parameters={"binary_data_size": 5}), b"\1\0\0\0a",
     f"{SIZE}: 2 BYTES elements need at least 8 bytes; got 5"),
    ("BYTES cut length", tensor(datatype="BYTES", parameters={"binary_data_size": 9}),
     b"\4\0\0\0abcd\0", f"{SIZE}: BYTES element 1 starts past the end of its 9 bytes"),
]
# fmt: on


def raises_request_error(call: Any, message: str) -> None:
    with pytest.raises(RequestError) as info:
        call()
    assert info.value.status == 400
    assert message in info.value.message


@pytest.mark.parametrize(
    ("doc", "message"), [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON]
)
def test_malformed_request_is_400_naming_the_field(doc: Any, message: str) -> None:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    raises_request_error(
        lambda: v2.decode_request(body, header_length=None, model_name="m", model_version=None),
        message,
    )


@pytest.mark.parametrize(
    ("entry", "raw", "message"), [c[1:] for c in BAD_BINARY], ids=[c[0] for c in BAD_BINARY]
)
def test_malformed_binary_request_is_400_naming_the_field(
    entry: dict[str, Any], raw: bytes, message: str
) -> None:
    raises_request_error(lambda: decode({"inputs": [entry]}, raw), message)


@pytest.mark.parametrize("length", [-1, 100])
def test_header_length_outside_the_body(length: int) -> None:
    with pytest.raises(
        RequestError, match=r"Inference-Header-Content-Length: .* is outside the body's 2 bytes"
    ):
        v2.decode_request(b"{}", header_length=length, model_name="m", model_version=None)


@pytest.mark.parametrize("value", ["", "x", "-1", "1.5", "١٢"])
def test_parse_header_length_refuses_non_integers(value: str) -> None:
    with pytest.raises(
        RequestError, match="Inference-Header-Content-Length: must be a non-negative integer"
    ):
        v2.parse_header_length(value)


def test_parse_header_length() -> None:
    assert v2.parse_header_length(None) is None
    assert v2.parse_header_length(" 42 ") == 42


@pytest.mark.parametrize(
    ("datatype", "raw"),
    [("FP32", None), ("FP32", b"\0" * 8), ("BYTES", b"\0" * 8)],
    ids=["json", "binary", "binary-bytes"],
)
def test_lying_shape_allocates_nothing(datatype: str, raw: bytes | None) -> None:
    parameters = {"data": [1, 2]} if raw is None else {"parameters": {"binary_data_size": len(raw)}}
    doc = {"inputs": [tensor(shape=[1 << 31], datatype=datatype, **parameters)]}
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match=r"inputs\[0\]"):
            decode(doc, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- decode_request: accepted forms -------------------------------------------------


def test_request_fields_are_kept_and_wire_details_dropped() -> None:
    request = decode(
        {
            "id": "r1",
            "model_name": "ignored",
            "parameters": {"binary_data_output": True, "priority": 2},
            "inputs": [
                tensor(parameters={"binary_data_size": 8}, shape=[2]),
                tensor("t", [2, 2], "INT32", data=[[1, 2], [3, 4]]),
            ],
            "outputs": [
                {"name": "a", "parameters": {"binary_data": False, "classification": 2}},
                {"name": "b"},
            ],
        },
        np.array([1.5, -2], dtype="<f4").tobytes(),
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "r1")
    assert request.parameters == {"priority": 2}
    assert request.binary_outputs is True
    assert request.outputs == [
        RequestedOutput("a", False, {"classification": 2}),
        RequestedOutput("b", None, {}),
    ]
    assert list(request.inputs) == ["x", "t"]
    assert_same(request.inputs["x"], np.array([1.5, -2], dtype=np.float32))
    assert_same(request.inputs["t"], np.array([[1, 2], [3, 4]], dtype=np.int32))
    assert request.inputs["x"].flags.writeable
    assert request.inputs["x"].flags.aligned


def test_nested_data_need_only_match_the_element_count() -> None:
    request = decode(
        {
            "inputs": [
                tensor(shape=[2, 2], data=[[1], [2, 3, 4]]),
                tensor("b", [2], "BOOL", data=[True, False]),
            ]
        }
    )
    assert_same(request.inputs["x"], np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert_same(request.inputs["b"], np.array([True, False]))


def test_integral_floats_are_accepted_for_integer_types() -> None:
    request = decode({"inputs": [tensor(datatype="UINT8", data=[255.0, 0])]})
    assert_same(request.inputs["x"], np.array([255, 0], dtype=np.uint8))


# -- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_request_round_trip(datatype: str, as_binary: bool) -> None:
    rng = np.random.default_rng([list(DATATYPES).index(datatype), as_binary])
    inputs = {
        f"t{i}": random_array(rng, datatype, shape, json_safe=not as_binary)
        for i, shape in enumerate(SHAPES)
    }
    request = InferRequest(
        model_name="m",
        inputs=inputs,
        id="abc",
        parameters={"k": [1, "v"]},
        outputs=[RequestedOutput("y", None, {"top_k": 3})],
    )
    body, headers = v2.encode_request(request, binary=as_binary)
    assert headers["Content-Type"] == (
        "application/octet-stream" if as_binary else "application/json"
    )
    back = v2.decode_request(
        body, header_length=header_length(headers), model_name="m", model_version=None
    )
    for name, array in inputs.items():
        assert_same(back.inputs[name], array)
    assert (back.id, back.parameters, back.binary_outputs) == ("abc", {"k": [1, "v"]}, as_binary)
    assert back.outputs == [RequestedOutput("y", True if as_binary else None, {"top_k": 3})]


@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_response_round_trip(datatype: str, as_binary: bool) -> None:
    rng = np.random.default_rng([list(DATATYPES).index(datatype), as_binary, 1])
    outputs = {
        f"t{i}": random_array(rng, datatype, shape, json_safe=not as_binary)
        for i, shape in enumerate(SHAPES)
    }
    response = InferResponse(
        model_name="m", model_version="3", outputs=outputs, parameters={"content_type": "np"}
    )
    request = InferRequest(model_name="m", inputs={}, id="q", binary_outputs=as_binary)
    body, headers = v2.encode_response(response, request=request)
    back = v2.decode_response(body, header_length=header_length(headers))
    assert (back.model_name, back.model_version, back.id, back.parameters) == (
        "m",
        "3",
        "q",
        {"content_type": "np"},
    )
    assert list(back.outputs) == list(outputs)
    for name, array in outputs.items():
        assert_same(back.outputs[name], array)


def test_every_fp16_value_survives_json() -> None:
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    values = values[np.isfinite(values)]
    request = InferRequest(model_name="m", inputs={"h": values})
    body, _ = v2.encode_request(request, binary=False)
    assert_same(
        v2.decode_request(body, header_length=None, model_name="m", model_version=None).inputs["h"],
        values,
    )


def test_random_fp32_bit_patterns_survive_json_exactly() -> None:
    bits = np.random.default_rng(7).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)[np.isfinite(bits.view(np.float32))]
    response = InferResponse(model_name="m", outputs={"y": values})
    body, headers = v2.encode_response(response, request=InferRequest(model_name="m", inputs={}))
    assert_same(v2.decode_response(body, header_length=header_length(headers)).outputs["y"], values)


def test_float32_that_its_shortest_digits_would_not_round_trip() -> None:
    """ "7.038531e-26", the shortest float32 digits of 0x15ae43fd, reads back through a
    double as 0x15ae43fe: JSON carries the float32's exact double value instead."""
    values = np.array([0x15AE43FD, 0x95AE43FD], dtype=np.uint32).view(np.float32)
    response = InferResponse(model_name="m", outputs={"y": values})
    body, _ = v2.encode_response(response, request=InferRequest(model_name="m", inputs={}))
    assert orjson.loads(body)["outputs"][0]["data"] == values.astype(np.float64).tolist()
    assert_same(v2.decode_response(body, header_length=None).outputs["y"], values)
    assert_same(triton.InferResult.from_response_body(body).as_numpy("y"), values)


def test_non_finite_floats_become_null_and_read_back_as_nan() -> None:
    response = InferResponse(
        model_name="m", outputs={"y": np.array([np.nan, np.inf, 1], dtype=np.float32)}
    )
    body, headers = v2.encode_response(response, request=InferRequest(model_name="m", inputs={}))
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.0]
    back = v2.decode_response(body, header_length=header_length(headers)).outputs["y"]
    assert np.isnan(back[:2]).all()
    assert back[2] == 1


# -- encode_response: output selection and binary choice ----------------------------------


def test_response_returns_the_requested_outputs_in_order_each_as_asked() -> None:
    outputs = {
        "a": np.arange(3, dtype=np.int64),
        "b": np.ones((2, 2), np.float32),
        "c": np.zeros(1, bool),
    }
    request = InferRequest(
        model_name="m",
        inputs={},
        binary_outputs=True,
        outputs=[RequestedOutput("c", None), RequestedOutput("a", False)],
    )
    body, headers = v2.encode_response(
        InferResponse(model_name="m", outputs=outputs), request=request
    )
    head = orjson.loads(body[: header_length(headers)])
    assert [o["name"] for o in head["outputs"]] == ["c", "a"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 1}
    assert head["outputs"][1]["data"] == [0, 1, 2]
    assert body[header_length(headers) :] == b"\0"


def test_unknown_requested_output_is_named() -> None:
    request = InferRequest(model_name="m", inputs={}, outputs=[RequestedOutput("nope")])
    with pytest.raises(RequestError, match="outputs: unknown output 'nope'; the model returns y"):
        v2.encode_response(
            InferResponse(model_name="m", outputs={"y": np.zeros(1)}), request=request
        )


def test_non_utf8_bytes_cannot_be_json() -> None:
    output = np.array([b"\xff"], dtype=object)
    with pytest.raises(RequestError, match="tensor 's' holds bytes that are not UTF-8"):
        v2.encode_response(
            InferResponse(model_name="m", outputs={"s": output}), request=InferRequest("m", {})
        )


def test_error_body() -> None:
    assert orjson.loads(v2.error_body('bad "x" ✓')) == {"error": 'bad "x" ✓'}


# -- decode_response: upstream bodies ------------------------------------------------------


def test_triton_binary_response_from_the_extension_docs() -> None:
    head = orjson.dumps(
        {
            "outputs": [
                {
                    "name": "output0",
                    "shape": [3, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 24},
                }
            ]
        }
    )
    values = np.arange(6, dtype="<f4")
    response = v2.decode_response(head + values.tobytes(), header_length=len(head))
    assert response.model_name == ""
    assert response.id is None
    assert_same(response.outputs["output0"], values.reshape(3, 2).astype(np.float32))


def test_mlserver_json_response() -> None:
    body = orjson.dumps(
        {
            "model_name": "iris",
            "model_version": "v1",
            "id": "9b2d",
            "parameters": {"content_type": "np", "headers": {"x": "1"}},
            "outputs": [
                {
                    "name": "predict",
                    "shape": [2, 1],
                    "datatype": "INT64",
                    "parameters": {"content_type": "np"},
                    "data": [0, 2],
                },
                {
                    "name": "label",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"content_type": "str"},
                    "data": ["a", "é"],
                },
            ],
        }
    )
    response = v2.decode_response(body, header_length=None)
    assert (response.model_name, response.model_version, response.id) == ("iris", "v1", "9b2d")
    assert response.parameters == {"content_type": "np", "headers": {"x": "1"}}
    assert_same(response.outputs["predict"], np.array([[0], [2]], dtype=np.int64))
    assert response.outputs["label"].tolist() == [b"a", "é".encode()]


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"<html>", None, "upstream response: response body: invalid JSON"),
        (b"{}", None, "upstream response: outputs: must be a list"),
        (
            b'{"outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
            None,
            'upstream response: outputs[0].data[0]: expected numbers for FP32; got "a"',
        ),
        (
            b'{"outputs": [{"name": "y", "shape": [2], "datatype": "FP32",'
            b' "parameters": {"binary_data_size": 8}}]}',
            None,
            "upstream response: outputs[0].parameters.binary_data_size: binary data needs the",
        ),
        (
            b'{"model_name": 1, "outputs": []}',
            None,
            "upstream response: model_name: must be a string",
        ),
        (b'{"outputs": []}xyz', 15, "upstream response: outputs: 3 bytes after the JSON"),
    ],
)
def test_malformed_upstream_response_is_502(body: bytes, length: int | None, message: str) -> None:
    with pytest.raises(UpstreamError) as info:
        v2.decode_response(body, header_length=length)
    assert info.value.status == 502
    assert message in info.value.message


# -- tritonclient interoperability -------------------------------------------------------


def triton_arrays(seed: int, *, binary: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        datatype: random_array(rng, datatype, (2, 3), json_safe=not binary)
        for datatype in DATATYPES
    }


@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
def test_decodes_tritonclient_requests(as_binary: bool) -> None:
    arrays = triton_arrays(1, binary=as_binary)
    inputs = []
    for datatype, array in arrays.items():
        inputs.append(triton.InferInput(datatype, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array, binary_data=as_binary)
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs,
        outputs=[triton.InferRequestedOutput("y", binary_data=as_binary)],
        request_id="7",
        parameters={"p": 1},
    )
    assert (json_size is not None) == as_binary
    request = v2.decode_request(body, header_length=json_size, model_name="m", model_version=None)
    for datatype, array in arrays.items():
        assert_same(request.inputs[datatype], array)
    assert (request.id, request.parameters, request.binary_outputs) == ("7", {"p": 1}, False)
    assert request.outputs == [RequestedOutput("y", as_binary, {})]


def test_tritonclient_without_named_outputs_asks_for_binary_outputs() -> None:
    x = triton.InferInput("x", [1], "FP32").set_data_from_numpy(np.ones(1, np.float32))
    body, json_size = triton.InferenceServerClient.generate_request_body([x])
    request = v2.decode_request(body, header_length=json_size, model_name="m", model_version=None)
    assert request.binary_outputs is True
    assert request.parameters == {}
    assert request.outputs == []


@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_our_responses(as_binary: bool) -> None:
    arrays = triton_arrays(2, binary=as_binary)
    names = list(arrays)
    request = InferRequest(
        model_name="m",
        inputs={},
        id="r",
        # every output as asked, one of them against the request-wide wish
        outputs=[RequestedOutput(names[0], not as_binary)]
        + [RequestedOutput(n, None) for n in names[1:]],
        binary_outputs=as_binary,
    )
    body, headers = v2.encode_response(
        InferResponse(model_name="m", outputs=arrays), request=request
    )
    result = triton.InferResult.from_response_body(body, header_length=header_length(headers))
    assert result.get_response()["id"] == "r"
    for name, array in arrays.items():
        got = result.as_numpy(name)
        if name == "BYTES":  # tritonclient returns str for JSON strings, bytes for binary
            assert [
                x if isinstance(x, bytes) else x.encode() for x in got.reshape(-1)
            ] == array.reshape(-1).tolist()
            assert got.shape == array.shape
        else:
            assert_same(got, array)


def test_tritonclient_reads_encoded_requests_as_its_own() -> None:
    """encode_request writes what tritonclient itself would send for the same tensors."""
    arrays = triton_arrays(3, binary=True)
    ours, headers = v2.encode_request(
        InferRequest(model_name="m", inputs=arrays, id="z"), binary=True
    )
    inputs = []
    for datatype, array in arrays.items():
        inputs.append(
            triton.InferInput(datatype, list(array.shape), datatype).set_data_from_numpy(array)
        )
    theirs, json_size = triton.InferenceServerClient.generate_request_body(inputs, request_id="z")
    assert ours[header_length(headers) :] == theirs[json_size:]
    assert orjson.loads(ours[: header_length(headers)]) == orjson.loads(theirs[:json_size])


def test_encode_request_json_for_servers_without_the_extension() -> None:
    request = InferRequest(
        model_name="m",
        inputs={"x": np.ones((1, 2), np.float32)},
        parameters={"binary_data_output": True},
    )
    body, headers = v2.encode_request(request, binary=False)
    assert headers == {"Content-Type": "application/json"}
    assert orjson.loads(body) == {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]
    }


def test_unrepresentable_output_element_is_a_server_error() -> None:
    output = np.array([3], dtype=object)
    with pytest.raises(GuardError) as info:
        v2.encode_response(
            InferResponse(model_name="m", outputs={"s": output}), request=InferRequest("m", {})
        )
    assert info.value.status == 500


# -- fuzzing: malformed input raises only the codec's own error ----------------------------

ODD_VALUES = [None, True, -1, 0, 1 << 63, 1.5, 1e308, "", "FP32", [], [None], [[1]], {}, {"a": 1}]


def json_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path]
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        paths += json_paths(child, (*path, key))
    return paths


def mutated(doc: Any, rng: np.random.Generator) -> Any:
    """``doc`` with one node replaced by an odd value, or removed."""
    copy = orjson.loads(orjson.dumps(doc))
    paths = json_paths(copy)
    path = paths[int(rng.integers(len(paths)))]
    value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    if not path:
        return value
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def fuzz_request() -> InferRequest:
    rng = np.random.default_rng(5)
    inputs = {dt: random_array(rng, dt, (2, 2), json_safe=True) for dt in ("FP32", "INT8", "BYTES")}
    return InferRequest(
        model_name="m",
        inputs=inputs | {"b": np.array([True, False])},
        id="f",
        parameters={"p": 1},
        outputs=[RequestedOutput("y", True, {"top_k": 1})],
    )


def outcomes(calls: Iterable[Callable[[], object]], error: type[GuardError]) -> Counter[str]:
    """How many calls succeeded and how many raised ``error`` (with a message); any other
    exception propagates and fails the test."""
    counts: Counter[str] = Counter()
    for call in calls:
        try:
            call()
        except error as exc:
            counts["rejected" if exc.message else "rejected without a message"] += 1
        else:
            counts["accepted"] += 1
    return counts


@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
def test_fuzzed_request_documents_raise_only_request_error(as_binary: bool) -> None:
    body, headers = v2.encode_request(fuzz_request(), binary=as_binary)
    length = header_length(headers) or len(body)
    doc, tail = orjson.loads(body[:length]), body[length:]
    rng = np.random.default_rng(17)

    def call(head: bytes) -> Callable[[], object]:
        return lambda: v2.decode_request(
            head + tail,
            header_length=len(head) if as_binary else None,
            model_name="m",
            model_version=None,
        )

    counts = outcomes((call(orjson.dumps(mutated(doc, rng))) for _ in range(1500)), RequestError)
    assert counts["rejected"] > 500
    assert counts["accepted"] > 50
    assert set(counts) == {"accepted", "rejected"}


def test_fuzzed_request_bytes_raise_only_request_error() -> None:
    body, headers = v2.encode_request(fuzz_request(), binary=True)
    length = header_length(headers)
    assert length is not None
    rng = np.random.default_rng(23)

    def call() -> Callable[[], object]:
        noisy = bytearray(body)
        for i in rng.integers(0, len(body), int(rng.integers(1, 4))):
            noisy[i] = int(rng.integers(0, 256))
        cut = len(body) if rng.random() < 0.6 else int(rng.integers(length - 2, len(body)))
        claimed = length if rng.random() < 0.6 else length + int(rng.integers(-3, 4))
        return lambda: v2.decode_request(
            bytes(noisy[:cut]), header_length=claimed, model_name="m", model_version=None
        )

    counts = outcomes((call() for _ in range(1500)), RequestError)
    assert counts["rejected"] > 500
    assert counts["accepted"] > 10
    assert set(counts) == {"accepted", "rejected"}


def test_fuzzed_responses_raise_only_upstream_error() -> None:
    request = fuzz_request()
    response = InferResponse(model_name="m", outputs=request.inputs, parameters={"a": 1})
    body, _ = v2.encode_response(response, request=InferRequest("m", {}))
    doc = orjson.loads(body)
    rng = np.random.default_rng(29)
    bodies = (orjson.dumps(mutated(doc, rng)) for _ in range(1500))
    counts = outcomes(
        ((lambda b=b: v2.decode_response(b, header_length=None)) for b in bodies), UpstreamError
    )
    assert counts["rejected"] > 500
    assert counts["accepted"] > 50
    assert set(counts) == {"accepted", "rejected"}


def test_nan_and_infinity_literals_from_python_json_clients_decode() -> None:
    """Python's json (and tritonclient's JSON mode) writes NaN/Infinity; the validate stage judges them."""
    import json

    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [3],
                    "datatype": "FP32",
                    "data": [float("nan"), float("inf"), -float("inf")],
                }
            ]
        }
    ).encode()
    assert b"NaN" in body and b"Infinity" in body
    x = v2.decode_request(body, header_length=None, model_name="m", model_version=None).inputs["x"]
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf
    overflow = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e39]}]}'
    with pytest.raises(
        RequestError, match=r"inputs\[0\].data\[0\]: 1e\+39 is out of range for FP32"
    ):
        v2.decode_request(overflow, header_length=None, model_name="m", model_version=None)
