"""JSON tensor values <-> numpy arrays, shared by the V2 and TF Serving codecs.

Guarantees:

* every malformed value raises :class:`~guard.errors.RequestError` with a
  message that names its field (``inputs[0].data[5]: expected numbers for
  FP32; got "a"``); no ``TypeError``/``ValueError`` escapes;
* nothing is allocated from a client's ``shape`` alone: element counts are
  checked against the data actually received before any array is built;
* numbers convert exactly or are refused: no silent truncation of fractions,
  no wrap-around of out-of-range integers, no float overflow to infinity;
* arrays written as JSON parse back to the same values, bit for bit for
  finite floats, through any correctly rounding double parser (Python, numpy,
  rapidjson). FP32 is written as the shortest decimal of its *double* value:
  orjson's own float32 digits are the shortest for float32, but two of the
  4.28e9 finite float32 values (±0x15ae43fd, "7.038531e-26") then round to a
  neighbour when read through a double. FP16's shortest digits read back
  exactly for all 63,488 finite values (tested).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np
import orjson

from guard.errors import GuardError, RequestError
from guard.inference import DATATYPES

MAX_DIMS = 32
# Bound on the elements a shape may declare, so that a lying shape is refused
# before anything is sized from it.
MAX_ELEMENTS = 1 << 31
_EXACT_FLOAT_INT = 1 << 53

Locate = Callable[[int], str]

_EXPECTED = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}
_ALLOWED: dict[str, frozenset[type]] = {
    "b": frozenset({bool}),
    "i": frozenset({int, float}),
    "u": frozenset({int, float}),
    "f": frozenset({int, float}),
    "O": frozenset({str, bytes}),
}


def load_json(body: bytes | memoryview, *, what: str) -> dict[str, Any]:
    """Parse a JSON object; ``NaN`` and ``Infinity`` literals are accepted.

    They are not JSON, but Python's ``json.dumps`` (and so tritonclient) writes
    them for non-finite floats; reading them lets the ``validate`` stage refuse
    such values by name instead of failing the whole body as unparsable. orjson
    parses everything else; the slower standard parser runs only when it fails.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise RequestError(f"{what}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError(f"{what}: must be a JSON object; got {show(doc, 20)}")
    return doc


def show(value: object, limit: int = 60) -> str:
    """A short JSON rendering of a client value for error messages (bounded work)."""
    text = _render(value, 0)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render(value: object, depth: int) -> str:
    if isinstance(value, list):
        if depth == 3:
            return "[…]"
        parts = [_render(x, depth + 1) for x in value[:8]]
        return "[" + ", ".join(parts + ["…"] * (len(value) > 8)) + "]"
    if isinstance(value, dict):
        if depth == 3:
            return "{…}"
        parts = [
            f"{_render(str(k), depth)}: {_render(v, depth + 1)}"
            for k, v in islice(value.items(), 8)
        ]
        return "{" + ", ".join(parts + ["…"] * (len(value) > 8)) + "}"
    if isinstance(value, str) and len(value) > 80:
        value = value[:80]
    return json.dumps(value, ensure_ascii=False, default=repr)


def check_shape(shape: object, *, field: str) -> tuple[int, ...]:
    """``shape`` as a tuple, if it is a list of at most MAX_DIMS non-negative ints
    declaring at most MAX_ELEMENTS elements."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(f"{field}: must be a list of non-negative integers; got {show(shape)}")
    if len(shape) > MAX_DIMS:
        raise RequestError(f"{field}: at most {MAX_DIMS} dimensions; got {len(shape)}")
    if max(shape, default=0) > MAX_ELEMENTS or math.prod(shape) > MAX_ELEMENTS:
        raise RequestError(f"{field}: {show(shape)} exceeds the limit of {MAX_ELEMENTS} elements")
    return tuple(shape)


def flatten(data: object, *, depth: int, field: str) -> tuple[list[Any], set[type]]:
    """The leaves of ``data``, a list nested at most ``depth`` deep, in row-major
    order, and the set of their types.

    Nesting need not be regular (the V2 protocol only fixes the element count),
    but a level may not mix lists and values.
    """
    if not isinstance(data, list):
        raise RequestError(f"{field}: must be a list; got {show(data)}")
    level: list[Any] = data
    kinds = set(map(type, level))
    for _ in range(depth - 1):
        if list not in kinds:
            break
        if len(kinds) > 1:
            raise RequestError(f"{field}: mixes nested lists and values")
        level = list(chain.from_iterable(level))
        kinds = set(map(type, level))
    if list in kinds:
        raise RequestError(f"{field}: nested deeper than the shape's {depth} dimensions")
    return level, kinds


def flatten_to_shape(
    value: object, dims: Sequence[int | None], *, locate: Callable[[tuple[int, ...]], str]
) -> tuple[list[Any], tuple[int, ...]]:
    """The leaves and shape of a regular nested list matching ``dims`` (``None``: free).

    ``locate`` names the value at a multi-index, for errors such as
    ``instances[3]: expected 64 values; got 63``.
    """
    level: list[Any] = [value]
    shape: list[int] = []
    for dim in dims:
        if level and set(map(type, level)) != {list}:
            bad = next(i for i, x in enumerate(level) if type(x) is not list)
            expected = f"{dim} values" if dim is not None else "values"
            where = _at(locate, bad, shape)
            raise RequestError(f"{where}: expected a list of {expected}; got {show(level[bad])}")
        size = dim if dim is not None else (len(level[0]) if level else 0)
        if level and set(map(len, level)) != {size}:
            bad = next(i for i, x in enumerate(level) if len(x) != size)
            where = _at(locate, bad, shape)
            raise RequestError(f"{where}: expected {size} values; got {len(level[bad])}")
        shape.append(size)
        level = list(chain.from_iterable(level))
    if list in set(map(type, level)):
        bad = next(i for i, x in enumerate(level) if type(x) is list)
        where = _at(locate, bad, shape)
        raise RequestError(
            f"{where}: expected a value; got a list (the shape has {len(dims)} dimensions)"
        )
    return level, tuple(shape)


def _at(locate: Callable[[tuple[int, ...]], str], index: int, shape: list[int]) -> str:
    return locate(tuple(int(j) for j in np.unravel_index(index, shape)))


def to_array(
    flat: list[Any],
    datatype: str,
    *,
    locate: Locate,
    kinds: set[type] | None = None,
    null_is_nan: bool = False,
) -> np.ndarray:
    """A 1-D array of ``datatype`` holding ``flat``, or a RequestError naming the first bad value.

    BOOL takes only true/false; integer types take ints and integral floats that
    fit exactly; float types take numbers (and ``null`` as NaN when
    ``null_is_nan``, for upstream responses); BYTES takes str (UTF-8 encoded)
    or bytes. ``kinds``, the set of the values' types, saves a pass when known.
    """
    dtype = DATATYPES[datatype]
    kind = dtype.kind
    allowed = _ALLOWED[kind] | ({type(None)} if null_is_nan and kind == "f" else frozenset())
    if kinds is None:
        kinds = set(map(type, flat))
    if not kinds <= allowed:
        i = next(i for i, x in enumerate(flat) if type(x) not in allowed)
        raise RequestError(
            f"{locate(i)}: expected {_EXPECTED[kind]} for {datatype}; got {show(flat[i])}"
        )
    if kind == "O":
        out = np.empty(len(flat), dtype=object)
        out[:] = [x.encode() if type(x) is str else x for x in flat]
        return out
    if kind in "iu":
        return _integers(flat, dtype, datatype, locate, exact=float not in kinds)
    if kind == "f":
        with np.errstate(over="ignore"):
            out = np.array(flat, dtype=dtype)
        if np.isinf(out).any():  # overflow, unless the value was an Infinity literal
            for i in np.flatnonzero(np.isinf(out)).tolist():
                if not math.isinf(flat[i]):
                    raise RequestError(
                        f"{locate(i)}: {show(flat[i])} is out of range for {datatype}"
                    )
        return out
    return np.array(flat, dtype=dtype)


def _integers(
    flat: list[Any], dtype: np.dtype[Any], datatype: str, locate: Locate, *, exact: bool
) -> np.ndarray:
    if not exact:  # floats are accepted where they hold an integer exactly
        for i, x in enumerate(flat):
            if type(x) is float and not (x.is_integer() and abs(x) <= _EXACT_FLOAT_INT):
                raise RequestError(f"{locate(i)}: expected integers for {datatype}; got {show(x)}")
        flat = [int(x) for x in flat]
    info = np.iinfo(dtype)
    if flat and (min(flat) < info.min or max(flat) > info.max):
        i = next(i for i, x in enumerate(flat) if not info.min <= x <= info.max)
        raise RequestError(
            f"{locate(i)}: {flat[i]} is out of range for {datatype} [{info.min}, {info.max}]"
        )
    return np.array(flat, dtype=dtype)


def json_value(array: np.ndarray, *, name: str) -> Any:
    """What orjson (with OPT_SERIALIZE_NUMPY) writes as ``array``'s values, nested by its shape.

    Non-finite floats become ``null`` (JSON has no NaN). BYTES elements become
    strings; elements that are not UTF-8 raise a RequestError advising binary
    output, since JSON cannot carry them.
    """
    if array.dtype.kind in "OSU":
        strings = [_text(x, name) for x in array.reshape(-1).tolist()]
        if array.ndim <= 1:
            return strings if array.ndim else strings[0]
        out = np.empty(len(strings), dtype=object)
        out[:] = strings
        return out.reshape(array.shape).tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize == 4:
        target = np.dtype(np.float64)  # exact digits (see the module docstring)
    else:
        target = array.dtype.newbyteorder("=")
    native = array.astype(target, order="C", copy=False)
    return native[()] if native.ndim == 0 else native


def _text(element: object, name: str) -> str:
    if isinstance(element, str):
        return element
    if isinstance(element, bytes):
        try:
            return element.decode()
        except UnicodeDecodeError:
            raise RequestError(
                f"tensor {name!r} holds bytes that are not UTF-8 and cannot be sent as JSON; "
                "use binary data"
            ) from None
    raise GuardError(f"tensor {name!r}: BYTES element of type {type(element).__name__}")
