"""TensorFlow Serving REST ``:predict`` bodies.

Spec: the TF Serving RESTful API guide ("Request format" / "Response format",
"Encoding binary values"). Two request formats:

* row: ``{"signature_name"?, "instances": [...]}``, one entry per example; for a
  single-input model an entry is the input's value (or ``{name: value}``), for
  several inputs ``{name: value, ...}``. Entries are stacked batch-first.
* columnar: ``{"signature_name"?, "inputs": value | {name: value, ...}}``, each
  value the whole batch.

Row requests are answered ``{"predictions": [...]}`` (per example: the value of
the one output, or ``{name: value}``), columnar ones ``{"outputs": value |
{name: value}}``. Binary strings travel as ``{"b64": "..."}``.

Guarantees: :func:`decode_predict` returns one tensor per model input, named,
typed and shaped by its :class:`~guard.inference.TensorSpec` (free ``-1``
dimensions taken from the data), or raises
:class:`~guard.errors.RequestError` naming the value, e.g.
``instances[3]: expected 64 values; got 63``.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from guard.errors import GuardError, RequestError
from guard.inference import InferRequest, InferResponse, TensorSpec, datatype_of
from guard.protocols.tensors import flatten_to_shape, json_value, load_json, show, to_array

_SIGNATURE = "serving_default"
_KEYS = frozenset({"signature_name", "instances", "inputs"})


class PredictFormat(enum.Enum):
    """The request's format; the response answers in the same one."""

    ROW = "instances"
    COLUMNAR = "inputs"

    @property
    def response_key(self) -> str:
        return "predictions" if self is PredictFormat.ROW else "outputs"


def decode_predict(
    body: bytes, *, model_name: str, model_version: str | None, inputs: Sequence[TensorSpec]
) -> tuple[InferRequest, PredictFormat]:
    """The request in ``body`` for a model whose inputs are ``inputs``, and its format."""
    doc = _load(body)
    unknown = [k for k in doc if k not in _KEYS]
    if unknown:
        raise RequestError(
            f"request: unknown key {unknown[0]!r}; expected {', '.join(sorted(_KEYS))}"
        )
    signature = doc.get("signature_name", _SIGNATURE)
    if signature != _SIGNATURE:
        raise RequestError(f"signature_name: only {_SIGNATURE!r} is served; got {show(signature)}")
    if ("instances" in doc) == ("inputs" in doc):
        raise RequestError(
            "request: needs exactly one of 'instances' (row format) or 'inputs' (columnar format)"
        )
    if not inputs:
        raise RequestError(f"model {model_name!r} declares no inputs")
    if "instances" in doc:
        fmt, tensors = PredictFormat.ROW, _rows(doc["instances"], inputs)
    else:
        fmt, tensors = PredictFormat.COLUMNAR, _columns(doc["inputs"], inputs)
    return InferRequest(model_name=model_name, model_version=model_version, inputs=tensors), fmt


def encode_predict(response: InferResponse, fmt: PredictFormat) -> bytes:
    """The ``predictions`` (row) or ``outputs`` (columnar) body for ``response``."""
    values = {name: _value(name, array) for name, array in response.outputs.items()}
    if fmt is PredictFormat.COLUMNAR:
        body: Any = next(iter(values.values())) if len(values) == 1 else values
    else:
        sizes = {_batch_first(name, array) for name, array in response.outputs.items()}
        if len(sizes) > 1:
            raise GuardError(
                f"outputs have different batch sizes {sorted(sizes)}; cannot form row predictions"
            )
        if len(values) == 1:
            body = next(iter(values.values()))
        else:
            batch = sizes.pop() if sizes else 0
            body = [{name: _row(value, i) for name, value in values.items()} for i in range(batch)]
    return orjson.dumps({fmt.response_key: body}, option=orjson.OPT_SERIALIZE_NUMPY)


# -- helpers -------------------------------------------------------------------


def _load(body: bytes) -> dict[str, Any]:
    return load_json(body, what="request body")


def _is_named(value: object, specs: Sequence[TensorSpec]) -> bool:
    """Whether ``value`` is a ``{name: value}`` object rather than a value (``{"b64": ...}``)."""
    return isinstance(value, dict) and not (_is_b64(value) and specs[0].name != "b64")


def _rows(instances: object, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise RequestError(f"instances: must be a non-empty list; got {show(instances)}")
    if len(specs) == 1 and not _is_named(instances[0], specs):
        spec = specs[0]
        return {spec.name: _tensor(instances, spec, lambda idx: "instances" + _index(idx))}
    names = [s.name for s in specs]
    for i, instance in enumerate(instances):
        if not _is_named(instance, specs):
            raise RequestError(
                f"instances[{i}]: must be an object naming the inputs {', '.join(names)}"
            )
        _check_names(instance, names, field=f"instances[{i}]")
    return {
        spec.name: _tensor(
            [instance[spec.name] for instance in instances], spec, _in_instances(spec.name)
        )
        for spec in specs
    }


def _columns(value: object, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if len(specs) == 1 and not _is_named(value, specs):
        return {specs[0].name: _tensor(value, specs[0], lambda idx: "inputs" + _index(idx))}
    names = [s.name for s in specs]
    if not isinstance(value, dict):
        raise RequestError(f"inputs: must be an object naming the inputs {', '.join(names)}")
    _check_names(value, names, field="inputs")
    return {spec.name: _tensor(value[spec.name], spec, _in_inputs(spec.name)) for spec in specs}


def _check_names(value: dict[str, Any], names: list[str], *, field: str) -> None:
    missing = [n for n in names if n not in value]
    if missing:
        raise RequestError(f"{field}: missing input {missing[0]!r}")
    unknown = [k for k in value if k not in names]
    if unknown:
        raise RequestError(
            f"{field}: unknown input {unknown[0]!r}; the model's inputs are {', '.join(names)}"
        )


def _tensor(
    value: object, spec: TensorSpec, locate: Callable[[tuple[int, ...]], str]
) -> np.ndarray:
    dims = [None if d < 0 else d for d in spec.shape]
    flat, shape = flatten_to_shape(value, dims, locate=locate)

    def locate_flat(i: int) -> str:
        return locate(tuple(int(j) for j in np.unravel_index(i, shape)))

    if spec.datatype == "BYTES" and any(type(x) is dict for x in flat):
        flat = [_b64_value(x, locate_flat, i) if type(x) is dict else x for i, x in enumerate(flat)]
    return to_array(flat, spec.datatype, locate=locate_flat).reshape(shape)


def _is_b64(value: object) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _b64_value(value: dict[str, Any], locate: Callable[[int], str], i: int) -> bytes:
    text = value.get("b64")
    if not _is_b64(value) or not isinstance(text, str):
        raise RequestError(
            f'{locate(i)}: expected a string or {{"b64": string}}; got {show(value)}'
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{locate(i)}.b64: invalid base64") from None


def _index(idx: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in idx)


def _in_instances(name: str) -> Callable[[tuple[int, ...]], str]:
    """Names ``instances[i].name[j]...`` for a value gathered across instances."""
    return lambda idx: f"instances[{idx[0]}].{name}{_index(idx[1:])}" if idx else "instances"


def _in_inputs(name: str) -> Callable[[tuple[int, ...]], str]:
    return lambda idx: f"inputs.{name}{_index(idx)}"


def _value(name: str, array: np.ndarray) -> Any:
    """JSON for one output; BYTES outputs named ``*_bytes`` (or not UTF-8) as ``{"b64": ...}``."""
    if datatype_of(array) != "BYTES":
        return json_value(array, name=name)
    encode = _b64_text if name.endswith("_bytes") else _text_or_b64
    out = np.empty(array.size, dtype=object)
    out[:] = [encode(x) for x in array.reshape(-1).tolist()]
    return out.reshape(array.shape).tolist() if array.ndim else out[0]


def _text_or_b64(element: bytes | str) -> Any:
    if isinstance(element, str):
        return element
    try:
        return element.decode()
    except UnicodeDecodeError:
        return _b64_text(element)


def _b64_text(element: bytes | str) -> dict[str, str]:
    raw = element.encode() if isinstance(element, str) else element
    return {"b64": base64.b64encode(raw).decode("ascii")}


def _row(value: Any, i: int) -> Any:
    """Row ``i`` of an output's JSON value; numpy scalars become Python ones for orjson."""
    item = value[i]
    return item.tolist() if isinstance(item, (np.ndarray, np.generic)) else item


def _batch_first(name: str, array: np.ndarray) -> int:
    if array.ndim == 0:
        raise GuardError(f"output {name!r} is a scalar; row predictions need a batch dimension")
    return int(array.shape[0])


# -- model status and metadata (GET /v1/models/<m>[/versions/<v>][/metadata]) -----------

# V2 datatype -> TensorFlow DataType enum name, as GetModelMetadata's JSON spells it.
TF_DTYPES = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "BF16": "DT_BFLOAT16",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BYTES": "DT_STRING",
}


def status_body(name: str, version: str, ready: bool) -> dict[str, Any]:
    """The model's status for both readers of ``GET /v1/models/<m>``: TF Serving's
    ``model_version_status`` and KServe V1's ``{"name", "ready"}``."""
    state = "AVAILABLE" if ready else "UNAVAILABLE"
    return {
        "name": name,
        "ready": ready,
        "model_version_status": [
            {
                "version": version,
                "state": state,
                "status": {"error_code": "OK" if ready else "UNAVAILABLE", "error_message": ""},
            }
        ],
    }


def metadata_body(
    name: str, version: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> dict[str, Any]:
    """TF Serving's ``GetModelMetadataResponse`` as JSON: the ``serving_default``
    signature with the model's inputs and outputs (``-1``: a free dimension)."""

    def tensors(specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {
            spec.name: {
                "dtype": TF_DTYPES.get(spec.datatype, "DT_INVALID"),
                "tensor_shape": {
                    "dim": [{"size": str(d), "name": ""} for d in spec.shape],
                    "unknown_rank": False,
                },
                "name": spec.name,
            }
            for spec in specs
        }

    signature = {
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": version},
        "metadata": {"signature_def": {"signature_def": {_SIGNATURE: signature}}},
    }
