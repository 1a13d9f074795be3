"""The gRPC codec against protobuf messages built by hand; parameters and shapes both ways."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from guard.errors import RequestError
from guard.inference import InferRequest, InferResponse, RequestedOutput
from guard.pipeline import keep_shapes
from guard.protocols import v2
from guard.protocols.grpc import codec
from guard.protocols.grpc import inference_pb2 as pb


def message(**kwargs: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [0.5, -1.25], np.float32),
        ("FP64", "fp64_contents", [0.1, 1e300], np.float64),
        ("BYTES", "bytes_contents", [b"a", b"\xff\x00"], object),
    ],
)
def test_typed_contents_decode_exactly(
    datatype: str, field: str, values: list[object], dtype: type
) -> None:
    m = message()
    tensor = m.inputs.add(name="x", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    array = codec.decode_request(m.SerializeToString()).inputs["x"]
    assert array.dtype == np.dtype(dtype) and array.shape == (1, 2)
    assert array.ravel().tolist() == values


@pytest.mark.parametrize(
    ("build", "text"),
    [
        (
            lambda m: m.inputs.add(
                name="x", datatype="INT8", shape=[1]
            ).contents.int_contents.append(300),
            "inputs[0].contents.int_contents[0]: 300 is out of range for INT8",
        ),
        (
            lambda m: m.inputs.add(name="x", datatype="FP16", shape=[1]),
            "inputs[0].contents: FP16 has no typed contents; send raw_input_contents",
        ),
        (
            lambda m: m.inputs.add(name="x", datatype="FP99", shape=[1]),
            "inputs[0].datatype: unsupported datatype 'FP99'",
        ),
        (
            lambda m: m.inputs.add(name="", datatype="FP32", shape=[1]),
            "inputs[0].name: must be a non-empty string",
        ),
        (
            lambda m: m.inputs.add(name="x", datatype="FP32", shape=[-1]),
            "inputs[0].shape: must be non-negative integers; got [-1]",
        ),
        (
            lambda m: [m.inputs.add(name="x", datatype="FP32", shape=[0]) for _ in range(2)],
            "inputs[1].name: duplicate tensor name 'x'",
        ),
    ],
)
def test_malformed_messages_name_the_field(build: object, text: str) -> None:
    m = message()
    build(m)  # type: ignore[operator]
    with pytest.raises(RequestError) as info:
        codec.decode_request(m.SerializeToString())
    assert text in info.value.message


def test_garbage_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="not a valid ModelInferRequest"):
        codec.decode_request(b"\xff\xff\xff")


def test_parameters_pass_both_ways_and_framing_is_dropped() -> None:
    m = message(raw_input_contents=[np.arange(3, dtype="<f4").tobytes()])
    tensor = m.inputs.add(name="x", datatype="FP32", shape=[3])
    tensor.parameters["content_type"].string_param = "np"
    tensor.parameters["binary_data_size"].int64_param = 12
    m.parameters["priority"].int64_param = 2
    m.outputs.add(name="label").parameters["binary_data"].bool_param = True
    request = codec.decode_request(m.SerializeToString())
    assert request.input_parameters == {"x": {"content_type": "np"}}
    assert request.parameters == {"priority": 2}
    assert [(o.name, o.parameters) for o in request.outputs] == [("label", {})]
    # ...and on to a V2 upstream
    body, _ = v2.encode_request(request, binary=False)
    assert orjson.loads(body)["inputs"][0]["parameters"] == {"content_type": "np"}

    response = InferResponse(
        model_name="m",
        outputs={"label": np.array([[1], [0]]), "scores": np.zeros((2, 2), np.float32)},
        output_parameters={"label": {"content_type": "np"}},
    )
    reply = pb.ModelInferResponse.FromString(codec.encode_response(response, request))
    assert [o.name for o in reply.outputs] == ["label"]  # only what was asked for
    assert list(reply.outputs[0].shape) == [2, 1]
    assert reply.outputs[0].parameters["content_type"].string_param == "np"


def test_v2_output_parameters_round_trip_json_and_binary() -> None:
    upstream = orjson.dumps(
        {
            "model_name": "m",
            "outputs": [
                {
                    "name": "predict",
                    "shape": [2, 1],
                    "datatype": "INT64",
                    "parameters": {"content_type": "np"},
                    "data": [1, 0],
                },
            ],
        }
    )
    response = v2.decode_response(upstream, header_length=None)
    assert response.output_parameters == {"predict": {"content_type": "np"}}
    for binary in (False, True):
        request = InferRequest(
            model_name="m", inputs={}, outputs=[RequestedOutput("predict", binary)]
        )
        body, headers = v2.encode_response(response, request=request)
        length = int(headers.get(v2.HEADER_LENGTH, len(body)))
        entry = orjson.loads(body[:length])["outputs"][0]
        assert entry["parameters"]["content_type"] == "np" and entry["shape"] == [2, 1]
        assert ("binary_data_size" in entry["parameters"]) is binary


def test_keep_shapes_restores_layout_not_content() -> None:
    response = InferResponse(
        model_name="m",
        outputs={"label": np.array([1, 0]), "scores": np.zeros((2, 1)), "new": np.zeros(3)},
    )
    keep_shapes(response, {"label": (2, 1), "scores": (2, 3)})
    assert response.outputs["label"].shape == (2, 1)  # same values, the backend's layout
    assert response.outputs["scores"].shape == (2, 1)  # element count changed: left alone
    assert response.outputs["new"].shape == (3,)


def _fields(descriptor: object) -> dict[str, tuple[int, int, int]]:
    """Every field of a message and its nested messages: name -> (number, type, label)."""
    out: dict[str, tuple[int, int, int]] = {}
    for field in descriptor.fields:  # type: ignore[attr-defined]
        label = 3 if field.is_repeated else 1
        out[f"{descriptor.full_name}.{field.name}"] = (field.number, field.type, label)  # type: ignore[attr-defined]
    for nested in descriptor.nested_types:  # type: ignore[attr-defined]
        out.update(_fields(nested))
    return out


def test_messages_match_triton_on_the_wire() -> None:
    """Our messages and Triton's (a superset of the protocol) agree on every field's
    number, type and cardinality, and the service's methods are Triton's."""
    from tritonclient.grpc import service_pb2 as triton

    ours = pb.DESCRIPTOR
    theirs = triton.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    missing = set()
    for name, message in ours.message_types_by_name.items():
        mine = _fields(message)
        other = _fields(theirs.message_types_by_name[name])
        assert {k: other[k] for k in mine if k in other} == {
            k: v for k, v in mine.items() if k in other
        }, name
        missing |= {k for k in mine if k not in other}
    # The protocol's later addition Triton's proto lacks (a Triton client skips it).
    assert missing == {
        "inference.ModelMetadataResponse.properties",
        "inference.ModelMetadataResponse.PropertiesEntry.key",
        "inference.ModelMetadataResponse.PropertiesEntry.value",
    }
    service = ours.services_by_name["GRPCInferenceService"]
    triton_service = theirs.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        twin = triton_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            twin.input_type.full_name,
            twin.output_type.full_name,
        )
