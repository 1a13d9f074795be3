"""Open Inference Protocol (KServe V2) REST bodies, with the binary tensor data extension.

Specs: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``
and Triton ``docs/protocol/extension_binary_data.md``.

Server side (a client calls the guard): :func:`decode_request`,
:func:`encode_response`, :func:`error_body`. Client side (the guard calls a V2
upstream): :func:`encode_request`, :func:`decode_response`.

Guarantees: decoders return well-formed :class:`~guard.inference.InferRequest`
/ :class:`~guard.inference.InferResponse` objects (unique names, arrays of the
declared datatype and shape) or raise :class:`~guard.errors.RequestError`
(request side, 400) or :class:`~guard.errors.UpstreamError` (response side,
502) with a message naming the field; nothing else escapes. Requests are read
strictly (unknown keys are refused, since a re-encoded request would silently
drop them); upstream responses leniently (unknown keys are ignored, ``null``
reads as NaN in float tensors). Per-tensor parameters other than the binary
framing (MLServer's ``content_type``) pass through both ways: a client's input
parameters reach the upstream, the upstream's output parameters reach the
client. Encoders write what the decoders read, so every tensor round-trips
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from guard.errors import RequestError, UpstreamError
from guard.inference import InferRequest, InferResponse, RequestedOutput, datatype_of, dtype_of
from guard.protocols import binary
from guard.protocols.binary import HEADER_LENGTH, parse_header_length
from guard.protocols.tensors import check_shape, flatten, json_value, load_json, show, to_array

JSON_TYPE = "application/json"

_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_DUMPS = orjson.OPT_SERIALIZE_NUMPY
# Per-tensor parameters that frame the binary extension, not the tensor: never passed on.
_FRAMING = frozenset({"binary_data_size", "binary_data"})
_NONE: dict[str, Any] = {}  # a tensor without parameters (read only)

__all__ = [
    "HEADER_LENGTH",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "error_body",
    "parse_header_length",
]


def error_body(message: str) -> bytes:
    """The protocol's error body, ``{"error": message}``."""
    return orjson.dumps({"error": message})


# -- server side -------------------------------------------------------------


def decode_request(
    body: bytes, *, header_length: int | None, model_name: str, model_version: str | None
) -> InferRequest:
    """The request in ``body``; ``header_length`` is the JSON part's length under the
    binary extension (``None``: the whole body is JSON). The model comes from the
    URL: ``model_name``/``model_version`` keys in the body are ignored."""
    doc, reader = _split(body, header_length, what="request body")
    _check_keys(doc, _REQUEST_KEYS, field="request")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise RequestError(f"inputs: must be a non-empty list of tensors; got {show(entries)}")
    input_parameters: dict[str, dict[str, Any]] = {}
    inputs = _tensors(entries, "inputs", reader, strict=True, parameters=input_parameters)
    parameters = _object(doc.get("parameters"), field="parameters")
    _encodable(parameters, field="parameters")
    binary_outputs = parameters.pop("binary_data_output", False)
    if type(binary_outputs) is not bool:
        raise RequestError(
            f"parameters.binary_data_output: must be true or false; got {show(binary_outputs)}"
        )
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        id=_id(doc),
        parameters=parameters,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_outputs=binary_outputs,
        input_parameters=input_parameters,
    )


def encode_response(
    response: InferResponse, *, request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` answering ``request``: only the outputs it named (in its
    order; all when it named none), each binary as the request asked. A response
    carrying the upstream's ``raw`` JSON body is answered with it unchanged."""
    if response.raw is not None:
        return response.raw, {"Content-Type": JSON_TYPE}
    wishes = {o.name: o.binary for o in request.outputs}
    unknown = [name for name in wishes if name not in response.outputs]
    if unknown:
        available = ", ".join(response.outputs) or "none"
        raise RequestError(f"outputs: unknown output {unknown[0]!r}; the model returns {available}")
    names = list(wishes) or list(response.outputs)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    request_id = response.id if response.id is not None else request.id
    if request_id is not None:
        doc["id"] = request_id
    if response.parameters:
        doc["parameters"] = response.parameters
    default = request.binary_outputs
    doc["outputs"], chunks = _encode_tensors(
        (
            (n, response.outputs[n], default if wishes.get(n) is None else bool(wishes[n]))
            for n in names
        ),
        response.output_parameters,
    )
    return _assemble(doc, chunks)


# -- client side -------------------------------------------------------------


def encode_request(request: InferRequest, *, binary: bool) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` for a V2 upstream: inputs as binary data and binary outputs
    asked for when ``binary``, plain JSON otherwise (for servers without the
    extension, such as MLServer). The request's parameters and requested outputs
    pass through."""
    doc: dict[str, Any] = {}
    if request.id is not None:
        doc["id"] = request.id
    parameters = {k: v for k, v in request.parameters.items() if k != "binary_data_output"}
    if binary:
        parameters["binary_data_output"] = True
    if parameters:
        doc["parameters"] = parameters
    doc["inputs"], chunks = _encode_tensors(
        ((n, a, binary) for n, a in request.inputs.items()), request.input_parameters
    )
    if request.outputs:
        doc["outputs"] = [_output_entry(o, binary) for o in request.outputs]
    return _assemble(doc, chunks)


def decode_response(body: bytes, *, header_length: int | None) -> InferResponse:
    """The upstream's response in ``body``; anything malformed raises UpstreamError."""
    try:
        doc, reader = _split(body, header_length, what="response body")
        entries = doc.get("outputs")
        if not isinstance(entries, list):
            raise RequestError(f"outputs: must be a list of tensors; got {show(entries)}")
        output_parameters: dict[str, dict[str, Any]] = {}
        outputs = _tensors(entries, "outputs", reader, strict=False, parameters=output_parameters)
        model_name = doc.get("model_name", "")
        if not isinstance(model_name, str):
            raise RequestError(f"model_name: must be a string; got {show(model_name)}")
        version = doc.get("model_version")
        if version is not None and not isinstance(version, str):
            raise RequestError(f"model_version: must be a string; got {show(version)}")
        return InferResponse(
            model_name=model_name,
            model_version=version,
            outputs=outputs,
            id=_id(doc),
            parameters=_object(doc.get("parameters"), field="parameters"),
            output_parameters=output_parameters,
        )
    except RequestError as exc:
        raise UpstreamError(f"upstream response: {exc.message}") from exc


# -- helpers -------------------------------------------------------------------


def _split(
    body: bytes, header_length: int | None, *, what: str
) -> tuple[dict[str, Any], binary.Tail]:
    head, tail = binary.split(body, header_length)
    return load_json(head, what=what), tail


def _tensors(
    entries: list[Any],
    field: str,
    reader: binary.Tail,
    *,
    strict: bool,
    parameters: dict[str, dict[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """The tensors of ``entries``; each one's own parameters (the binary framing left
    out) go into ``parameters`` by name when it is given."""
    tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        name, array = _decode_tensor(entry, f"{field}[{i}]", reader, strict=strict)
        if name in tensors:
            raise RequestError(f"{field}[{i}].name: duplicate tensor name {name!r}")
        tensors[name] = array
        if parameters is not None and entry.get("parameters"):
            own = {k: v for k, v in entry["parameters"].items() if k not in _FRAMING}
            if own:
                _encodable(own, field=f"{field}[{i}].parameters")
                parameters[name] = own
    reader.finish(what=field)
    return tensors


def _decode_tensor(
    entry: object, field: str, reader: binary.Tail, *, strict: bool
) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise RequestError(f"{field}: must be an object; got {show(entry)}")
    if strict:
        _check_keys(entry, _INPUT_KEYS, field=field)
    name = _name(entry, field)
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise RequestError(f"{field}.datatype: must be a string; got {show(datatype)}")
    dtype_of(datatype, field=f"{field}.datatype")
    shape = check_shape(entry.get("shape"), field=f"{field}.shape")
    given = entry.get("parameters")
    parameters = _object(given, field=f"{field}.parameters") if given is not None else _NONE
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise RequestError(f"{field}: has both data and parameters.binary_data_size")
        if type(size) is not int or size < 0:
            raise RequestError(
                f"{field}.parameters.binary_data_size: must be a non-negative integer; "
                f"got {show(size)}"
            )
        chunk = reader.take(size, field=f"{field}.parameters.binary_data_size")
        return name, binary.decode(
            chunk, datatype, shape, field=f"{field}.parameters.binary_data_size"
        )
    if "data" not in entry:
        if "shared_memory_region" in parameters:
            raise RequestError(
                f"{field}.parameters.shared_memory_region: shared memory is not supported"
            )
        raise RequestError(f"{field}: needs data or parameters.binary_data_size")
    return name, _from_json(
        entry["data"], datatype, shape, field=f"{field}.data", lenient=not strict
    )


def _from_json(
    data: object, datatype: str, shape: tuple[int, ...], *, field: str, lenient: bool
) -> np.ndarray:
    flat, kinds = flatten(data, depth=max(len(shape), 1), field=field)
    count = math.prod(shape)
    if len(flat) != count:
        raise RequestError(f"{field}: shape {list(shape)} needs {count} values; got {len(flat)}")

    def locate(i: int) -> str:
        return f"{field}[{i}]" if flat is data else f"{field} element {i}"

    return to_array(flat, datatype, locate=locate, kinds=kinds, null_is_nan=lenient).reshape(shape)


def _encode_tensors(
    tensors: Iterable[tuple[str, np.ndarray, bool]],
    parameters: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[bytes | None]]:
    """The JSON entries of ``(name, array, as_binary)`` and their binary parts (``None``:
    JSON); each entry carries its tensor's ``parameters`` (by name) when given."""
    own = parameters or {}
    pairs = [_encode_tensor(n, array, as_binary, own.get(n)) for n, array, as_binary in tensors]
    return [entry for entry, _ in pairs], [chunk for _, chunk in pairs]


def _encode_tensor(
    name: str, array: np.ndarray, as_binary: bool, parameters: dict[str, Any] | None = None
) -> tuple[dict[str, Any], bytes | None]:
    datatype = datatype_of(array)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if parameters:
        entry["parameters"] = dict(parameters)
    if as_binary:
        raw = binary.encode(array, datatype)
        entry.setdefault("parameters", {})["binary_data_size"] = len(raw)
        return entry, raw
    entry["data"] = json_value(array.reshape(-1), name=name)
    return entry, None


def _assemble(doc: dict[str, Any], chunks: list[bytes | None]) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(doc, option=_DUMPS)
    if all(chunk is None for chunk in chunks):
        return head, {"Content-Type": JSON_TYPE}
    return binary.join(head, [chunk for chunk in chunks if chunk is not None])


def _output_entry(output: RequestedOutput, as_binary: bool) -> dict[str, Any]:
    parameters = {k: v for k, v in output.parameters.items() if k != "binary_data"}
    if as_binary:
        parameters["binary_data"] = True
    entry: dict[str, Any] = {"name": output.name}
    if parameters:
        entry["parameters"] = parameters
    return entry


def _requested_outputs(value: object) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"outputs: must be a list; got {show(value)}")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        field = f"outputs[{i}]"
        if not isinstance(entry, dict):
            raise RequestError(f"{field}: must be an object; got {show(entry)}")
        _check_keys(entry, _OUTPUT_KEYS, field=field)
        name = _name(entry, field)
        if name in seen:
            raise RequestError(f"{field}.name: duplicate output name {name!r}")
        seen.add(name)
        parameters = _object(entry.get("parameters"), field=f"{field}.parameters")
        wish = parameters.pop("binary_data", None)
        if wish is not None and type(wish) is not bool:
            raise RequestError(
                f"{field}.parameters.binary_data: must be true or false; got {show(wish)}"
            )
        outputs.append(RequestedOutput(name=name, binary=wish, parameters=parameters))
    return outputs


def _check_keys(doc: dict[str, Any], allowed: frozenset[str], *, field: str) -> None:
    unknown = [k for k in doc if k not in allowed]
    if unknown:
        raise RequestError(
            f"{field}: unknown key {unknown[0]!r}; expected {', '.join(sorted(allowed))}"
        )


def _name(entry: dict[str, Any], field: str) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{field}.name: must be a non-empty string; got {show(name)}")
    return name


def _object(value: object, *, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{field}: must be an object; got {show(value)}")
    return dict(value)


def _id(doc: dict[str, Any]) -> str | None:
    value = doc.get("id")
    if value is not None and not isinstance(value, str):
        raise RequestError(f"id: must be a string; got {show(value)}")
    if value is not None:
        _encodable(value, field="id")
    return value


def _encodable(value: object, *, field: str) -> None:
    """Refuse text JSON can carry in but not out: lone UTF-16 surrogates ("\\ud800")."""
    try:
        orjson.dumps(value)
    except TypeError:
        raise RequestError(f"{field}: contains text that is not valid Unicode") from None
