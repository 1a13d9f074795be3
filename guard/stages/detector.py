"""What the query-pattern stages share: their common keys and acting on a finding.

Every detector takes :class:`DetectorOptions` (``input``, ``action``,
``degrade_for``, ``on_error``); those that can ``misdirect`` (``blacklight``,
``provenance``, ``prada``, ``coverage``) take :class:`MisdirectOptions` too
(docs/stage-options.md lists every key).

``degrade`` marks the client in the state store (``{client}:degrade:<model>``, one
mark per model shared by every detector): while the mark lives, each detector
whose action is ``degrade`` sets ``ctx.degraded`` at the start of the client's
requests, and the answer is weakened without telling the client (label-only
unless a stage such as ``privacy`` handles it, see :func:`guard.pipeline.label_only`).

``misdirect`` marks the client too (``{client}:misdirect:<model>``, for
``degrade_for``), and from the finding on answers each of its query rows as if it
were its *anchor* (:mod:`guard.defenses.misdirect`): status 200, same headers, same
stages and timing, only the backend sees other inputs. A row's anchor is the
earliest of the client's recent rows within ``radius``; the rows expire ``1h`` after
the last request, or twice ``degrade_for`` if longer. A marked client's rows are not
added: its anchors stay those it had when it was caught.

The rows are a byte log per client, model and row width
(``{client}:rows:<model>:<width>``, float32 records, the last ``history`` kept, at most
256 KiB), appended by the first misdirecting detector of a request with one
``append_bytes`` and never read while the client is unmarked. A marked client adds
none, so its rows stand still: each detector reads them once and answers from its copy
(:class:`AnchorCache`) for ``ANCHORS_FRESH_S`` before reading them again.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np

from guard.defenses.misdirect import anchor_rows
from guard.errors import RequestError
from guard.pipeline import ACTIONS, Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.options import Duration, option
from guard.stages.shared import request_input
from guard.state import StateStore, client_key
from guard.state.views import LogView, LogViews

__all__ = [
    "AnchorCache",
    "DetectorOptions",
    "Enforcement",
    "MisdirectOptions",
    "WidthViews",
    "input_rows",
]

ACTIONS_BUT_MISDIRECT = tuple(a for a in ACTIONS if a != Action.MISDIRECT.value)


@dataclass(frozen=True, kw_only=True)
class DetectorOptions:
    """The keys every detector takes; a stage narrows ``action`` and sets its default."""

    input: str | None = option(
        None, names="input", doc="the input to watch; default: the model's only input"
    )
    action: Action = option(Action.DENY, choices=ACTIONS_BUT_MISDIRECT, doc="what a finding does")
    degrade_for: Duration = option(
        Duration(600.0),
        doc="with `degrade` or `misdirect`, how long the client stays marked after a finding",
    )
    on_error: Literal["closed", "open"] = option(
        "closed",
        doc="`closed` refuses the request (503) when the stage or its state store fails; "
        "`open` serves it, flagged",
    )


@dataclass(frozen=True, kw_only=True)
class MisdirectOptions(DetectorOptions):
    """A detector that can ``misdirect``: the keys of its anchors."""

    action: Action = option(Action.DENY, doc="what a finding does")
    radius: float | None = option(
        None,
        gt=0,
        doc="with `misdirect`, a row's anchor is the earliest recent row of the client within "
        "this L2 distance; default: any distance",
    )
    history: int = option(
        256,
        min=1,
        max=100_000,
        doc="recent rows kept per client (at most 256 KiB a client)",
    )


def input_rows(ctx: RequestContext, name: str | None) -> np.ndarray:
    """The watched input as ``[batch, values]`` float32 (one query per row), read-only:
    made once per request and input, whichever detectors ask."""
    _, x = request_input(ctx, name, several="this model's detectors watch one input")
    made = ctx.stage_state.get("detector:rows")
    if made is not None and made[0] is x:
        return made[1]
    if x.ndim == 0 or x.dtype.kind not in "biuf":
        raise RequestError("inputs: detectors need a numeric batch")
    rows = np.asarray(x, dtype=np.float32).reshape(x.shape[0], math.prod(x.shape[1:]))
    rows.flags.writeable = False
    ctx.stage_state["detector:rows"] = (x, rows)
    return rows


HISTORY_BYTES = 256 << 10  # misdirection anchors kept per client and model, at most
_HISTORY_ROW = np.dtype("<f4")
VIEW_BYTES = 64 << 20  # this process's views of one stage's logs of one row width, at most
WIDTHS = 4  # row widths whose views a stage keeps (a model has one, usually)

V = TypeVar("V", bound=LogView)


class WidthViews(Generic[V]):
    """A stage's :class:`~guard.state.views.LogViews`, one per row width (records of one
    width a log), the ``WIDTHS`` most recently used kept; ``make(width)`` makes a view."""

    def __init__(self, make: Callable[[int], V], max_bytes: int = VIEW_BYTES) -> None:
        self._make, self.max_bytes = make, max_bytes
        self._views: OrderedDict[int, LogViews[V]] = OrderedDict()

    def of(self, width: int) -> LogViews[V]:
        views = self._views.get(width)
        if views is None:
            views = self._views[width] = LogViews(
                lambda: self._make(width), max_bytes=self.max_bytes
            )
            if len(self._views) > WIDTHS:
                self._views.popitem(last=False)
        self._views.move_to_end(width)
        return views

    def values(self) -> list[LogViews[V]]:
        """The views kept, one per width, the most recently used last."""
        return list(self._views.values())


ANCHORS_FRESH_S = 10.0  # how long a detector answers a marked client from rows it read


class AnchorCache:
    """This process's copies of marked clients' rows (``[n, width]`` float32, oldest
    first), each used for ``fresh_s`` after it was read, ``max_bytes`` of them at most
    (the least recently used go first).

    A marked client adds no rows, so its log stands still and one read serves it: in
    process, a misdirected request costs a dictionary look-up, not the log's bytes. The
    bound on age covers the one case where the log moved: the mark lapsed, the client
    sent new rows through another replica and was marked again (an unmarked client's
    request through this process drops its copy at once)."""

    def __init__(self, max_bytes: int, fresh_s: float = ANCHORS_FRESH_S) -> None:
        self.max_bytes, self.fresh_s = max_bytes, fresh_s
        self._held: OrderedDict[str, tuple[float, np.ndarray]] = OrderedDict()
        self._nbytes = 0

    def get(self, key: str) -> np.ndarray | None:
        held = self._held.get(key)
        if held is None:
            return None
        if time.monotonic() - held[0] > self.fresh_s:
            self.drop(key)
            return None
        self._held.move_to_end(key)
        return held[1]

    def put(self, key: str, rows: np.ndarray) -> None:
        self.drop(key)
        self._held[key] = (time.monotonic(), rows)
        self._nbytes += rows.nbytes
        while self._nbytes > self.max_bytes and len(self._held) > 1:
            _, (_, dropped) = self._held.popitem(last=False)
            self._nbytes -= dropped.nbytes

    def drop(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._nbytes -= held[1].nbytes


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
    # this process's copies of marked clients' rows (made here, never passed)
    anchors: AnchorCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchors", AnchorCache(VIEW_BYTES))

    @classmethod
    def of(
        cls, options: DetectorOptions, env: StageEnv, *, stage: str, technique: str
    ) -> Enforcement:
        """The enforcement a detector's options ask for, on the env's state store."""
        anchors = options if isinstance(options, MisdirectOptions) else None
        return cls(
            stage=stage,
            model=env.model,
            action=options.action,
            degrade_for=options.degrade_for,
            technique=technique,
            store=env.store,
            radius=anchors.radius if anchors else None,
            history=anchors.history if anchors else 256,
        )

    @property
    def misdirects(self) -> bool:
        return self.action is Action.MISDIRECT

    @property
    def acts_on_requests(self) -> bool:
        """Whether :meth:`honour_marks` has anything to do (a degrade or misdirect mark)."""
        return self.action in (Action.DEGRADE, Action.MISDIRECT)

    def mark_key(self, client: str) -> str:
        return client_key(client, "degrade", self.model)

    def misdirect_key(self, client: str) -> str:
        return client_key(client, "misdirect", self.model)

    def rows_key(self, client: str, width: int) -> str:
        return client_key(client, "rows", self.model, str(width))

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

    def _ttl(self) -> float:
        return max(2 * self.degrade_for, 3600.0)

    def _append(self, ctx: RequestContext, rows: np.ndarray) -> Awaitable[int]:
        """Append ``rows`` to the client's remembered rows."""
        width = rows.shape[1]
        key = self.rows_key(ctx.client.name, width)
        self.anchors.drop(key)
        data = np.ascontiguousarray(rows, dtype=_HISTORY_ROW).tobytes()
        return self.store.append_bytes(key, data, self._cap(width) * width * 4, self._ttl())

    async def _remember(self, ctx: RequestContext, rows: np.ndarray) -> None:
        """Append the request's rows to the client's history (once per request)."""
        if ctx.stage_state.get("misdirect:remembered") or not len(rows):
            return
        ctx.stage_state["misdirect:remembered"] = True
        await self._append(ctx, rows)

    async def _history(self, ctx: RequestContext, width: int) -> np.ndarray:
        """The client's remembered rows of ``width`` values, oldest first (the last
        ``history`` of them), from this process's copy while it is fresh."""
        key = self.rows_key(ctx.client.name, width)
        rows = self.anchors.get(key)
        if rows is None:
            data = await self.store.read_bytes(key)
            size = width * _HISTORY_ROW.itemsize
            kept = len(data) // size  # whole records (a log always holds whole ones)
            rows = np.frombuffer(data, _HISTORY_ROW, kept * width).reshape(kept, width)
            if kept > self._cap(width):  # a log holds up to a quarter more before its trim
                rows = rows[-self._cap(width) :].copy()  # (the copy lets the rest go)
            self.anchors.put(key, rows)
        return rows

    async def _misdirect(
        self, ctx: RequestContext, rows: np.ndarray, input_name: str | None
    ) -> int:
        """Answer this request from the rows' anchors (see :mod:`guard.defenses.misdirect`);
        return how many rows that changed (0: the request goes through as sent)."""
        history = await self._history(ctx, rows.shape[1])
        if not len(history):  # nothing remembered (expired): this request's rows become them
            await self._append(ctx, rows)
            return 0
        anchors = anchor_rows(history, rows, self.radius)
        changed = int(np.any(anchors != np.asarray(rows, dtype=np.float32), axis=1).sum())
        if changed:
            name = input_name if input_name is not None else next(iter(ctx.request.inputs))
            original = ctx.request.inputs[name]
            ctx.substitute = {name: anchors.reshape(original.shape).astype(original.dtype)}
        return changed
