"""What the query-pattern stages share: durations, the state store, and acting on a finding.

Every detector (``blacklight``, ``prada``, ``budget``) takes these YAML keys:

``action``       ``flag``, ``degrade``, ``deny``, ``shadow`` or ``allow`` (each stage
                 names its default)
``degrade_for``  with ``action: degrade``, how long the client stays degraded after a
                 finding; a duration, default ``10m``
``on_error``     ``closed`` (default) refuses the request with 503 when the stage or
                 its state store fails; ``open`` serves it, flagged

``misdirect`` (stages that support it: ``blacklight``, ``provenance``, ``prada``,
``coverage``) marks the client too (``{client}:misdirect:<model>``, for
``degrade_for``), and from the finding on answers each of its query rows as if it were its *anchor*
(:mod:`guard.defenses.misdirect`): status 200, same headers, same stages and
timing, only the backend sees other inputs. Keys of misdirecting detectors:

``radius``       a row's anchor is the earliest of the client's recent rows within this
                 L2 distance (input units); default: any distance (the oldest row held)
``history``      recent rows kept per client for anchors; default 256 (fewer for wide
                 inputs: at most 256 KiB a client); they expire ``1h`` after the last
                 request, or twice ``degrade_for`` if longer. A marked client's rows
                 are not added: its anchors stay those it had when it was caught

``degrade`` marks the client in the state store (``{client}:degrade:<model>``, one
mark per model shared by every detector): while the mark lives, each detector
whose action is ``degrade`` sets ``ctx.degraded`` at the start of the client's
requests, and the answer is weakened without telling the client (label-only
unless a stage such as ``privacy`` handles it, see :func:`guard.pipeline.label_only`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.configreader import Section
from guard.defenses.misdirect import anchor_rows
from guard.errors import RequestError
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv, read_action
from guard.state import StateStore, client_key

__all__ = ["Enforcement", "input_rows", "read_duration", "read_input", "state_of"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def read_duration(section: Section, key: str, default: float | None) -> float:
    """A positive duration in seconds: a number, or a string such as ``500ms``, ``30s``, ``1d``.

    ``default`` ``None``: the key is required.
    """
    if not isinstance(section.data.get(key), str):
        seconds = float(
            section.float(key, gt=0) if default is None else section.float(key, default, gt=0)
        )
        if seconds == float("inf"):
            raise section.error(key, "must be a finite duration")
        return seconds
    text = section.str(key)
    match = _DURATION.match(text)
    if match is None:
        raise section.error(key, f"must be a duration such as 30s, 5m, 1h or 1d; got {text!r}")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise section.error(key, f"must be a positive duration; got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and (seconds / _UNITS[unit]).is_integer():
            return f"{int(seconds / _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def state_of(env: StageEnv) -> StateStore:
    """The runtime's state store; a private in-memory one for a stage built on its own."""
    if env.state is not None:
        return env.state
    from guard.state.memory import MemoryStore

    return MemoryStore()


def read_input(section: Section, env: StageEnv) -> str | None:
    """The ``input`` key: the input a detector watches (default: the model's only input)."""
    name = section.str("input", None)
    if name is not None and env.metadata is not None:
        known = [spec.name for spec in env.metadata.inputs]
        if name not in known:
            raise section.error(
                "input", f"names no input of model {env.model}; it has {', '.join(known)}"
            )
    return name


def input_rows(ctx: RequestContext, name: str | None) -> np.ndarray:
    """The watched input as ``[batch, values]`` float32 (one query per row)."""
    inputs = ctx.request.inputs
    if name is None:
        if len(inputs) != 1:
            raise RequestError(
                f"inputs: this model's detectors watch one input; got {len(inputs)} "
                "(name it with the stage's input key)"
            )
        (x,) = inputs.values()
    elif name in inputs:
        x = inputs[name]
    else:
        raise RequestError(f"inputs: input {name!r} is required")
    if x.ndim == 0 or x.dtype.kind not in "biuf":
        raise RequestError("inputs: detectors need a numeric batch")
    return np.asarray(x, dtype=np.float32).reshape(x.shape[0], int(np.prod(x.shape[1:])))


HISTORY_BYTES = 256 << 10  # misdirection anchors kept per client and model, at most
_HISTORY_ROW = np.dtype("<f4")


@dataclass(frozen=True, kw_only=True, slots=True)
class Enforcement:
    """A detector's action, its degrade and misdirect marks, and the finding's ATLAS technique."""

    stage: str
    model: str
    action: Action
    degrade_for: float
    technique: str | None
    store: StateStore
    radius: float | None = None
    history: int = 256

    @classmethod
    def read(
        cls,
        section: Section,
        env: StageEnv,
        *,
        stage: str,
        technique: str | None,
        default: Action,
        misdirect: bool = False,
    ) -> Enforcement:
        action = read_action(section, default, misdirect=misdirect)
        radius = history = None
        if misdirect:
            radius = section.float("radius", None, gt=0)
            history = section.int("history", 256, min=1, max=100_000)
        return cls(
            stage=stage,
            model=env.model,
            action=action,
            degrade_for=read_duration(section, "degrade_for", 600.0),
            technique=technique,
            store=state_of(env),
            radius=radius,
            history=history or 256,
        )

    @property
    def misdirects(self) -> bool:
        return self.action is Action.MISDIRECT

    def mark_key(self, client: str) -> str:
        return client_key(client, "degrade", self.model)

    def misdirect_key(self, client: str) -> str:
        return client_key(client, "misdirect", self.model)

    def rows_key(self, client: str) -> str:
        return client_key(client, "rows", self.model)

    async def honour_marks(
        self, ctx: RequestContext, rows: np.ndarray | None = None, input_name: str | None = None
    ) -> None:
        """At a request's start: degrade a client a finding has marked; with ``misdirect``
        (``rows``: the watched input's rows), remember the rows and misdirect a marked client."""
        if self.action is Action.DEGRADE:
            if not ctx.degraded and await self.store.marked(self.mark_key(ctx.client.name)):
                ctx.degraded = True
        elif self.action is Action.MISDIRECT and rows is not None:
            if ctx.stage_state.get("misdirect:checked"):
                return  # another misdirecting detector of this model already did
            ctx.stage_state["misdirect:checked"] = True
            if await self.store.marked(self.misdirect_key(ctx.client.name)):
                # The anchors stay as they were at the mark: a marked client's rows are
                # not remembered, so its answers stay consistent however long it goes on.
                ctx.stage_state["misdirect:remembered"] = True
                changed = await self._misdirect(ctx, rows, input_name)
                if changed:  # what was done, for the operators (the client sees nothing)
                    ctx.report(
                        self.stage,
                        Action.MISDIRECT,
                        f"client marked by an earlier finding: {changed} of {len(rows)} "
                        "rows answered from their anchors",
                        technique=self.technique,
                    )
            else:
                await self._remember(ctx, rows)

    async def report(
        self,
        ctx: RequestContext,
        message: str,
        *,
        score: float,
        threshold: float,
        rows: np.ndarray | None = None,
        input_name: str | None = None,
    ) -> Verdict:
        """Record the finding, act on it, and return the verdict its action calls for."""
        verdict = ctx.report(
            self.stage,
            self.action,
            message,
            score=score,
            threshold=threshold,
            technique=self.technique,
        )
        taken = ctx.findings[-1].action
        if taken is Action.DEGRADE:
            await self.store.mark(self.mark_key(ctx.client.name), self.degrade_for)
        elif taken is Action.MISDIRECT:
            await self.store.mark(self.misdirect_key(ctx.client.name), self.degrade_for)
            if rows is not None and ctx.substitute is None:
                await self._misdirect(ctx, rows, input_name)
        return verdict

    def _cap(self, width: int) -> int:
        return max(8, min(self.history, HISTORY_BYTES // max(1, width * _HISTORY_ROW.itemsize)))

    async def _remember(self, ctx: RequestContext, rows: np.ndarray) -> None:
        """Append the request's rows to the client's history (once per request)."""
        if ctx.stage_state.get("misdirect:remembered") or not len(rows):
            return
        ctx.stage_state["misdirect:remembered"] = True
        items = [np.asarray(r, dtype=_HISTORY_ROW).tobytes() for r in rows]
        ttl = max(2 * self.degrade_for, 3600.0)
        await self.store.push(self.rows_key(ctx.client.name), items, self._cap(rows.shape[1]), ttl)

    async def _misdirect(
        self, ctx: RequestContext, rows: np.ndarray, input_name: str | None
    ) -> int:
        """Answer this request from the rows' anchors (see :mod:`guard.defenses.misdirect`);
        return how many rows that changed (0: the request goes through as sent)."""
        width = rows.shape[1]
        held = [
            np.frombuffer(item, dtype=_HISTORY_ROW)
            for item in await self.store.items(self.rows_key(ctx.client.name))
        ]
        held = [h for h in held if h.size == width]
        if not held:  # nothing remembered (expired): this request's rows become the anchors
            await self.store.push(
                self.rows_key(ctx.client.name),
                [np.asarray(r, dtype=_HISTORY_ROW).tobytes() for r in rows],
                self._cap(width),
                max(2 * self.degrade_for, 3600.0),
            )
        history = np.stack(held) if held else np.zeros((0, width), dtype=np.float32)
        anchors = anchor_rows(history, rows, self.radius)
        changed = int(np.any(anchors != np.asarray(rows, dtype=np.float32), axis=1).sum())
        if changed:
            name = input_name if input_name is not None else next(iter(ctx.request.inputs))
            original = ctx.request.inputs[name]
            ctx.substitute = {name: anchors.reshape(original.shape).astype(original.dtype)}
        return changed

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"action": self.action.value, "technique": self.technique}
        if self.action in (Action.DEGRADE, Action.MISDIRECT):
            described["degrade_for"] = format_duration(self.degrade_for)
        if self.action is Action.MISDIRECT:
            described["radius"] = self.radius
            described["history"] = self.history
        return described
