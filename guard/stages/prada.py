"""``prada``: catch model extraction by the distribution of a client's query distances.

Runs on the response, since PRADA needs the class the model predicted
(:mod:`guard.defenses.prada`): per client and class, each query's minimum L2
distance to the client's earlier queries of that class; every ``every``
queries, once ``min_queries`` distances are held, a Shapiro-Wilk test on them.
A finding with action ``deny`` withholds the answer (403).

YAML keys (all optional):

``input``          the input to watch; default: the model's only input
``output``         the output the class is read from: the argmax of a ``[batch,
                   classes]`` score output or a ``[batch]`` label output; default:
                   ``probabilities``, else ``label``. When the response lacks it
                   (the client asked for other outputs), any output of either shape
``delta``          flag when Shapiro-Wilk W < delta; default 0.9
``min_queries``    distances needed before the first test; default 100
``every``          test every this many queries; default 10
``max_distances``  newest distances tested (at most 5000); default 1000
``max_per_class``  newest members kept per class's growing set; default 200
``ttl``            a client's history expires this long after its last query; default ``1d``
``action``         default ``flag``; ``misdirect`` (a finding on the response marks the
                   client; its later requests are misdirected), ``degrade_for``, ``on_error``:
                   see :mod:`guard.stages.detector`

An exact repeat of a query the client's growing set holds (distance 0) is
skipped: it says nothing new and would read as non-natural. Finding: ``score`` W,
``threshold`` delta, technique AML.T0024.002 (extract ML
model). Several replicas may update one client's history at once; each update
is atomic, the sequence is not, which at worst shifts a test by a few queries.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from guard.configreader import Section
from guard.defenses.prada import ClassSet, observe, shapiro_w
from guard.inference import InferResponse
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import (
    Enforcement,
    format_duration,
    input_rows,
    read_duration,
    read_enforcement,
    read_fail_open,
    read_input,
)
from guard.stages.env import StageEnv
from guard.state import client_key

TECHNIQUE = "AML.T0024.002"  # Exfiltration via ML Inference API: Extract ML Model
_DISTANCE = np.dtype("<f4")
_PREFERRED_OUTPUTS = ("probabilities", "label")


class Prada(BaseStage):
    name = "prada"

    def __init__(
        self,
        *,
        input_name: str | None,
        output: str | None,
        delta: float,
        min_queries: int,
        every: int,
        max_distances: int,
        max_per_class: int,
        ttl: float,
        enforcement: Enforcement,
        fail_open: bool,
    ) -> None:
        self.input_name = input_name
        self.output = output
        self.delta = delta
        self.min_queries = min_queries
        self.every = every
        self.max_distances = max_distances
        self.max_per_class = max_per_class
        self.ttl = ttl
        self.enforcement = enforcement
        self.fail_open = fail_open

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Prada:
        import scipy.stats  # noqa: F401  - slow (1-2 s): paid at load, not on a client's 100th query

        output = section.str("output", None)
        if output is not None and env.metadata is not None:
            known = [spec.name for spec in env.metadata.outputs]
            if output not in known:
                raise section.error(
                    "output", f"names no output of model {env.model}; it has {', '.join(known)}"
                )
        max_distances = section.int("max_distances", 1000, min=3, max=5000)
        stage = cls(
            input_name=read_input(section, env),
            output=output,
            delta=section.float("delta", 0.9, gt=0, lt=1),
            min_queries=section.int("min_queries", 100, min=3, max=max_distances),
            every=section.int("every", 10, min=1),
            max_distances=max_distances,
            max_per_class=section.int("max_per_class", 200, min=1, max=100_000),
            ttl=read_duration(section, "ttl", 86400.0),
            enforcement=read_enforcement(
                section,
                env,
                stage=cls.name,
                technique=TECHNIQUE,
                default=Action.FLAG,
                misdirect=True,
            ),
            fail_open=read_fail_open(section),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "output": self.output or "auto",
            "delta": self.delta,
            "min_queries": self.min_queries,
            "every": self.every,
            "max_distances": self.max_distances,
            "max_per_class": self.max_per_class,
            "ttl": format_duration(self.ttl),
            **self.enforcement.describe(),
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        rows = input_rows(ctx, self.input_name) if self.enforcement.misdirects else None
        await self.enforcement.honour_marks(ctx, rows, self.input_name)
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        if ctx.response is None:
            return Verdict.CONTINUE
        x = input_rows(ctx, self.input_name)
        classes = self._classes(ctx.response, x.shape[0])
        if classes is None or x.shape[0] == 0:
            return Verdict.CONTINUE
        store, client, ttl = self.enforcement.store, ctx.client.name, self.ttl
        keys = {int(c): self._key(client, "g", str(int(c))) for c in np.unique(classes)}
        stored = await asyncio.gather(*(store.items(k) for k in keys.values()))
        sets = {
            c: ClassSet.decode(items, x.shape[1]) for c, items in zip(keys, stored, strict=True)
        }

        joined: dict[int, list[bytes]] = {}
        distances: list[float] = []
        for row, c in zip(x, classes.tolist(), strict=True):
            seen = observe(sets[c], row)
            if seen.distance == 0.0:  # an exact repeat of a kept query: no new information
                continue
            if seen.distance is not None:
                distances.append(seen.distance)
            if seen.grows:
                entry = ClassSet.encode(row, np.nan if seen.distance is None else seen.distance)
                joined.setdefault(c, []).append(entry)

        d_key = self._key(client, "d")
        recorded = [np.float32(d).tobytes() for d in distances]
        grown = [store.push(keys[c], items, self.max_per_class, ttl) for c, items in joined.items()]
        (held, (count, _)), _ = await asyncio.gather(
            asyncio.gather(
                store.push(d_key, recorded, self.max_distances, ttl),
                store.incr(self._key(client, "n"), len(x), ttl),
            ),
            asyncio.gather(*grown),
        )
        if held < self.min_queries or (count - len(x)) // self.every == count // self.every:
            return Verdict.CONTINUE
        history = np.frombuffer(b"".join(await store.items(d_key)), dtype=_DISTANCE)
        w = shapiro_w(history)
        if w >= self.delta:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"query distances of this client are not normally distributed "
            f"(Shapiro-Wilk W={w:.3f} over {history.size} distances)",
            score=w,
            threshold=self.delta,
        )

    def _key(self, client: str, *parts: str) -> str:
        return client_key(client, "prada", self.enforcement.model, *parts)

    def _classes(self, response: InferResponse, rows: int) -> np.ndarray | None:
        """The predicted class of each row: from the preferred output, else the first that fits
        (a client asking for a subset of the outputs does not escape the detector)."""
        outputs = response.outputs
        preferred = (self.output,) if self.output else _PREFERRED_OUTPUTS
        names = [*(n for n in preferred if n in outputs), *outputs]
        for name in names:
            value = outputs.get(name)
            if value is None or value.shape[:1] != (rows,):
                continue
            if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
                return np.argmax(value, axis=1)
            if value.ndim == 1 and value.dtype.kind in "iu":
                return value.astype(np.int64)
        return None
