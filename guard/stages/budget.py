"""``budget``: per-client query quotas over one or more fixed windows.

Query-based attacks need thousands of queries; a quota makes each one cost
time (or accounts). Each limit is a fixed-window counter per client and model
(:meth:`guard.state.base.StateStore.incr`): the window opens at the client's
first query and resets ``per`` later. A request over any limit is refused with
429 and ``Retry-After`` (the time until the latest of the exceeded windows
resets). Refused queries count too, so a client that keeps hammering stays refused.

YAML keys:

``limits``   required, a list of ``{queries: N, per: DURATION}``, e.g.
             ``[{queries: 100, per: 1s}, {queries: 10000, per: 1d}]``; durations
             are seconds or strings such as ``30s``, ``5m``, ``1h``, ``1d``
``count``    ``rows`` (default: every sample of a batch is a query) or ``requests``
``action``   default ``deny`` (429); ``flag``, ``degrade``, ``shadow`` serve the
             request and record the finding; ``degrade_for``, ``on_error``: see
             :mod:`guard.stages.detector`

Finding: ``score`` the count in the exceeded window, ``threshold`` its limit,
technique AML.T0040 (ML model inference API access).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from guard.configreader import Section
from guard.errors import RateLimited
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import (
    Enforcement,
    format_duration,
    read_duration,
    read_enforcement,
    read_fail_open,
)
from guard.stages.env import StageEnv
from guard.state import client_key

TECHNIQUE = "AML.T0040"  # AI Model Inference API Access


@dataclass(frozen=True, slots=True)
class Limit:
    queries: int
    per: float  # seconds


class Budget(BaseStage):
    name = "budget"

    def __init__(
        self, *, limits: tuple[Limit, ...], rows: bool, enforcement: Enforcement, fail_open: bool
    ) -> None:
        self.limits = limits
        self.rows = rows
        self.enforcement = enforcement
        self.fail_open = fail_open

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Budget:
        limits: list[Limit] = []
        for index, entry in section.section_list("limits"):
            item = Section(entry, source=section.source, path=f"{section.where('limits')}[{index}]")
            limit = Limit(queries=item.int("queries", min=1), per=read_duration(item, "per", None))
            item.finish()
            if any(other.per == limit.per for other in limits):
                raise item.error("per", f"repeats the window {format_duration(limit.per)}")
            limits.append(limit)
        if not limits:
            raise section.error("limits", "must list at least one {queries: N, per: DURATION}")
        stage = cls(
            limits=tuple(limits),
            rows=section.choice("count", ("rows", "requests"), "rows") == "rows",
            enforcement=read_enforcement(
                section, env, stage=cls.name, technique=TECHNIQUE, default=Action.DENY
            ),
            fail_open=read_fail_open(section),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "limits": [{"queries": q.queries, "per": format_duration(q.per)} for q in self.limits],
            "count": "rows" if self.rows else "requests",
            **self.enforcement.describe(),
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        await self.enforcement.honour_marks(ctx)
        amount = _rows(ctx) if self.rows else 1
        store, client, model = self.enforcement.store, ctx.client.name, self.enforcement.model
        counts = await asyncio.gather(
            *(
                store.incr(
                    client_key(client, "budget", model, f"{round(q.per * 1000)}ms"), amount, q.per
                )
                for q in self.limits
            )
        )
        exceeded = [
            (q, n, reset)
            for q, (n, reset) in zip(self.limits, counts, strict=True)
            if n > q.queries
        ]
        if not exceeded:
            return Verdict.CONTINUE
        limit, count, _ = exceeded[0]
        retry_after = max(reset for _, _, reset in exceeded)
        message = (
            f"query budget exhausted: {count} of {limit.queries} queries per "
            f"{format_duration(limit.per)}; retry in {retry_after:.0f} s"
        )
        verdict = await self.enforcement.report(
            ctx, message, score=float(count), threshold=float(limit.queries)
        )
        if verdict is Verdict.DENY:
            raise RateLimited(message, retry_after=retry_after)
        return verdict


def _rows(ctx: RequestContext) -> int:
    """Samples in the request: the largest batch dimension among its inputs (at least 1)."""
    return max((int(x.shape[0]) for x in ctx.request.inputs.values() if x.ndim), default=1) or 1
