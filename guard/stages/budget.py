"""``budget``: per-client query quotas over one or more fixed windows.

Query-based attacks need thousands of queries; a quota makes each one cost
time (or accounts). Each limit is a fixed-window counter per client and model
(:meth:`guard.state.base.StateStore.incr`): the window opens at the client's
first query and resets ``per`` later. A request over any limit is refused with
429 and ``Retry-After`` (the time until the latest of the exceeded windows
resets). Refused queries count too, so a client that keeps hammering stays refused.

Keys: :class:`BudgetOptions` (docs/stage-options.md).

Finding: ``score`` the count in the exceeded window, ``threshold`` its limit,
technique AML.T0040 (ML model inference API access). Failure mode: ``on_error``
(default closed: 503 when the state store is down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from guard.errors import RateLimited
from guard.pipeline import RequestContext, Verdict, take_prepared
from guard.stages.detector import DetectorOptions, Enforcement
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionError, OptionsStage, format_duration, option
from guard.state import client_key, together

TECHNIQUE = "AML.T0040"  # AI Model Inference API Access


@dataclass(frozen=True, kw_only=True)
class LimitOptions:
    queries: int = option(min=1, doc="queries allowed per window")
    per: Duration = option(doc="the window: seconds, or `500ms`, `30s`, `5m`, `1h`, `1d`")


@dataclass(frozen=True, kw_only=True)
class BudgetOptions(DetectorOptions):
    input: str | None = option(
        None,
        names="input",
        doc="with `count: rows`, the input whose batch counts; default: the largest batch",
    )
    limits: tuple[LimitOptions, ...] = option(
        (),
        shown="required",
        doc="a list of `{queries: N, per: DURATION}`, each window once, e.g. "
        "`[{queries: 100, per: 1s}, {queries: 10000, per: 1d}]`; `deny` answers 429",
    )
    count: Literal["rows", "requests"] = option(
        "rows", doc="`rows`: every sample of a batch is a query; `requests`: each request is one"
    )

    def __post_init__(self) -> None:
        if not self.limits:
            raise OptionError("limits", "must list at least one {queries: N, per: DURATION}")
        for index, limit in enumerate(self.limits):
            if any(other.per == limit.per for other in self.limits[:index]):
                raise OptionError(
                    f"limits[{index}].per", f"repeats the window {format_duration(limit.per)}"
                )


class Budget(OptionsStage[BudgetOptions]):
    name = "budget"
    Options = BudgetOptions

    def __init__(self, options: BudgetOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        self.enforcement = Enforcement.of(options, env, stage=self.name, technique=TECHNIQUE)
        # each window's key suffix and length, made once
        self._windows = [(f"{round(q.per * 1000)}ms", q.per) for q in options.limits]

    async def prepare_request(self, ctx: RequestContext) -> None:
        await self.enforcement.honour_marks(ctx)
        amount = self._rows(ctx) if self.options.count == "rows" else 1
        store, client, model = self.enforcement.store, ctx.client.name, self.enforcement.model
        ctx.stage_state[self.name] = await together(
            store,
            *(
                store.incr(client_key(client, "budget", model, window), amount, per)
                for window, per in self._windows
            ),
        )

    async def on_request(self, ctx: RequestContext) -> Verdict:
        counts = await take_prepared(self, "prepare_request", ctx)
        if counts is None:  # the store failed and on_error is open: served, flagged
            return Verdict.CONTINUE
        limits = self.options.limits
        exceeded = [
            (q, n, reset) for q, (n, reset) in zip(limits, counts, strict=True) if n > q.queries
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

    def _rows(self, ctx: RequestContext) -> int:
        """Samples in the request: the watched input's batch, else the largest batch dimension
        among its inputs (at least 1)."""
        inputs = ctx.request.inputs
        if self.options.input is not None and self.options.input in inputs:
            inputs = {self.options.input: inputs[self.options.input]}
        return max((int(x.shape[0]) for x in inputs.values() if x.ndim), default=1) or 1
