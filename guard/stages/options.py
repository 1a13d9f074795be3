"""Stage options declared once: a frozen dataclass whose fields say how YAML reads them.

A stage's options are one ``@dataclass(frozen=True, kw_only=True)``; each field
is an :func:`option` (default, bounds, doc line). :func:`read_options` reads a
policy's section into it, :func:`describe_options` turns it back into what
``guard check`` prints, and :func:`option_rows` into the YAML-key reference
(``docs/stage-options.md``). The field's type says how its value is read:

===========================  ==============================================
``int``, ``float``, ``bool``  a number (bounds ``min``/``max``/``gt``/``lt``), a boolean
``str``                       a string; ``names="input"|"output"``: one of the model's
``Literal["a", "b"]``         one of those strings
``Action``                    an action (``choices`` narrows them)
``Duration``                  seconds: a number or ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``
``tuple[str, ...]``           a list of strings; ``tuple[int, ...]``: a shape (``-1`` any)
``tuple[float, float]``       ``[lo, hi]``, two finite numbers with ``lo < hi``
``tuple[float, ...]``         a list of finite numbers
an options dataclass          a nested mapping; ``tuple[Options, ...]``: a list of them
``X | None``                  absent (or ``null``) reads as ``None``
===========================  ==============================================

A key the stage no longer takes is listed in the class's ``REMOVED`` (key to the
message that says what to do instead). A bound may name an earlier field
(``max="history"``), and ``derive`` computes a default from the fields read before
it and the stage's environment (``dataclasses.MISSING``: none; then the field's default,
else the key is required). Rules across fields live in the dataclass's
``__post_init__``, which raises :class:`OptionError` naming the key: they hold for
options built in code too (the tuner's ``dataclasses.replace``).
Every message names file, path, constraint and value::

    policies/default.yaml: models.digits.stages[2].provenance.links must be <= 128; got 300
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, NewType, TypeVar

from guard.configreader import Section, show
from guard.pipeline import BaseStage

if TYPE_CHECKING:
    from guard.stages.env import StageEnv

Duration = NewType("Duration", float)
"""Seconds, written in YAML as a number or ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``."""

OptionsT = TypeVar("OptionsT")
StageT = TypeVar("StageT", bound="OptionsStage[Any]")
Bound = float | str | None  # a number, or the name of an earlier field
_KEY = "guard.option"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class OptionError(ValueError):
    """An option's value breaks a rule; ``key`` is the option (None: the whole section)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key or 'options'} {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class Rule:
    """How one field is read: bounds, choices, defaults derived from earlier fields."""

    doc: str
    min: Bound = None
    max: Bound = None
    gt: Bound = None
    lt: Bound = None
    choices: tuple[str, ...] | None = None  # for Action fields: the actions this stage takes
    names: Literal["input", "output"] | None = None  # the value names a model input/output
    derive: Callable[[Mapping[str, Any], Any], Any] | None = None
    shown: str | None = None  # the default as the docs print it, where not the value itself


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    min: Bound = None,
    max: Bound = None,
    gt: Bound = None,
    lt: Bound = None,
    choices: tuple[str, ...] | None = None,
    names: Literal["input", "output"] | None = None,
    derive: Callable[[Mapping[str, Any], Any], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """A field of an options dataclass (no default and no ``derive``: the key is required)."""
    rule = Rule(doc, min, max, gt, lt, choices, names, derive, shown)
    return dataclasses.field(default=default, metadata={_KEY: rule})


def read_options(cls: type[OptionsT], section: Section, env: StageEnv | None = None) -> OptionsT:
    """``cls`` read from ``section``; unknown keys and broken rules raise PolicyError.

    ``env``: the stage's model, for keys that name its inputs or outputs and defaults
    derived from it; None for sections outside a stage (``limits:``)."""
    for key, message in getattr(cls, "REMOVED", {}).items():
        if section.has(key):
            raise section.error(key, message)
    values: dict[str, Any] = {}
    hints = _hints(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        rule = _rule(field)
        if not section.has(field.name) or section.data[field.name] is None:
            section.str(field.name, None)  # mark as read
            derived = rule.derive(values, env) if rule.derive is not None else dataclasses.MISSING
            if derived is not dataclasses.MISSING:
                values[field.name] = derived
            elif field.default is not dataclasses.MISSING:
                values[field.name] = field.default
            elif not _optional(hints[field.name]):
                raise section.error(field.name, "is required")
            else:
                values[field.name] = None
            continue
        value = _read(section, field.name, hints[field.name], rule, values, env)
        values[field.name] = value
    section.finish()
    try:
        return cls(**values)
    except OptionError as exc:
        raise section.error(exc.key, exc.message) from None


def describe_options(options: Any) -> dict[str, Any]:
    """The options as ``guard check`` shows them: YAML keys, durations as written."""
    hints = _hints(type(options))
    return {
        field.name: _shown(getattr(options, field.name), hints[field.name])
        for field in dataclasses.fields(options)
    }


def option_rows(cls: type) -> list[tuple[str, str, str]]:
    """(key, default, doc) per field, for the YAML-key reference."""
    rows = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        rule = _rule(field)
        if rule.shown is not None:
            default = rule.shown
        elif field.default is not dataclasses.MISSING:
            shown = _shown(field.default, hints[field.name])
            default = "" if shown is None else f"`{_yaml(shown)}`"
        else:
            default = "required"
        rows.append((field.name, default, rule.doc))
    return rows


def to_yaml(value: Any, key: str | None = None) -> Any:
    """What a policy writes for ``value`` (with ``key``: for that option of the options
    ``value``), as :func:`read_options` reads it back: durations as ``1h``, tuples as
    lists, actions by name, options as a mapping of the keys that differ from defaults."""
    if key is not None:
        return _yaml_value(getattr(value, key), _hints(type(value))[key])
    return _yaml_value(value, None)


def _yaml_value(value: Any, hint: Any) -> Any:
    if value is not None and _strip_optional(hint) is Duration:
        return format_duration(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_yaml_value(v, None) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_yaml(value, f.name)
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != f.default
        }
    return value


# -- durations -----------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from a number or ``<n>ms|s|m|h|d``; ValueError naming the expected form."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ValueError(f"must be > 0; got {show(value)}")
        if not math.isfinite(value):
            raise ValueError("must be a finite duration")
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a duration such as 30s, 5m, 1h or 1d; got {show(value)}")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise ValueError(f"must be a positive duration; got {show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """``86400`` as ``1d``, ``5400`` as ``90m``: the unit a policy would use."""
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and (seconds / _UNITS[unit]).is_integer():
            return f"{int(seconds / _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


# -- reading one value -----------------------------------------------------------------


def _read(
    section: Section,
    key: str,
    hint: Any,
    rule: Rule,
    values: Mapping[str, Any],
    env: StageEnv | None,
) -> Any:
    hint = _strip_optional(hint)
    bounds = {b: _bound(getattr(rule, b), values) for b in ("min", "max", "gt", "lt")}
    raw = section.raw(key)
    if hint is Duration:
        try:
            seconds = parse_duration(raw)
        except ValueError as exc:
            raise section.error(key, str(exc)) from None
        _check_bounds(section, key, seconds, bounds, unit="s")
        return Duration(seconds)
    if hint is int:
        return section.int(key, min=bounds["min"], max=bounds["max"])
    if hint is float:
        return section.float(key, **bounds)
    if hint is bool:
        return section.bool(key)
    if hint is str:
        value = section.str(key)
        if rule.names is not None:
            _check_name(section, key, value, rule.names, env)
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        options = rule.choices or tuple(str(m.value) for m in hint)
        return hint(section.choice(key, options))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(raw, int) and not isinstance(raw, bool) and str(raw) in args:
            return str(section.int(key))  # YAML reads an unquoted 503 as a number
        return section.choice(key, args)
    if dataclasses.is_dataclass(hint):
        return _nested(section.child(key), hint, env)
    if origin is tuple:
        return _tuple(section, key, args, env)
    raise TypeError(f"option {key}: no reader for {hint!r}")


def _tuple(section: Section, key: str, args: tuple[Any, ...], env: StageEnv | None) -> Any:
    if args == (str, ...):
        return section.str_list(key)
    if args == (int, ...):
        return section.shape(key)
    if args == (float, ...):
        values = [value for _, value in section.section_list(key)]
        if not all(_finite(v) for v in values):
            raise section.error(key, f"must be a list of finite numbers; got {show(values)}")
        return tuple(float(v) for v in values)
    if args == (float, float):
        values = [value for _, value in section.section_list(key)]
        if len(values) != 2 or not all(_finite(v) for v in values):
            raise section.error(key, f"must be [lo, hi], two finite numbers; got {show(values)}")
        lo, hi = float(values[0]), float(values[1])
        if not lo < hi or not math.isfinite(hi - lo):
            raise section.error(key, f"needs lo < hi; got [{lo:g}, {hi:g}]")
        return (lo, hi)
    if len(args) == 2 and args[1] is ... and dataclasses.is_dataclass(args[0]):
        items = []
        for index, entry in section.section_list(key):
            item = Section(entry, source=section.source, path=f"{section.where(key)}[{index}]")
            items.append(_nested(item, args[0], env))
        return tuple(items)
    raise TypeError(f"option {key}: no reader for tuple{list(args)}")


def _nested(section: Section, cls: Any, env: StageEnv | None) -> Any:
    return read_options(cls, section, env)


def _check_name(
    section: Section, key: str, value: str, kind: Literal["input", "output"], env: StageEnv | None
) -> None:
    """An ``input``/``output`` value must name one of the model's, when they are known."""
    if env is None or env.metadata is None:
        return
    specs = env.metadata.inputs if kind == "input" else env.metadata.outputs
    known = [spec.name for spec in specs]
    if value not in known:
        raise section.error(key, f"names no {kind} of model {env.model}; it has {', '.join(known)}")


def _check_bounds(
    section: Section, key: str, value: float, bounds: Mapping[str, Any], *, unit: str = ""
) -> None:
    broken = {
        "min": lambda b: value < b,
        "max": lambda b: value > b,
        "gt": lambda b: value <= b,
        "lt": lambda b: value >= b,
    }
    signs = {"min": ">=", "max": "<=", "gt": ">", "lt": "<"}
    for name, sign in signs.items():
        if bounds[name] is not None and broken[name](bounds[name]):
            raise section.error(key, f"must be {sign} {bounds[name]:g}{unit}; got {value:g}{unit}")


def _bound(bound: Bound, values: Mapping[str, Any]) -> Any:
    return values[bound] if isinstance(bound, str) else bound


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- types ----------------------------------------------------------------------------


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of an options class (cached: read once per class)."""
    hints = _HINTS.get(cls)
    if hints is None:
        from guard.pipeline import Action
        from guard.stages.env import StageEnv

        names = {"Action": Action, "Duration": Duration, "StageEnv": StageEnv, "Literal": Literal}
        # each field resolves in the module of the class that declares it
        hints = _HINTS[cls] = typing.get_type_hints(cls, localns=names)
    return hints


def _rule(field: dataclasses.Field[Any]) -> Rule:
    rule = field.metadata.get(_KEY)
    if rule is None:
        raise TypeError(f"field {field.name} is not declared with option()")
    return rule


def _optional(hint: Any) -> bool:
    # ``float | None`` is a UnionType; ``Duration | None`` and ``Literal[...] | None`` a Union
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    return union and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _optional(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _shown(value: Any, hint: Any) -> Any:
    hint = _strip_optional(hint)
    if value is None:
        return None
    if hint is Duration:
        return format_duration(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return describe_options(value)
    if isinstance(value, tuple):
        return [describe_options(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


# -- stages built from options -----------------------------------------------------------


class OptionsStage(BaseStage, Generic[OptionsT]):
    """A stage built from its options dataclass ``Options`` and the :class:`StageEnv`.

    ``__init__(options, env)`` takes the options already read and checked; it may
    raise :class:`OptionError` for rules that need the environment (a secret, the
    model's metadata), reported against the policy like any other.
    """

    Options: ClassVar[type[Any]]

    def __init__(self, options: OptionsT, env: StageEnv) -> None:
        self.options = options
        self.fail_open = getattr(options, "on_error", "closed") == "open"

    @classmethod
    def from_config(cls: type[StageT], section: Section, env: StageEnv) -> StageT:
        return cls.from_options(read_options(cls.Options, section, env), env, section)

    @classmethod
    def from_options(cls: type[StageT], options: Any, env: StageEnv, where: Section) -> StageT:
        """The stage for options already read (a tuner's candidate); a rule that needs the
        environment is reported against ``where``, the policy's section of the stage."""
        try:
            return cls(options, env)
        except OptionError as exc:
            raise where.error(exc.key, exc.message) from None

    def describe(self) -> dict[str, Any]:
        return describe_options(self.options)
