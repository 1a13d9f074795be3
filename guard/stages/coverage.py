"""``coverage``: catch model extraction by natural data (Knockoff Nets) from how much new
ground a client's queries cover.

Runs on the response, since it needs the predicted class (:mod:`guard.defenses.coverage`).
Per client, over its last ``window`` queries: how many were *novel* (no earlier
query of the window within ``radius``), what fraction that is, and how evenly
the novel ones spread over the classes. An extractor's stream is nearly all new
inputs over every class; honest traffic repeats itself (popular inputs, retries,
jittered copies). Across accounts: clients whose own stream already has that
shape are pooled per model, so an extraction split over a few keys is caught
when their pooled count is; a client whose own stream lacks the shape is never
pooled, whatever other accounts do. JbDA's synthetic neighbours are new inputs too,
so this stage also catches it (at ``min_novel``); PRADA, which reads the distribution of
distances instead, stays beside it for synthetic extraction.

YAML keys (all optional except that ``radius`` or ``reference`` is required):

``radius``        a query is novel when no earlier one of the window lies within
                  this L2 distance (in the input's units, after the sketch)
``reference``     instead of ``radius``: ``builtin:NAME``, the held-out rows shipped
                  with a built-in model; the radius is then calibrated at load as
                  ``scale`` × the ``quantile`` of their nearest-neighbour distances
``quantile``      default 0.01; ``scale``: default 0.5
``window``        the client's newest queries kept and judged; default 1000 (at most 10000)
``min_novel``     suspicious from this many novel queries in the window, when also
                  ``min_fraction`` of the window is novel and their class entropy
                  (over log C) reaches ``min_entropy``; defaults 150, 0.9, 0.7
``max_novel``     suspicious from this many novel queries whatever the fraction; default 600
``accounts``      pool clients across accounts; default ``true``
``shard_novel``   a client joins the pool from this many novel queries (with the fraction
                  and entropy tests); default 50
``every``         a pooled client re-enters its evidence every this many queries; default 25
``period``        pooled evidence older than this is ignored; default ``1d``
``dims``          inputs of more values are sketched to this many by a seeded random
                  projection; default 64
``classes``       the number of classes C; default: the width of the score output
``input``, ``output``  as in ``prada``
``ttl``           a client's history expires this long after its last query; default ``1d``
``action``        default ``flag``; ``misdirect`` (a finding marks the client; its later
                  requests are answered from their anchors, silently), ``degrade_for``,
                  ``on_error``: see :mod:`guard.stages.detector`.
                  A detected extractor should not learn it was seen (it would slow down
                  or spread over more accounts): prefer an action it cannot see. ``degrade``
                  carries no verdict, but scores turning one-hot are a sign of their own;
                  ``misdirect`` shows none

Finding: ``score`` the novel queries in the window (pooled ones for a split
extraction), ``threshold`` ``min_novel`` or ``max_novel``; technique AML.T0024.002.
Cost per request: one read and one append of the client's window, kept as one byte
log (``4 + 2 × dims`` bytes a query: :meth:`~guard.state.base.StateStore.append_bytes`),
and one distance per kept query (``window`` × ``dims``). The pool (one model-wide
history of at most 512 entries) is read and written only by clients already shaped like a
shard, every ``every`` of their queries.
Failure mode: as ``on_error`` says (default closed: 503 when the state store is down).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from guard.configreader import Section
from guard.defenses.coverage import (
    STEPS_PER_RADIUS,
    Evidence,
    History,
    Shard,
    Sketch,
    Thresholds,
    calibrate_radius,
    union,
)
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
from guard.state import client_key, hash_tag

TECHNIQUE = "AML.T0024.002"  # Exfiltration via ML Inference API: Extract ML Model
POOL_CAP = 512  # entries: the newest of each pooled client counts; a read stays cheap
_PREFERRED_OUTPUTS = ("probabilities", "label")


class Coverage(BaseStage):
    name = "coverage"

    def __init__(
        self,
        *,
        input_name: str | None,
        output: str | None,
        radius: float,
        thresholds: Thresholds,
        window: int,
        accounts: bool,
        every: int,
        period: float,
        dims: int,
        classes: int | None,
        ttl: float,
        enforcement: Enforcement,
        fail_open: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.input_name = input_name
        self.output = output
        self.radius = radius
        self.thresholds = thresholds
        self.window = window
        self.accounts = accounts
        self.every = every
        self.period = period
        self.dims = dims
        self.classes = classes
        self.ttl = ttl
        self.enforcement = enforcement
        self.fail_open = fail_open
        self.clock = clock
        self._sketches: dict[int, Sketch] = {}

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Coverage:
        output = section.str("output", None)
        if output is not None and env.metadata is not None:
            known = [spec.name for spec in env.metadata.outputs]
            if output not in known:
                raise section.error(
                    "output", f"names no output of model {env.model}; it has {', '.join(known)}"
                )
        dims = section.int("dims", 64, min=2, max=4096)
        radius = _read_radius(section, dims)
        min_novel = section.int("min_novel", 150, min=1)
        shard_novel = section.int("shard_novel", 50, min=1, max=min_novel)
        window = section.int("window", 1000, min=2, max=10_000)
        thresholds = Thresholds(
            min_novel=min_novel,
            min_fraction=section.float("min_fraction", 0.9, gt=0, max=1),
            min_entropy=section.float("min_entropy", 0.7, min=0, max=1),
            max_novel=section.int("max_novel", max(600, min_novel), min=min_novel, max=window),
            shard_novel=shard_novel,
        )
        stage = cls(
            input_name=read_input(section, env),
            output=output,
            radius=radius,
            thresholds=thresholds,
            window=window,
            accounts=section.bool("accounts", True),
            every=section.int("every", 25, min=1),
            period=read_duration(section, "period", 86400.0),
            dims=dims,
            classes=section.int("classes", None, min=2) or _metadata_classes(env),
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
        t = self.thresholds
        return {
            "input": self.input_name,
            "output": self.output or "auto",
            "radius": round(self.radius, 6),
            "window": self.window,
            "min_novel": t.min_novel,
            "min_fraction": t.min_fraction,
            "min_entropy": t.min_entropy,
            "max_novel": t.max_novel,
            "accounts": self.accounts,
            "shard_novel": t.shard_novel,
            "every": self.every,
            "period": format_duration(self.period),
            "dims": self.dims,
            "classes": self.classes if self.classes is not None else "auto",
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
        if x.shape[0] == 0:
            return Verdict.CONTINUE
        labels, classes = self._labels(ctx.response, x.shape[0])
        sketch = self._sketch(x.shape[1])
        sketches = sketch(x)
        dims = sketches.shape[1]
        store, client = self.enforcement.store, ctx.client.name
        key = self._key(client, f"h{dims}")  # the sketch's width names the layout
        step = self.radius / STEPS_PER_RADIUS
        history = History.decode(await store.read_bytes(key), dims, step)
        history.keep(self.window)
        records = b"".join(
            History.encode(row, label, history.observe(row, label, self.radius, self.window), step)
            for row, label in zip(sketches, labels.tolist(), strict=True)
        )
        count, _ = (
            await asyncio.gather(
                store.append_bytes(key, records, self.window * History.record_size(dims), self.ttl),
                store.incr(self._key(client, "n"), x.shape[0], self.ttl),
            )
        )[1]
        evidence = history.evidence(classes)
        t = self.thresholds
        if t.judge(evidence):
            limit = t.max_novel if evidence.novel >= t.max_novel else t.min_novel
            return await self.enforcement.report(
                ctx,
                f"this client's queries cover new ground like a model extraction: "
                f"{evidence.novel} of its last {evidence.queries} queries novel "
                f"(class entropy {evidence.entropy:.2f})",
                score=float(evidence.novel),
                threshold=float(limit),
            )
        if not self.accounts or not t.shard(evidence):
            return Verdict.CONTINUE
        if (count - x.shape[0]) // self.every == count // self.every:
            return Verdict.CONTINUE
        pooled = await self._pool(client, evidence)
        if pooled is None:
            return Verdict.CONTINUE
        return await self.enforcement.report(
            ctx,
            f"this client is one of several accounts covering new ground together like a "
            f"split model extraction: {pooled.novel} novel queries pooled, "
            f"{evidence.novel} of them its own",
            score=float(pooled.novel),
            threshold=float(t.min_novel),
        )

    async def _pool(self, client: str, evidence: Evidence) -> Evidence | None:
        """Enter this client's evidence in the model's pool and judge the pool."""
        store, now = self.enforcement.store, self.clock()
        key = f"{hash_tag('coverage:' + self.enforcement.model)}:pool"
        entry = orjson.dumps(
            {
                "client": client,
                "at": now,
                "queries": evidence.queries,
                "novel": evidence.novel,
                "classes": evidence.classes.tolist(),
            }
        )
        await store.push(key, [entry], POOL_CAP, self.period)
        shards = [s for s in map(_decode_shard, await store.items(key)) if s is not None]
        width = len(evidence.classes)
        shards = [s for s in shards if len(s.evidence.classes) == width]
        return union(shards, self.thresholds, since=now - self.period)

    def _sketch(self, features: int) -> Sketch:
        found = self._sketches.get(features)
        if found is None:
            found = self._sketches[features] = Sketch.make(features, self.dims)
        return found

    def _key(self, client: str, *parts: str) -> str:
        return client_key(client, "coverage", self.enforcement.model, *parts)

    def _labels(self, response: InferResponse, rows: int) -> tuple[np.ndarray, int]:
        """The predicted class of each row (-1: none readable) and the number of classes."""
        outputs = response.outputs
        preferred = (self.output,) if self.output else _PREFERRED_OUTPUTS
        for name in [*(n for n in preferred if n in outputs), *outputs]:
            value = outputs.get(name)
            if value is None or value.shape[:1] != (rows,):
                continue
            if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
                return np.argmax(value, axis=1).astype(np.int64), self.classes or value.shape[1]
            if value.ndim == 1 and value.dtype.kind in "iu":
                labels = value.astype(np.int64)
                seen = int(labels.max(initial=0)) + 1
                classes = self.classes or max(2, seen)
                return np.where((labels >= 0) & (labels < classes), labels, -1), classes
        return np.full(rows, -1, np.int64), self.classes or 2


def _decode_shard(item: bytes) -> Shard | None:
    try:
        data = orjson.loads(item)
        evidence = Evidence(
            int(data["queries"]), int(data["novel"]), np.asarray(data["classes"], dtype=np.int64)
        )
        return Shard(str(data["client"]), float(data["at"]), evidence)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _read_radius(section: Section, dims: int) -> float:
    has_radius, has_reference = section.has("radius"), section.has("reference")
    quantile = section.float("quantile", 0.01, gt=0, lt=1)
    scale = section.float("scale", 0.5, gt=0)
    if has_radius and has_reference:
        raise section.error("radius", "and reference are exclusive; give one")
    if has_radius:
        return float(section.float("radius", gt=0))
    if not has_reference:
        raise section.error(
            "radius", "is required (or reference: builtin:NAME to calibrate it at load)"
        )
    name = section.str("reference")
    if not name.startswith("builtin:"):
        raise section.error("reference", f"must be builtin:NAME; got {name!r}")
    from guard.models import load_samples

    try:
        x, _ = load_samples(name.removeprefix("builtin:"))
    except (ValueError, OSError) as exc:
        raise section.error("reference", f"names no built-in model with samples: {exc}") from exc
    rows = x.reshape(len(x), -1)
    return calibrate_radius(Sketch.make(rows.shape[1], dims)(rows), quantile=quantile, scale=scale)


def _metadata_classes(env: StageEnv) -> int | None:
    if env.metadata is None:
        return None
    for spec in env.metadata.outputs:
        shape = tuple(spec.shape)
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
            return int(shape[1])
    return None
