"""Open Inference Protocol (KServe V2) gRPC messages <-> InferRequest / InferResponse.

Spec: kserve/open-inference-protocol ``specification/protocol/inference_grpc.md``;
the messages are :mod:`guard.protocols.grpc.inference_pb2`, generated from
``inference.proto`` beside this module.

Server side only (a client calls the guard): :func:`decode_request` and
:func:`encode_response`. Same guarantees as the REST codec (:mod:`guard.protocols.v2`):
a well-formed :class:`~guard.inference.InferRequest` (unique names, arrays of the
declared datatype and shape) or a :class:`~guard.errors.RequestError` whose message
names the field in the REST codec's spelling (``inputs[0].shape``,
``raw_input_contents[1]``); nothing else escapes.

Tensor data comes either in ``raw_input_contents`` (one entry per input, the binary
tensor layout of :mod:`guard.protocols.binary`), which Triton's client always uses,
or in each input's typed ``contents`` (KServe's and MLServer's clients), never both.
Answers always carry ``raw_output_contents``, as Triton's server does; every V2 client
reads them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from guard.errors import RequestError
from guard.inference import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
    dtype_of,
)
from guard.protocols import binary
from guard.protocols.grpc import inference_pb2 as pb
from guard.protocols.tensors import MAX_DIMS, MAX_ELEMENTS, show

__all__ = [
    "CONTENTS",
    "decode_request",
    "encode_response",
    "parameters_from",
    "parse",
    "pb",
    "request_from",
]

# The typed contents field of each datatype (FP16 and BF16 have none: raw only).
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS = tuple(dict.fromkeys(CONTENTS.values()))
# Per-tensor parameters of the REST binary extension: framing, not the tensor's.
_FRAMING = frozenset({"binary_data_size", "binary_data"})


def parse(body: bytes) -> Any:
    """The ``ModelInferRequest`` serialized in ``body`` (a protobuf message, unchecked)."""
    try:
        return pb.ModelInferRequest.FromString(body)
    except DecodeError:
        raise RequestError("request: not a valid ModelInferRequest message") from None


def decode_request(body: bytes) -> InferRequest:
    """The request serialized in ``body``: :func:`request_from` of :func:`parse`."""
    return request_from(parse(body))


def request_from(message: Any) -> InferRequest:
    """The request a parsed ``ModelInferRequest`` carries.

    The model is the message's ``model_name`` (``model_version`` empty: none named).
    Per-output ``binary_data`` parameters, a REST notion, are dropped.
    """
    if not message.model_name:
        raise RequestError("model_name: must be a non-empty string")
    if not message.inputs:
        raise RequestError("inputs: must hold at least one tensor")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise RequestError(
            f"raw_input_contents: has {len(raw)} entries for {len(message.inputs)} inputs; "
            "give one per input, in the order of inputs"
        )
    inputs: dict[str, np.ndarray] = {}
    input_parameters: dict[str, dict[str, Any]] = {}
    for i, tensor in enumerate(message.inputs):
        field = f"inputs[{i}]"
        if not tensor.name:
            raise RequestError(f"{field}.name: must be a non-empty string")
        if tensor.name in inputs:
            raise RequestError(f"{field}.name: duplicate tensor name {tensor.name!r}")
        dtype_of(tensor.datatype, field=f"{field}.datatype")
        shape = _shape(tensor.shape, field=f"{field}.shape")
        own = parameters_from(tensor.parameters, field=f"{field}.parameters")
        own = {k: v for k, v in own.items() if k not in _FRAMING}
        if own:
            input_parameters[tensor.name] = own
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(
                    f"{field}.contents: must be empty when raw_input_contents is given"
                )
            array = binary.decode(
                memoryview(raw[i]), tensor.datatype, shape, field=f"raw_input_contents[{i}]"
            )
        else:
            array = _from_contents(tensor, shape, field=field)
        inputs[tensor.name] = array
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version or None,
        inputs=inputs,
        id=message.id or None,
        parameters=parameters_from(message.parameters, field="parameters"),
        outputs=_requested_outputs(message.outputs),
        input_parameters=input_parameters,
    )


def encode_response(response: InferResponse, request: InferRequest) -> bytes:
    """The serialized ``ModelInferResponse`` answering ``request``: only the outputs
    it named (in its order; all when it named none), as raw contents, each with the parameters
    the upstream gave it."""
    if response.raw is not None:  # an upstream's JSON body, kept whole for a REST client
        from guard.protocols import v2

        response = v2.decode_response(response.raw, header_length=None)
    wanted = [o.name for o in request.outputs]
    unknown = [name for name in wanted if name not in response.outputs]
    if unknown:
        available = ", ".join(response.outputs) or "none"
        raise RequestError(f"outputs: unknown output {unknown[0]!r}; the model returns {available}")
    message = pb.ModelInferResponse(
        model_name=response.model_name or request.model_name,
        model_version=response.model_version or request.model_version or "",
        id=response.id or request.id or "",
    )
    _set_parameters(message.parameters, response.parameters)
    for name in wanted or list(response.outputs):
        array = response.outputs[name]
        datatype = datatype_of(array)
        entry = message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        _set_parameters(entry.parameters, response.output_parameters.get(name, {}))
        message.raw_output_contents.append(binary.encode(array, datatype))
    return message.SerializeToString()


def parameters_from(entries: Any, *, field: str) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as a dict of Python values; an entry with no
    value set is refused by name."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        which = value.WhichOneof("parameter_choice")
        if which is None:
            raise RequestError(f"{field}.{key}: holds no value")
        out[key] = getattr(value, which)
    return out


def _set_parameters(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        entry = target[key]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            if value >= 1 << 63:
                entry.uint64_param = value
            else:
                entry.int64_param = value
        elif isinstance(value, float):
            entry.double_param = value
        else:
            entry.string_param = value if isinstance(value, str) else str(value)


def _shape(dims: Any, *, field: str) -> tuple[int, ...]:
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        raise RequestError(f"{field}: must be non-negative integers; got {show(list(shape))}")
    if len(shape) > MAX_DIMS:
        raise RequestError(f"{field}: at most {MAX_DIMS} dimensions; got {len(shape)}")
    if max(shape, default=0) > MAX_ELEMENTS or math.prod(shape) > MAX_ELEMENTS:
        raise RequestError(
            f"{field}: {show(list(shape))} exceeds the limit of {MAX_ELEMENTS} elements"
        )
    return shape


def _from_contents(tensor: Any, shape: tuple[int, ...], *, field: str) -> np.ndarray:
    datatype = tensor.datatype
    own = CONTENTS.get(datatype)
    if own is None:
        raise RequestError(
            f"{field}.contents: {datatype} has no typed contents; send raw_input_contents"
        )
    contents = tensor.contents
    for other in _ALL_CONTENTS:
        if other != own and len(getattr(contents, other)):
            raise RequestError(
                f"{field}.contents.{other}: set for a {datatype} tensor; expected {own}"
            )
    values = getattr(contents, own)
    count = math.prod(shape)
    if len(values) != count:
        raise RequestError(
            f"{field}.contents.{own}: shape {list(shape)} needs {count} values; got {len(values)}"
        )
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    wide = np.array(values, dtype=dtype if dtype.kind == "f" else _WIDE[dtype.kind])
    if dtype.kind in "iu" and dtype.itemsize < 4 and wide.size:
        info = np.iinfo(dtype)
        bad = np.flatnonzero((wide < info.min) | (wide > info.max))
        if bad.size:
            i = int(bad[0])
            raise RequestError(
                f"{field}.contents.{own}[{i}]: {int(wide[i])} is out of range for {datatype} "
                f"[{info.min}, {info.max}]"
            )
    return wide.astype(dtype).reshape(shape)


_WIDE = {"b": np.bool_, "i": np.int64, "u": np.uint64}


def _requested_outputs(entries: Any) -> list[RequestedOutput]:
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"outputs[{i}]"
        if not entry.name:
            raise RequestError(f"{field}.name: must be a non-empty string")
        if entry.name in seen:
            raise RequestError(f"{field}.name: duplicate output name {entry.name!r}")
        seen.add(entry.name)
        parameters = parameters_from(entry.parameters, field=f"{field}.parameters")
        parameters.pop("binary_data", None)
        outputs.append(RequestedOutput(name=entry.name, parameters=parameters))
    return outputs
