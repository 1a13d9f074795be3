"""The binary tensor data extension: body framing and raw tensor bytes.

Spec: Triton ``docs/protocol/extension_binary_data.md``. A body is a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the tensors'
bytes, in the order of their JSON entries, each ``binary_data_size`` long.
Tensor layout: little-endian, row-major, no padding; BOOL is one byte, 0 or 1;
a BYTES element is a 4-byte little-endian unsigned length followed by that
many bytes.

Guarantees: :func:`decode` returns a writable, aligned array of exactly the
declared shape, or raises :class:`~guard.errors.RequestError` naming ``field``
when the bytes do not match; :func:`encode` and :func:`decode` are inverses
for every V2 datatype; :class:`Tail` hands out each byte of the tail once and
:meth:`Tail.finish` refuses bytes no tensor claimed.
"""

from __future__ import annotations

import math
import struct
from itertools import chain

import numpy as np

from guard.errors import GuardError, RequestError
from guard.inference import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (``None`` when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise RequestError(f"{HEADER_LENGTH}: must be a non-negative integer; got {value[:40]!r}")
    return int(text)


class Tail:
    """The bytes after the JSON header, handed out in order (``None``: no header given)."""

    __slots__ = ("_pos", "_view")

    def __init__(self, view: memoryview | None) -> None:
        self._view = view
        self._pos = 0

    def take(self, size: int, *, field: str) -> memoryview:
        if self._view is None:
            raise RequestError(f"{field}: binary data needs the {HEADER_LENGTH} header")
        left = len(self._view) - self._pos
        if size > left:
            raise RequestError(f"{field}: {size} bytes exceed the {left} bytes left in the body")
        self._pos += size
        return self._view[self._pos - size : self._pos]

    def finish(self, *, what: str) -> None:
        left = 0 if self._view is None else len(self._view) - self._pos
        if left:
            raise RequestError(
                f"{what}: {left} bytes after the JSON are claimed by no tensor's binary_data_size"
            )


def split(body: bytes, header_length: int | None) -> tuple[memoryview, Tail]:
    """The JSON header of ``body`` and the tail after it (the whole body when no header)."""
    view = memoryview(body)
    if header_length is None:
        return view, Tail(None)
    if not 0 <= header_length <= len(view):
        raise RequestError(
            f"{HEADER_LENGTH}: {header_length} is outside the body's {len(view)} bytes"
        )
    return view[:header_length], Tail(view[header_length:])


def join(head: bytes, chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A body of ``head`` and the tensors' bytes, with its headers."""
    return head + b"".join(chunks), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(head))}


def encode(array: np.ndarray, datatype: str) -> bytes:
    """The extension's bytes for ``array`` (``datatype`` as given by ``datatype_of``)."""
    if datatype == "BYTES":
        elements = [_element(x) for x in array.reshape(-1).tolist()]
        return b"".join(chain.from_iterable((_LENGTH.pack(len(x)), x) for x in elements))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def decode(buffer: memoryview, datatype: str, shape: tuple[int, ...], *, field: str) -> np.ndarray:
    """The tensor of ``datatype`` and ``shape`` stored in ``buffer`` (all of it)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes(buffer, count, field=field).reshape(shape)
    dtype = DATATYPES[datatype]
    needed = count * dtype.itemsize
    if len(buffer) != needed:
        raise RequestError(
            f"{field}: shape {list(shape)} of {datatype} needs {needed} bytes; got {len(buffer)}"
        )
    if datatype == "BOOL" and count and np.frombuffer(buffer, dtype=np.uint8).max() > 1:
        raise RequestError(f"{field}: BOOL bytes must be 0 or 1")
    raw = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"))
    return raw.astype(dtype).reshape(shape)  # a copy: native order, aligned, writable


def _element(x: object) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    raise GuardError(f"BYTES element of type {type(x).__name__} has no byte representation")


def _decode_bytes(buffer: memoryview, count: int, *, field: str) -> np.ndarray:
    size = len(buffer)
    if count > size // _LENGTH.size:
        raise RequestError(
            f"{field}: {count} BYTES elements need at least {4 * count} bytes; got {size}"
        )
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + _LENGTH.size > size:
            raise RequestError(
                f"{field}: BYTES element {i} starts past the end of its {size} bytes"
            )
        (length,) = _LENGTH.unpack_from(buffer, pos)
        pos += _LENGTH.size
        if pos + length > size:
            raise RequestError(
                f"{field}: BYTES element {i} of {length} bytes overruns the {size} bytes"
            )
        out[i] = bytes(buffer[pos : pos + length])
        pos += length
    if pos != size:
        raise RequestError(f"{field}: {size - pos} bytes left after {count} BYTES elements")
    return out
