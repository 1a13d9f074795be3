from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from guard.errors import GuardError, RequestError
from guard.inference import InferRequest, InferResponse, TensorSpec
from guard.protocols.tfserving import PredictFormat, decode_predict, encode_predict

IMAGE = [TensorSpec("x", "FP32", (-1, 4))]
MULTI = [
    TensorSpec("ids", "INT64", (-1, 3)),
    TensorSpec("mask", "BOOL", (-1, 3)),
    TensorSpec("text", "BYTES", (-1,)),
]


def predict(doc: Any, specs: Sequence[TensorSpec] = IMAGE) -> tuple[InferRequest, PredictFormat]:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return decode_predict(body, model_name="m", model_version="2", inputs=specs)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tolist() == expected.tolist()


ROWS = [[1, 2, 3, 4], [5.5, 6, 7, 8]]
EXPECTED = np.array(ROWS, dtype=np.float32)


@pytest.mark.parametrize(
    ("doc", "fmt"),
    [
        ({"instances": ROWS}, PredictFormat.ROW),
        (
            {"signature_name": "serving_default", "instances": [{"x": r} for r in ROWS]},
            PredictFormat.ROW,
        ),
        ({"inputs": ROWS}, PredictFormat.COLUMNAR),
        ({"inputs": {"x": ROWS}}, PredictFormat.COLUMNAR),
    ],
    ids=["row", "row-named", "columnar", "columnar-named"],
)
def test_single_input_forms(doc: dict[str, Any], fmt: PredictFormat) -> None:
    request, got = predict(doc)
    assert got is fmt
    assert (request.model_name, request.model_version, request.batch_size) == ("m", "2", 2)
    assert_same(request.inputs["x"], EXPECTED)


def test_multi_input_rows_stack_batch_first() -> None:
    instances = [
        {"ids": [1, 2, 3], "mask": [True, True, False], "text": "héllo"},
        {
            "text": {"b64": base64.b64encode(b"\xff\x00").decode()},
            "mask": [False] * 3,
            "ids": [4, 5, 6],
        },
    ]
    request, fmt = predict({"instances": instances}, MULTI)
    assert fmt is PredictFormat.ROW
    assert list(request.inputs) == ["ids", "mask", "text"]
    assert_same(request.inputs["ids"], np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64))
    assert_same(request.inputs["mask"], np.array([[True, True, False], [False] * 3]))
    assert request.inputs["text"].tolist() == ["héllo".encode(), b"\xff\x00"]


def test_multi_input_columns() -> None:
    doc = {"inputs": {"text": ["a"], "ids": [[1, 2, 3]], "mask": [[True, False, True]]}}
    request, fmt = predict(doc, MULTI)
    assert fmt is PredictFormat.COLUMNAR
    assert_same(request.inputs["ids"], np.array([[1, 2, 3]], dtype=np.int64))
    assert request.inputs["text"].tolist() == [b"a"]


def test_scalar_instances_and_a_b64_value_for_a_single_bytes_input() -> None:
    request, _ = predict({"instances": [3, 4.5]}, [TensorSpec("v", "FP64", (-1,))])
    assert_same(request.inputs["v"], np.array([3, 4.5]))
    request, _ = predict({"instances": [{"b64": "AAE="}, "z"]}, [TensorSpec("s", "BYTES", (-1,))])
    assert request.inputs["s"].tolist() == [b"\x00\x01", b"z"]


BAD = [
    ("not json", b"{", IMAGE, "request body: invalid JSON"),
    ("not object", b"[]", IMAGE, "request body: must be a JSON object"),
    ("unknown key", {"instances": ROWS, "foo": 1}, IMAGE, "request: unknown key 'foo'"),
    ("neither", {}, IMAGE, "needs exactly one of 'instances' (row format) or 'inputs'"),
    ("both", {"instances": ROWS, "inputs": ROWS}, IMAGE, "needs exactly one of"),
    (
        "signature",
        {"signature_name": "classify", "instances": ROWS},
        IMAGE,
        "signature_name: only 'serving_default' is served; got \"classify\"",
    ),
    ("empty", {"instances": []}, IMAGE, "instances: must be a non-empty list"),
    (
        "short instance",
        {"instances": [[0.0] * 64] * 3 + [[0.0] * 63]},
        [TensorSpec("x", "FP32", (-1, 64))],
        "instances[3]: expected 64 values; got 63",
    ),
    (
        "ragged free dim",
        {"instances": [[1, 2], [1]]},
        [TensorSpec("x", "FP32", (-1, -1))],
        "instances[1]: expected 2 values; got 1",
    ),
    (
        "not a list",
        {"instances": [ROWS[0], 7]},
        IMAGE,
        "instances[1]: expected a list of 4 values; got 7",
    ),
    (
        "too deep",
        {"instances": [[1, 2, 3, [4]], ROWS[1]]},
        IMAGE,
        "instances[0][3]: expected a value; got a list",
    ),
    (
        "string",
        {"instances": [[1, 2, 3, "4"], ROWS[1]]},
        IMAGE,
        'instances[0][3]: expected numbers for FP32; got "4"',
    ),
    (
        "fixed batch",
        {"instances": ROWS},
        [TensorSpec("x", "FP32", (1, 4))],
        "instances: expected 1 values; got 2",
    ),
    (
        "multi not named",
        {"instances": [[1, 2, 3]]},
        MULTI,
        "instances[0]: must be an object naming the inputs ids, mask, text",
    ),
    (
        "multi missing",
        {"instances": [{"ids": [1, 2, 3], "mask": [True] * 3}]},
        MULTI,
        "instances[0]: missing input 'text'",
    ),
    (
        "multi unknown",
        {"instances": [{"ids": [1, 2, 3], "mask": [True] * 3, "text": "a", "z": 1}]},
        MULTI,
        "instances[0]: unknown input 'z'; the model's inputs are ids, mask, text",
    ),
    (
        "multi value",
        {"instances": [{"ids": [1, 2, 3.5], "mask": [True] * 3, "text": "a"}]},
        MULTI,
        "instances[0].ids[2]: expected integers for INT64; got 3.5",
    ),
    (
        "multi shape",
        {"instances": [{"ids": [1, 2], "mask": [True] * 3, "text": "a"}]},
        MULTI,
        "instances[0].ids: expected 3 values; got 2",
    ),
    (
        "bad b64",
        {"instances": [{"ids": [1, 2, 3], "mask": [True] * 3, "text": {"b64": "!!"}}]},
        MULTI,
        "instances[0].text.b64: invalid base64",
    ),
    (
        "b64 for numbers",
        {"instances": [{"b64": "AAE="}]},
        [TensorSpec("v", "FP32", (-1,))],
        'instances[0]: expected numbers for FP32; got {"b64": "AAE="}',
    ),
    (
        "not b64 object",
        {"instances": [{"b64": "AA==", "x": 1}]},
        [TensorSpec("s", "BYTES", (-1,))],
        "instances[0]: missing input 's'",
    ),
    (
        "columnar not named",
        {"inputs": [[1, 2, 3]]},
        MULTI,
        "inputs: must be an object naming the inputs",
    ),
    (
        "columnar value",
        {"inputs": {"ids": [[1, 2, 3]], "mask": [[1, 0, 1]], "text": ["a"]}},
        MULTI,
        "inputs.mask[0][0]: expected true or false for BOOL; got 1",
    ),
    (
        "columnar shape",
        {"inputs": {"x": [[1, 2, 3]]}},
        IMAGE,
        "inputs.x[0]: expected 4 values; got 3",
    ),
    ("columnar unknown", {"inputs": {"y": ROWS}}, IMAGE, "inputs: missing input 'x'"),
]


@pytest.mark.parametrize(("doc", "specs", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed_predict_is_400_naming_the_value(
    doc: Any, specs: Sequence[TensorSpec], message: str
) -> None:
    with pytest.raises(RequestError) as info:
        predict(doc, specs)
    assert info.value.status == 400
    assert message in info.value.message


def test_model_without_inputs_is_refused() -> None:
    with pytest.raises(RequestError, match="model 'm' declares no inputs"):
        predict({"instances": ROWS}, [])


# -- responses ------------------------------------------------------------------------

PROBS = np.array([[0.25, 0.75], [0.125, 0.875]], dtype=np.float32)
LABELS = np.array([1, 1], dtype=np.int64)


@pytest.mark.parametrize(
    ("outputs", "fmt", "expected"),
    [
        ({"probs": PROBS}, PredictFormat.ROW, {"predictions": [[0.25, 0.75], [0.125, 0.875]]}),
        (
            {"probs": PROBS, "label": LABELS},
            PredictFormat.ROW,
            {
                "predictions": [
                    {"probs": [0.25, 0.75], "label": 1},
                    {"probs": [0.125, 0.875], "label": 1},
                ]
            },
        ),
        ({"probs": PROBS}, PredictFormat.COLUMNAR, {"outputs": [[0.25, 0.75], [0.125, 0.875]]}),
        (
            {"probs": PROBS, "label": LABELS},
            PredictFormat.COLUMNAR,
            {"outputs": {"probs": [[0.25, 0.75], [0.125, 0.875]], "label": [1, 1]}},
        ),
        ({"probs": PROBS[:0]}, PredictFormat.ROW, {"predictions": []}),
    ],
    ids=["row", "row-multi", "columnar", "columnar-multi", "row-empty"],
)
def test_encode_predict(outputs: dict[str, np.ndarray], fmt: PredictFormat, expected: Any) -> None:
    assert (
        orjson.loads(encode_predict(InferResponse(model_name="m", outputs=outputs), fmt))
        == expected
    )


def test_bytes_outputs_are_text_or_b64() -> None:
    outputs = {
        "word": np.array([[b"caf\xc3\xa9"], [b"\xff"]], dtype=object),
        "raw_bytes": np.array([b"ab", b"c"], dtype=object),
    }
    body = orjson.loads(
        encode_predict(InferResponse(model_name="m", outputs=outputs), PredictFormat.ROW)
    )
    assert body == {
        "predictions": [
            {"word": ["café"], "raw_bytes": {"b64": "YWI="}},
            {"word": [{"b64": "/w=="}], "raw_bytes": {"b64": "Yw=="}},
        ]
    }


def test_predictions_round_trip_exactly() -> None:
    values = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    body = encode_predict(InferResponse(model_name="m", outputs={"x": values}), PredictFormat.ROW)
    request, _ = predict({"instances": orjson.loads(body)["predictions"]})
    assert request.inputs["x"].tobytes() == values.tobytes()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))},
            "outputs have different batch sizes [2, 3]",
        ),
        ({"a": np.array(1.0)}, "output 'a' is a scalar; row predictions need a batch dimension"),
    ],
)
def test_row_predictions_need_one_batch_size(outputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(GuardError) as info:
        encode_predict(InferResponse(model_name="m", outputs=outputs), PredictFormat.ROW)
    assert info.value.status == 500
    assert message in info.value.message


def test_columnar_scalar_output() -> None:
    body = encode_predict(
        InferResponse(model_name="m", outputs={"score": np.array(0.5, np.float32)}),
        PredictFormat.COLUMNAR,
    )
    assert orjson.loads(body) == {"outputs": 0.5}


ODD_VALUES = [
    None,
    True,
    -1,
    1.5,
    1e308,
    "",
    "x",
    [],
    [None],
    [[1]],
    {},
    {"b64": "AA=="},
    {"b64": 1},
]


def test_fuzzed_predict_raises_only_request_error() -> None:
    """One node of a valid body replaced by an odd value or removed: a RequestError or a
    valid request, never another exception."""
    doc = {
        "instances": [
            {"ids": [1, 2, 3], "mask": [True, True, False], "text": {"b64": "AAE="}},
            {"ids": [4, 5, 6], "mask": [False] * 3, "text": "t"},
        ]
    }
    rng = np.random.default_rng(31)
    counts: Counter[str] = Counter()
    for _ in range(2000):
        copy = orjson.loads(orjson.dumps(doc))
        instance = copy["instances"][int(rng.integers(2))]
        name = ["ids", "mask", "text"][int(rng.integers(3))]
        value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        if isinstance(instance[name], list) and rng.random() < 0.5:
            instance[name][int(rng.integers(len(instance[name])))] = value
        elif rng.random() < 0.2:
            del instance[name]
        else:
            instance[name] = value
        columns = {k: [i[k] for i in copy["instances"] if k in i] for k in instance}
        for body in (copy, {"inputs": columns}):
            try:
                request, _ = predict(body, MULTI)
            except RequestError as exc:
                counts["rejected" if exc.message else "rejected without a message"] += 1
            else:
                assert [a.shape[0] for a in request.inputs.values()] == [2, 2, 2]
                counts["accepted"] += 1
    assert counts["rejected"] > 1000
    assert counts["accepted"] > 50
    assert set(counts) == {"accepted", "rejected"}
