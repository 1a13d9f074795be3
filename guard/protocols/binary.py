"""Raw tensor bytes of the binary tensor data extension.

Layout (Triton ``docs/protocol/extension_binary_data.md``): little-endian,
row-major, no padding; BOOL is one byte, 0 or 1; a BYTES element is a 4-byte
little-endian unsigned length followed by that many bytes.

Guarantees: :func:`decode` returns a writable, aligned array of exactly the
declared shape, or raises :class:`~guard.errors.RequestError` naming ``field``
when the byte count does not match; :func:`encode` and :func:`decode` are
inverses for every V2 datatype.
"""

from __future__ import annotations

import math
import struct
from itertools import chain

import numpy as np

from guard.errors import GuardError, RequestError
from guard.inference import DATATYPES

_LENGTH = struct.Struct("<I")


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
