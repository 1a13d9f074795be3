"""``provenance``: catch attacks whose queries descend from one another, however randomized.

Per client, each query row is linked to the client's nearest earlier row in
input space (:mod:`guard.defenses.provenance`, after QPA). Fresh random
transforms (OARS-style attacks resampling until a hash-based detector lets them
through) do not break a link unless they move the query farther than
``distance``, which also wrecks the attack's own progress (docs/detection.md
measures it). Exact repeats are free: identical to an earlier row, they are
neither evidence nor stored again.

YAML keys:

``distance``   required: a row is *linked* when an earlier row of the client lies within
               this L2 distance, in input units. Pick it below the distance between
               distinct honest inputs (digits: nearest distinct held-out digit >= 13.7,
               the default policy uses 6.0)
``links``      flag when one chain of linked rows of the client (each row within
               ``distance`` of an earlier one of the chain) holds this many of its recent
               rows; default 8
``history``    rows kept per client (stored as float16); default 128 (fewer for wide
               inputs: at most 256 KiB a client)
``ttl``        a client's rows expire this long after its last query; default ``1h``
``input``      the input to watch; default: the model's only input
``action``     default ``deny``; ``misdirect``, ``degrade_for``, ``on_error``: see
               :mod:`guard.stages.detector`

Finding: ``score`` the rows of the longest chain the request joined, ``threshold``
``links``, the message the nearest distance. Technique AML.T0043. Failure mode:
``on_error`` (default closed: 503 when the state store is down). Several
replicas may update one client's history at once; each push is atomic, the
read-then-push is not, which at worst delays a finding by a query or two.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from guard.configreader import Section
from guard.defenses.provenance import link_rows
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import (
    HISTORY_BYTES,
    Enforcement,
    format_duration,
    input_rows,
    read_duration,
    read_input,
)
from guard.stages.env import StageEnv, read_fail_open
from guard.state import client_key

TECHNIQUE = "AML.T0043"  # Craft Adversarial Data
_ROW = np.dtype("<f2")
_CHAIN = 8  # bytes of a chain id (random)


class Provenance(BaseStage):
    name = "provenance"

    def __init__(
        self,
        *,
        input_name: str | None,
        distance: float,
        links: int,
        history: int,
        ttl: float,
        enforcement: Enforcement,
        fail_open: bool,
    ) -> None:
        self.input_name = input_name
        self.distance = distance
        self.links = links
        self.history = history
        self.ttl = ttl
        self.enforcement = enforcement
        self.fail_open = fail_open

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Provenance:
        history = section.int("history", 128, min=2, max=100_000)
        stage = cls(
            input_name=read_input(section, env),
            distance=section.float("distance", gt=0),
            links=section.int("links", 8, min=2, max=history),
            history=history,
            ttl=read_duration(section, "ttl", 3600.0),
            enforcement=Enforcement.read(
                section,
                env,
                stage=cls.name,
                technique=TECHNIQUE,
                default=Action.DENY,
                misdirect=True,
            ),
            fail_open=read_fail_open(section),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "distance": self.distance,
            "links": self.links,
            "history": self.history,
            "ttl": format_duration(self.ttl),
            **self.enforcement.describe(),
        }

    def key(self, client: str) -> str:
        return client_key(client, "provenance", self.enforcement.model)

    async def on_request(self, ctx: RequestContext) -> Verdict:
        rows = input_rows(ctx, self.input_name)
        await self.enforcement.honour_marks(ctx, rows, self.input_name)
        if not len(rows):
            return Verdict.CONTINUE
        store = self.enforcement.store
        width = rows.shape[1]
        size = _CHAIN + _ROW.itemsize * width
        key = self.key(ctx.client.name)
        held = [item for item in await store.items(key) if len(item) == size]
        chains = [item[:_CHAIN] for item in held]
        history = np.frombuffer(b"".join(item[_CHAIN:] for item in held), dtype=_ROW)
        rounded = rows.astype(_ROW)
        links = link_rows(history.reshape(-1, width), rounded, self.distance)
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
        cap = max(8, min(self.history, HISTORY_BYTES // size))
        await store.push(key, fresh, cap, self.ttl)
        if not joined:
            return Verdict.CONTINUE
        kept = [item[:_CHAIN] for item in (held + fresh)[-cap:]]
        score = max(kept.count(chain) for chain in set(joined))
        if score < self.links:
            return Verdict.CONTINUE
        nearest = min(link.nearest for link in links if link.linked)
        return await self.enforcement.report(
            ctx,
            f"a chain of {score} of this client's recent queries, each within "
            f"{self.distance:g} of an earlier one (this one: {nearest:.3g})",
            score=float(score),
            threshold=float(self.links),
            rows=rows,
            input_name=self.input_name,
        )
