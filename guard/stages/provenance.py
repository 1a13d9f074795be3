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
``on_error`` (default closed: 503 when the state store is down). Several
replicas may update one client's history at once; each push is atomic, the
read-then-push is not, which at worst delays a finding by a query or two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from guard.defenses.provenance import link_rows
from guard.pipeline import RequestContext, Verdict
from guard.stages import scale
from guard.stages.detector import HISTORY_BYTES, Enforcement, MisdirectOptions, input_rows
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionsStage, option
from guard.state import client_key

TECHNIQUE = "AML.T0043"  # Craft Adversarial Data
_ROW = np.dtype("<f2")
_CHAIN = 8  # bytes of a chain id (random)
# float16 -> float32 by table lookup: twice as fast as numpy's cast, bit for bit the same.
_WIDEN = np.arange(1 << 16, dtype=np.uint16).view(_ROW).astype(np.float32)


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

    def key(self, client: str) -> str:
        return client_key(client, "provenance", self.enforcement.model)

    async def on_request(self, ctx: RequestContext) -> Verdict:
        o = self.options
        rows = input_rows(ctx, o.input)
        await self.enforcement.honour_marks(ctx, rows, o.input)
        if not len(rows):
            return Verdict.CONTINUE
        store = self.enforcement.store
        width = rows.shape[1]
        size = _CHAIN + _ROW.itemsize * width
        key = self.key(ctx.client.name)
        held = [item for item in await store.items(key) if len(item) == size]
        record = np.dtype([("chain", f"V{_CHAIN}"), ("row", _ROW, (width,))])
        stored = np.frombuffer(b"".join(held), dtype=record)  # one copy, no slice per item
        chains: list[bytes] = stored["chain"].tolist()
        rounded = rows.astype(_ROW)
        links = link_rows(np.take(_WIDEN, stored["row"].view(np.uint16)), rounded, o.distance)
        fresh = []
        joined: list[bytes] = []
        for link, row in zip(links, rounded, strict=True):
            chain = chains[link.parent] if link.parent >= 0 else b""
            chains.append(chain)  # a batch row's place, whatever it is
            if link.repeat:
                continue
            if not link.linked:
                chain = os.urandom(_CHAIN)  # the first row of a new chain
                chains[-1] = chain
            else:
                joined.append(chain)
            fresh.append(chain + row.tobytes())
        if not fresh:
            return Verdict.CONTINUE
        cap = max(8, min(o.history, HISTORY_BYTES // size))
        await store.push(key, fresh, cap, o.ttl)
        if not joined:
            return Verdict.CONTINUE
        kept = [item[:_CHAIN] for item in (held + fresh)[-cap:]]
        score = max(kept.count(chain) for chain in set(joined))
        if score < o.links:
            return Verdict.CONTINUE
        nearest = min(link.nearest for link in links if link.linked)
        return await self.enforcement.report(
            ctx,
            f"a chain of {score} of this client's recent queries, each within "
            f"{o.distance:g} of an earlier one (this one: {nearest:.3g})",
            score=float(score),
            threshold=float(o.links),
            rows=rows,
            input_name=o.input,
        )
