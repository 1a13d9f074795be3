"""Protocol-neutral inference requests and responses.

Codecs in :mod:`guard.protocols` turn wire formats into these and back; stages
and backends only ever see these. Tensors are numpy arrays, batch-first, keyed
by name in the order the client sent them. ``BYTES`` tensors are object arrays
of :class:`bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from guard.errors import RequestError

# Open Inference Protocol datatype <-> numpy dtype. BF16 has no numpy dtype and
# is refused with a clear message rather than silently reinterpreted.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}


def dtype_of(datatype: str, *, field: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name; ``field`` names it in the error."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise RequestError(
            f"{field}: unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of an array (object and string arrays are ``BYTES``)."""
    return datatype_name(array.dtype)


def datatype_name(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name of a numpy dtype (object and string dtypes are ``BYTES``)."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NAMES_BY_DTYPE[dtype.newbyteorder("=")]
    except KeyError:
        raise RequestError(f"tensor dtype {dtype} has no V2 datatype") from None


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` is its wish for the binary extension."""

    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    inputs: dict[str, np.ndarray]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] = field(default_factory=list)
    # The client's wish for binary outputs when it named none (``binary_data_output``).
    binary_outputs: bool = False
    # Per-input parameters as the client sent them (MLServer's ``content_type``), by
    # input name; the wire framing (``binary_data_size``) left out.
    input_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return 0 if first is None or first.ndim == 0 else int(first.shape[0])


@dataclass(slots=True)
class InferResponse:
    model_name: str
    outputs: dict[str, np.ndarray]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # The upstream's V2 JSON body, answered as it is when nothing needs the decoded
    # outputs (no response stage, a JSON client); ``outputs`` is then empty.
    raw: bytes | None = None
    # Per-output parameters as the upstream sent them (MLServer's ``content_type``), by
    # output name, passed on to the client; the wire framing left out.
    output_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, V2 datatype and shape (``-1`` for a free dimension) of a model's tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: tuple[str, ...] = ()

    def as_v2(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "platform": self.platform,
            "inputs": [t.as_v2() for t in self.inputs],
            "outputs": [t.as_v2() for t in self.outputs],
        }
        if self.versions:
            body["versions"] = list(self.versions)
        return body


def class_output(kind: str, shape: Sequence[int]) -> Literal["labels", "scores"] | None:
    """Whether an output holds the predicted class, from its numpy dtype ``kind`` and
    ``shape`` (``-1``: any size): ``labels``, integers ``[N]`` or ``[N, 1]``; ``scores``,
    floats ``[N, classes]`` with two or more classes (the class is the argmax); else None.
    A spec's datatype gives its kind through :data:`DATATYPES`."""
    if kind in ("i", "u") and (len(shape) == 1 or tuple(shape[1:]) == (1,)):
        return "labels"
    if kind == "f" and len(shape) == 2 and shape[1] not in (0, 1):
        return "scores"
    return None
