"""``prada``: catch model extraction by the distribution of a client's query distances.

Runs on the response, since PRADA needs the class the model predicted
(:mod:`guard.defenses.prada`): per client and class, each query's minimum L2
distance to the client's earlier queries of that class; every ``every``
queries, once ``min_queries`` distances are held, a Shapiro-Wilk test on the newest
``max_distances`` of them (kept in one byte log per client: one value read per test).
A finding with action ``deny`` withholds the answer (403).

Keys: :class:`PradaOptions` (docs/stage-options.md).

An exact repeat of a query the client's growing set holds (distance 0) is
skipped: it says nothing new and would read as non-natural. Finding: ``score`` W,
``threshold`` delta, technique AML.T0024.002 (extract ML model). Failure mode:
``on_error`` (default closed: 503 when the state store is down). Several replicas
may update one client's history at once; each update is atomic, the sequence is
not, which at worst shifts a test by a few queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.defenses.prada import ClassSet, observe, shapiro_w
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.detector import Enforcement, MisdirectOptions, input_rows
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionsStage, option
from guard.stages.shared import OUTPUT_DOC, predicted
from guard.state import client_key, together

TECHNIQUE = "AML.T0024.002"  # Exfiltration via ML Inference API: Extract ML Model
_DISTANCE = np.dtype("<f4")


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

    async def on_request(self, ctx: RequestContext) -> Verdict:
        name = self.options.input
        rows = input_rows(ctx, name) if self.enforcement.misdirects else None
        await self.enforcement.honour_marks(ctx, rows, name)
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        if ctx.response is None:
            return Verdict.CONTINUE
        o = self.options
        x = input_rows(ctx, o.input)
        found = predicted(ctx.response, x.shape[0], o.output)
        if found is None or x.shape[0] == 0:
            return Verdict.CONTINUE
        classes = found[0]
        store, client, ttl = self.enforcement.store, ctx.client.name, o.ttl
        labels = classes.tolist()
        keys = {c: self._key(client, "g", str(c)) for c in sorted(set(labels))}
        stored = await together(store, *(store.items(k) for k in keys.values()))
        sets = {
            c: ClassSet.decode(items, x.shape[1]) for c, items in zip(keys, stored, strict=True)
        }

        joined: dict[int, list[bytes]] = {}
        distances: list[float] = []
        for row, c in zip(x, labels, strict=True):
            seen = observe(sets[c], row)
            if seen.distance == 0.0:  # an exact repeat of a kept query: no new information
                continue
            if seen.distance is not None:
                distances.append(seen.distance)
            if seen.grows:
                entry = ClassSet.encode(row, np.nan if seen.distance is None else seen.distance)
                joined.setdefault(c, []).append(entry)

        d_key = self._key(client, "dl")
        recorded = np.asarray(distances, dtype=_DISTANCE).tobytes()
        grown = [store.push(keys[c], items, o.max_per_class, ttl) for c, items in joined.items()]
        length, (count, _), *_ = await together(
            store,
            store.append_bytes(d_key, recorded, o.max_distances * _DISTANCE.itemsize, ttl),
            store.incr(self._key(client, "n"), len(x), ttl),
            *grown,
        )
        held = min(length // _DISTANCE.itemsize, o.max_distances)
        if held < o.min_queries or (count - len(x)) // o.every == count // o.every:
            return Verdict.CONTINUE
        log = await store.read_bytes(d_key)
        history = np.frombuffer(log, dtype=_DISTANCE)[-o.max_distances :]
        w = shapiro_w(history)
        if w >= o.delta:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"query distances of this client are not normally distributed "
            f"(Shapiro-Wilk W={w:.3f} over {history.size} distances)",
            score=w,
            threshold=o.delta,
        )

    def _key(self, client: str, *parts: str) -> str:
        return client_key(client, "prada", self.enforcement.model, *parts)
