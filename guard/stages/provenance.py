"""``provenance``: catch attacks whose queries descend from one another, however randomized.

Per client, each query row is linked to the client's nearest earlier row in
input space (:mod:`guard.defenses.provenance`, after QPA). Fresh random
transforms (OARS-style attacks resampling until a hash-based detector lets them
through) do not break a link unless they move the query farther than
``distance``, which also wrecks the attack's own progress (docs/detection.md
measures it). Exact repeats are free: identical to an earlier row, they are
neither evidence nor stored again.

Keys: :class:`ProvenanceOptions` (docs/stage-options.md).

Finding: ``score`` the rows of the longest chain the request joined, ``threshold``
``links``, the message the nearest distance. Technique AML.T0043. Failure mode:
``on_error`` (default closed: 503 when the state store is down).

State: per client and row width an offset log of its rows
(``{client}:provenance:<model>:<width>``, float16 records, the last ``history`` kept,
expiring ``ttl`` after the last query) and, in this process, a
:class:`~guard.defenses.provenance.ChainView` of it kept by
:class:`~guard.state.views.LogViews`. A request costs one ``append_log`` (one round
trip, overlapping those of the misdirection marks) and folds only the records this
process had not seen: other replicas' rows since its last request, then its own, in the
log's order, so every replica derives the same chains (named by the rows that start
them, never drawn at random). A view this process lost (evicted, the log trimmed past
it, expired) is rebuilt from the kept log: a chain whose first rows were trimmed then
restarts at its oldest kept row, which can only lower a count. Rows the view already
holds are not appended (a repeat another replica sent meanwhile is appended, and folded
as a repeat: nothing). Rows float16 cannot hold (NaN, beyond +-65504) are never linked.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.defenses.provenance import ROW, ChainView, canonical
from guard.pipeline import RequestContext, Verdict, take_prepared
from guard.stages import scale
from guard.stages.detector import (
    HISTORY_BYTES,
    Enforcement,
    MisdirectOptions,
    WidthViews,
    input_rows,
)
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionsStage, option
from guard.state import client_key, together
from guard.state.views import LogViews

TECHNIQUE = "AML.T0043"  # Craft Adversarial Data


@dataclass(frozen=True, kw_only=True)
class ProvenanceOptions(MisdirectOptions):
    history: int = option(
        128,
        min=2,
        max=100_000,
        doc="rows kept per client, stored as float16 (at most 256 KiB a client)",
    )
    distance: float = option(
        gt=0,
        derive=scale.distance,
        shown="`3/64 x (max - min) x sqrt(size)` of the declared input, else required",
        doc="a row is *linked* when an earlier row of the client lies within this L2 "
        "distance, in input units; keep it below the distance between distinct honest inputs "
        "(the default, 3/64 of the input space's diameter, is 6.0 on the digits demo)",
    )
    links: int = option(
        8,
        min=2,
        max="history",
        doc="flag when one chain of linked rows of the client holds this many of its recent rows",
    )
    ttl: Duration = option(
        Duration(3600.0), doc="a client's rows expire this long after its last query"
    )


class Provenance(OptionsStage[ProvenanceOptions]):
    name = "provenance"
    Options = ProvenanceOptions

    def __init__(self, options: ProvenanceOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        self.enforcement = Enforcement.of(options, env, stage=self.name, technique=TECHNIQUE)
        # Per row width: this process's views of the clients' logs (a row a view already
        # holds is a repeat: it is left out before appending).
        self._views = WidthViews(lambda width: ChainView(width, self.cap(width), options.distance))

    def key(self, client: str, width: int) -> str:
        return client_key(client, "provenance", self.enforcement.model, str(width))

    def cap(self, width: int) -> int:
        """Rows kept per client at ``width`` values a row."""
        return max(8, min(self.options.history, HISTORY_BYTES // (ROW.itemsize * width)))

    def views(self, width: int) -> LogViews[ChainView]:
        """This process's views of the logs of ``width``-value rows."""
        return self._views.of(width)

    async def prepare_request(self, ctx: RequestContext) -> None:
        o = self.options
        rows = input_rows(ctx, o.input)
        marks = self.enforcement.honour_marks(ctx, rows, o.input)
        width = rows.shape[1]
        key = self.key(ctx.client.name, width)
        size = ROW.itemsize * width
        data = canonical(rows).tobytes()
        known = self.views(width).peek(key)
        fresh: dict[bytes, None] = {}  # the rows to append: neither kept nor earlier in the batch
        for i in range(0, len(data), size):
            record = data[i : i + size]
            if known is None or known.find(record) < 0:
                fresh[record] = None
        if not fresh:
            await marks
            return
        append = data if len(fresh) * size == len(data) else b"".join(fresh)
        store = self.enforcement.store
        appended = self.views(width).append(store, key, append, self.cap(width) * size, o.ttl)
        _, view = await together(store, marks, appended)  # a remote store: round trips overlap
        ctx.stage_state[self.name] = view, fresh

    async def on_request(self, ctx: RequestContext) -> Verdict:
        prepared = await take_prepared(self, "prepare_request", ctx)
        if prepared is None:  # nothing new, or the store failed and on_error is open
            return Verdict.CONTINUE
        view, fresh = prepared
        o = self.options
        rows = input_rows(ctx, o.input)
        score, nearest = 0, float("inf")
        for record in fresh:
            slot = view.find(record)
            if slot >= 0 and view.linked[slot]:
                score = max(score, view.chain_rows(slot))
                nearest = min(nearest, float(view.nearest[slot]))
        if score < o.links:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"a chain of {score} of this client's recent queries, each within "
            f"{o.distance:g} of an earlier one (this one: {nearest:.3g})",
            score=float(score),
            threshold=float(o.links),
            rows=rows,
            input_name=o.input,
        )
