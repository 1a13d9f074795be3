"""``prada``: catch model extraction by the distribution of a client's query distances.

Runs on the response, since PRADA needs the class the model predicted
(:mod:`guard.defenses.prada`): per client and class, each query's minimum L2
distance to the client's earlier queries of that class; every ``every``
queries, once ``min_queries`` distances are held, a Shapiro-Wilk test on the newest
``max_distances`` of them. A finding with action ``deny`` withholds the answer (403).

Keys: :class:`PradaOptions` (docs/stage-options.md).

State: one *offset log* per client (and query width) of raw facts, each query's
values and its predicted class, and this process's :class:`~guard.defenses.prada.History`
of it (a :class:`~guard.state.views.LogView`: growing sets, distances, count), kept up
to date by :class:`~guard.state.views.LogViews`. A request is one ``append_log`` (one
Redis round trip), which returns the queries this process has not folded yet (other
replicas' first, then its own): each is folded in the log's order, so replicas
sharing a store derive the same state and decide as one process would, whichever
of them serves which request. The work is the request's own rows (one scan of the
growing set each), never a decode of the history. The log keeps the client's newest
``max_distances`` queries, or fewer as 1 MiB allows (at least ``min_queries``): a
process whose view fell behind it (evicted from this process's bounded views, or
other replicas served more than the log holds in between) rebuilds from the kept
queries, whose growing sets then start with them. The views are bounded as the
memory store bounds clients (its ``max_clients`` and ``max_bytes``), or to
:data:`VIEW_CLIENTS` and :data:`VIEW_BYTES` beside a shared store.

An exact repeat of a query the client's growing set holds (distance 0) is
skipped: it says nothing new and would read as non-natural. Finding: ``score`` W,
``threshold`` delta, technique AML.T0024.002 (extract ML model). Failure mode:
``on_error`` (default closed: 503 when the state store is down).
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.defenses.prada import History, record_dtype, shapiro_w
from guard.pipeline import Action, RequestContext, Verdict, ensure_prepared, take_prepared
from guard.stages.detector import Enforcement, MisdirectOptions, WidthViews, input_rows
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionsStage, option
from guard.stages.shared import OUTPUT_DOC, predicted
from guard.state import client_key
from guard.state.memory import MemoryStore

TECHNIQUE = "AML.T0024.002"  # Exfiltration via ML Inference API: Extract ML Model
# A client's query log holds at least its newest min_queries queries, more up to this size.
LOG_BYTES = 1 << 20
# This process's views of the logs of a shared store: at most these bytes and clients.
VIEW_BYTES = 64 << 20
VIEW_CLIENTS = 10_000


@dataclass(frozen=True, kw_only=True)
class PradaOptions(MisdirectOptions):
    action: Action = option(
        Action.FLAG,
        doc="what a finding does; `deny` withholds the answer (403); `misdirect`: the finding, "
        "on the response, marks the client and its later requests are misdirected",
    )
    output: str | None = option(None, names="output", doc=OUTPUT_DOC)
    delta: float = option(0.9, gt=0, lt=1, doc="flag when the Shapiro-Wilk W < delta")
    max_distances: int = option(1000, min=3, max=5000, doc="newest distances tested")
    min_queries: int = option(
        100, min=3, max="max_distances", doc="distances needed before the first test"
    )
    every: int = option(10, min=1, doc="test every this many queries")
    max_per_class: int = option(
        200, min=1, max=100_000, doc="newest members kept per class's growing set"
    )
    ttl: Duration = option(
        Duration(86400.0), doc="a client's history expires this long after its last query"
    )


class Prada(OptionsStage[PradaOptions]):
    name = "prada"
    changes_outputs = False  # reads the predicted class only
    Options = PradaOptions

    def __init__(self, options: PradaOptions, env: StageEnv) -> None:
        import scipy.stats  # noqa: F401  - slow (1-2 s): paid at load, not on a client's 100th query

        super().__init__(options, env)
        self.enforcement = Enforcement.of(options, env, stage=self.name, technique=TECHNIQUE)
        # This process's copies of its clients' histories, per query width (one log each),
        # bounded as the store bounds the logs when it is this process's memory (bytes,
        # and clients: each view counts at least its share), else to VIEW_BYTES and
        # VIEW_CLIENTS.
        store = env.store
        if isinstance(store, MemoryStore):
            self._view_bytes, clients = store.max_bytes, store.max_clients
        else:
            self._view_bytes, clients = VIEW_BYTES, VIEW_CLIENTS
        self._floor = self._view_bytes // clients
        self._views = WidthViews(self._history, self._view_bytes)  # the few widths last used

    async def prepare_request(self, ctx: RequestContext) -> None:
        name = self.options.input
        rows = input_rows(ctx, name) if self.enforcement.misdirects else None
        await self.enforcement.honour_marks(ctx, rows, name)

    async def prepare_response(self, ctx: RequestContext) -> None:
        if ctx.response is None:
            return
        o = self.options
        x = input_rows(ctx, o.input)
        found = predicted(ctx.response, x.shape[0], o.output)
        if found is None or x.shape[0] == 0:
            return
        n, dim = x.shape
        history = await self._views.of(dim).append(
            self.enforcement.store,
            self._key(ctx.client.name, "q", str(dim)),
            History.encode(x, found[0]),
            self._log_bytes(dim),
            o.ttl,
        )
        ctx.stage_state[self.name] = n, history.count, history.distances

    async def on_request(self, ctx: RequestContext) -> Verdict:
        await ensure_prepared(self, "prepare_request", ctx)
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        prepared = await take_prepared(self, "prepare_response", ctx)
        if prepared is None:  # no rows or classes, or the store failed and on_error is open
            return Verdict.CONTINUE
        o = self.options
        n, count, distances = prepared
        if distances.size < o.min_queries or (count - n) // o.every == count // o.every:
            return Verdict.CONTINUE
        w = shapiro_w(distances)
        if w >= o.delta:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"query distances of this client are not normally distributed "
            f"(Shapiro-Wilk W={w:.3f} over {distances.size} distances)",
            score=w,
            threshold=o.delta,
        )

    def _log_bytes(self, dim: int) -> int:
        """The log's bound: its newest ``max_distances`` queries, or as many as fit in
        :data:`LOG_BYTES` but at least ``min_queries`` (a whole number of records)."""
        o, size = self.options, record_dtype(dim).itemsize
        return max(o.min_queries, min(o.max_distances, LOG_BYTES // size)) * size

    def _history(self, dim: int) -> History:
        o = self.options
        return History(
            dim, max_per_class=o.max_per_class, max_distances=o.max_distances, floor=self._floor
        )

    def _key(self, client: str, *parts: str) -> str:
        return client_key(client, "prada", self.enforcement.model, *parts)
