"""Typed, path-aware reading of YAML mappings.

Every value a policy holds is read through a :class:`Section`, so every message
names the file, the path inside it, the constraint and the value::

    policies/default.yaml: models.digits.stages[2].certify.sigma must be > 0; got -0.5

A section remembers the keys it handed out; :meth:`Section.finish` rejects the
rest, so a misspelt key stops the load instead of being silently ignored.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from guard.errors import PolicyError

T = TypeVar("T")
_MISSING: Any = object()


class Section:
    """A mapping read key by key, with the location of each key for messages."""

    def __init__(self, data: Any, *, source: builtins.str, path: builtins.str = "") -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: {path or 'document'} must be a mapping; got {show(data)}")
        self.data: Mapping[builtins.str, Any] = data
        self.source = source
        self.path = path
        self._read: set[builtins.str] = set()

    # -- locations and errors -------------------------------------------------
    def where(self, key: builtins.str | None = None) -> builtins.str:
        if key is None:
            return self.path or "document"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: builtins.str | None, message: builtins.str) -> PolicyError:
        return PolicyError(f"{self.source}: {self.where(key)} {message}")

    def child(self, key: builtins.str, *, required: builtins.bool = False) -> Section:
        value = self._get(key, {} if not required else _MISSING)
        return Section(value, source=self.source, path=self.where(key))

    def section_list(self, key: builtins.str) -> Iterator[tuple[builtins.int, Any]]:
        items = self._get(key, [])
        if not isinstance(items, list):
            raise self.error(key, f"must be a list; got {show(items)}")
        yield from enumerate(items)

    def raw(self, key: builtins.str) -> Any:
        """The key's value as written (None when absent), counted as read."""
        self._read.add(key)
        return self.data.get(key)

    def variable(
        self, key: builtins.str, name: builtins.str, environ: Mapping[builtins.str, builtins.str]
    ) -> builtins.str:
        """The value of environment variable ``name``, which ``key`` names; an error if unset."""
        value = environ.get(name)
        if not value:
            raise self.error(key, f"names environment variable {name}, which is not set")
        return value

    def has(self, key: builtins.str) -> builtins.bool:
        return key in self.data

    def names(self) -> list[builtins.str]:
        """Every key of this mapping (all count as read: for sections of user-chosen names)."""
        self._read.update(self.data)
        return [str(k) for k in self.data]

    def finish(self) -> None:
        unknown = [str(k) for k in self.data if k not in self._read]
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise PolicyError(
                f"{self.source}: {self.where()} has unknown key(s) {', '.join(unknown)}; "
                f"known here: {known}"
            )

    # -- typed getters ---------------------------------------------------------
    def _get(self, key: builtins.str, default: Any) -> Any:
        self._read.add(key)
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return default

    def str(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            raise self.error(key, f"must be a string; got {show(value)}")
        return value

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            raise self.error(key, f"must be true or false; got {show(value)}")
        return value

    def int(
        self,
        key: builtins.str,
        default: Any = _MISSING,
        *,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
    ) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer; got {show(value)}")
        self._bounds(key, value, min, max, inclusive=True)
        return value

    def float(
        self,
        key: builtins.str,
        default: Any = _MISSING,
        *,
        min: builtins.float | None = None,
        max: builtins.float | None = None,
        gt: builtins.float | None = None,
        lt: builtins.float | None = None,
    ) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(key, f"must be a number; got {show(value)}")
        value = float(value)
        self._bounds(key, value, min, max, inclusive=True)
        self._bounds(key, value, gt, lt, inclusive=False)
        return value

    def choice(
        self, key: builtins.str, options: Sequence[builtins.str], default: Any = _MISSING
    ) -> Any:
        value = self._get(key, default)
        if value is not default and value not in options:
            raise self.error(key, f"must be one of {', '.join(options)}; got {show(value)}")
        return value

    def str_list(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings; got {show(value)}")
        return tuple(value)

    def shape(self, key: builtins.str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in value
        ):
            raise self.error(key, f"must be a list of sizes (-1 for any); got {show(value)}")
        return tuple(value)

    def _bounds(
        self,
        key: builtins.str,
        value: builtins.float,
        lo: Any,
        hi: Any,
        *,
        inclusive: builtins.bool,
    ) -> None:
        ge, le = (">=", "<=") if inclusive else (">", "<")
        if lo is not None and (value < lo if inclusive else value <= lo):
            raise self.error(key, f"must be {ge} {lo}; got {show(value)}")
        if hi is not None and (value > hi if inclusive else value >= hi):
            raise self.error(key, f"must be {le} {hi}; got {show(value)}")


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
