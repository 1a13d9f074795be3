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

Keys: :class:`CoverageOptions` (docs/stage-options.md); ``radius`` or ``reference`` is
required. A detected extractor should not learn it was seen (it would slow down or spread
over more accounts): prefer an action it cannot see. ``degrade`` carries no verdict, but
scores turning one-hot are a sign of their own; ``misdirect`` shows none.

Finding: ``score`` the novel queries in the window (pooled ones for a split
extraction), ``threshold`` ``min_novel`` or ``max_novel``; technique AML.T0024.002.
Cost per request: one :meth:`LogViews.append <guard.state.views.LogViews.append>` (one
round trip on Redis) of the request's records to the client's offset log (``4 + 2 × dims``
bytes a query: its predicted class and fixed-point sketch, raw facts only; the log keeps
the newest ``2 × window`` records, so that a window rebuilt from it, on another replica or
after this process dropped its copy, is the one kept up to date here), then, per row, one
exact scan of the window for a near query (:func:`guard._native.coverage_within`, each
row's distance abandoned once past the radius) and the window's counts moved by the query
entering and the one leaving. This process keeps each client's decoded window (about
``2 × dims × window`` bytes, at most :data:`VIEW_BYTES` per input width, least recently
used dropped first: a dropped window costs one rebuild of at most ``window`` scans, never
a different answer). Replicas folding the same log in the same order decide alike. The
pool (one model-wide history of at most 512 entries) is read and written only by clients
already shaped like a shard, every ``every`` of their queries (counted by the window:
from the log's start, or from its kept records when it was rebuilt from a trimmed log).
Failure mode: as ``on_error`` says (default closed: 503 when the state store is down).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from guard.defenses.coverage import (
    STEPS_PER_RADIUS,
    Evidence,
    Shard,
    Sketch,
    Thresholds,
    Window,
    calibrate_radius,
    union,
)
from guard.inference import InferResponse
from guard.pipeline import Action, RequestContext, Verdict, ensure_prepared, take_prepared
from guard.stages.detector import VIEW_BYTES, Enforcement, MisdirectOptions, WidthViews, input_rows
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionError, OptionsStage, option
from guard.stages.shared import OUTPUT_DOC, predicted
from guard.state import client_key, hash_tag
from guard.state.views import LogViews

TECHNIQUE = "AML.T0024.002"  # Exfiltration via ML Inference API: Extract ML Model
POOL_CAP = 512  # entries: the newest of each pooled client counts; a read stays cheap


@dataclass(frozen=True, kw_only=True)
class CoverageOptions(MisdirectOptions):
    action: Action = option(
        Action.FLAG,
        doc="what a finding does; `misdirect`: the client is marked and its later requests "
        "are answered from their anchors, silently",
    )
    radius: float | None = option(
        None,
        gt=0,
        shown="required, unless `reference`",
        doc="a query is novel when no earlier one of the window lies within this L2 distance "
        "(in the input's units, after the sketch); with `misdirect`, also the anchors' radius",
    )
    reference: str | None = option(
        None,
        doc="instead of `radius`: `builtin:NAME`, the held-out rows shipped with a built-in "
        "model; the radius is then calibrated at load as `scale` × the `quantile` of their "
        "nearest-neighbour distances",
    )
    quantile: float = option(0.01, gt=0, lt=1, doc="with `reference`: the quantile taken")
    scale: float = option(0.5, gt=0, doc="with `reference`: the factor applied to it")
    output: str | None = option(None, names="output", doc=OUTPUT_DOC)
    dims: int = option(
        64,
        min=2,
        max=4096,
        doc="inputs of more values are sketched to this many by a seeded random projection",
    )
    window: int = option(1000, min=2, max=10_000, doc="the client's newest queries kept and judged")
    min_novel: int = option(
        150,
        min=1,
        doc="suspicious from this many novel queries in the window, when also `min_fraction` "
        "of the window is novel and their class entropy (over log C) reaches `min_entropy`",
    )
    min_fraction: float = option(0.9, gt=0, max=1, doc="see `min_novel`")
    min_entropy: float = option(0.7, min=0, max=1, doc="see `min_novel`")
    max_novel: int = option(
        min="min_novel",
        max="window",
        derive=lambda values, env: max(600, values["min_novel"]),
        shown="`max(600, min_novel)`",
        doc="suspicious from this many novel queries whatever the fraction",
    )
    accounts: bool = option(True, doc="pool clients across accounts")
    shard_novel: int = option(
        50,
        min=1,
        max="min_novel",
        doc="a client joins the pool from this many novel queries (with the fraction and "
        "entropy tests)",
    )
    every: int = option(25, min=1, doc="a pooled client re-enters its evidence every this many")
    period: Duration = option(Duration(86400.0), doc="pooled evidence older than this is ignored")
    classes: int | None = option(
        min=2,
        derive=lambda values, env: _metadata_classes(env),
        shown="the width of the score output",
        doc="the number of classes C",
    )
    ttl: Duration = option(
        Duration(86400.0), doc="a client's history expires this long after its last query"
    )

    def __post_init__(self) -> None:
        if self.radius is not None and self.reference is not None:
            raise OptionError("radius", "and reference are exclusive; give one")
        if self.radius is None and self.reference is None:
            raise OptionError(
                "radius", "is required (or reference: builtin:NAME to calibrate it at load)"
            )
        if self.reference is not None and not self.reference.startswith("builtin:"):
            raise OptionError("reference", f"must be builtin:NAME; got {self.reference!r}")


class Coverage(OptionsStage[CoverageOptions]):
    name = "coverage"
    changes_outputs = False  # reads the predicted class only
    Options = CoverageOptions

    def __init__(self, options: CoverageOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        o = options
        self.radius = o.radius if o.radius is not None else _calibrated(o.reference or "", o)
        self.thresholds = Thresholds(
            min_novel=o.min_novel,
            min_fraction=o.min_fraction,
            min_entropy=o.min_entropy,
            max_novel=o.max_novel,
            shard_novel=o.shard_novel,
        )
        self.enforcement = Enforcement.of(options, env, stage=self.name, technique=TECHNIQUE)
        if not self.enforcement.acts_on_requests:  # no mark to honour: the response side only
            self.idle_hooks = frozenset({"prepare_request", "on_request"})
        self.clock = time.time
        self._sketches: dict[int, Sketch] = {}
        window = options.window
        self._windows = WidthViews(lambda dims: Window(dims, window), VIEW_BYTES)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "radius": round(self.radius, 6)}  # calibrated if need be

    async def prepare_request(self, ctx: RequestContext) -> None:
        name = self.options.input
        rows = input_rows(ctx, name) if self.enforcement.misdirects else None
        await self.enforcement.honour_marks(ctx, rows, name)

    async def prepare_response(self, ctx: RequestContext) -> None:
        if ctx.response is None:
            return
        o = self.options
        x = input_rows(ctx, o.input)
        if x.shape[0] == 0:
            return
        labels, classes = self._labels(ctx.response, x.shape[0])
        sketches = self._sketch(x.shape[1])(x)
        dims = sketches.shape[1]
        records = Window.encode(sketches, labels, self.radius / STEPS_PER_RADIUS)
        key = self._key(ctx.client.name, f"w{dims}")  # the sketch's width names the layout
        window = await self._views(dims).append(
            self.enforcement.store, key, records, 2 * o.window * Window.record_size(dims), o.ttl
        )
        ctx.stage_state[self.name] = window, classes

    async def on_request(self, ctx: RequestContext) -> Verdict:
        await ensure_prepared(self, "prepare_request", ctx)
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        prepared = await take_prepared(self, "prepare_response", ctx)
        if prepared is None:  # no rows, or the store failed and on_error is open
            return Verdict.CONTINUE
        window, classes = prepared
        o = self.options
        x = input_rows(ctx, o.input)
        evidence = window.evidence(classes)
        count = window.total
        client = ctx.client.name
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
        if not o.accounts or not t.shard(evidence):
            return Verdict.CONTINUE
        if (count - x.shape[0]) // o.every == count // o.every:
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
        await store.push(key, [entry], POOL_CAP, self.options.period)
        shards = [s for s in map(_decode_shard, await store.items(key)) if s is not None]
        width = len(evidence.classes)
        shards = [s for s in shards if len(s.evidence.classes) == width]
        return union(shards, self.thresholds, since=now - self.options.period)

    def _views(self, dims: int) -> LogViews[Window]:
        """This process's windows of ``dims``-wide sketches, one per client (the few widths
        most recently used: a client sending every width cannot make a set of each)."""
        return self._windows.of(dims)

    def _sketch(self, features: int) -> Sketch:
        found = self._sketches.get(features)
        if found is None:
            found = self._sketches[features] = Sketch.make(features, self.options.dims)
        return found

    def _key(self, client: str, *parts: str) -> str:
        return client_key(client, "coverage", self.enforcement.model, *parts)

    def _labels(self, response: InferResponse, rows: int) -> tuple[np.ndarray, int]:
        """The predicted class of each row (-1: none readable) and the number of classes."""
        classes = self.options.classes
        found = predicted(response, rows, self.options.output)
        if found is None:
            return np.full(rows, -1, np.int64), classes or 2
        labels, width = found
        if width is not None:
            return labels, classes or width
        classes = classes or max(2, int(labels.max(initial=0)) + 1)
        return np.where((labels >= 0) & (labels < classes), labels, -1), classes


def _decode_shard(item: bytes) -> Shard | None:
    try:
        data = orjson.loads(item)
        evidence = Evidence(
            int(data["queries"]), int(data["novel"]), np.asarray(data["classes"], dtype=np.int64)
        )
        return Shard(str(data["client"]), float(data["at"]), evidence)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _calibrated(reference: str, options: CoverageOptions) -> float:
    """The radius the ``reference`` rows calibrate (:func:`reference_radius`)."""
    from guard.models import load_samples

    try:
        x, _ = load_samples(reference.removeprefix("builtin:"))
    except (ValueError, OSError) as exc:
        raise OptionError("reference", f"names no built-in model with samples: {exc}") from exc
    return reference_radius(x, dims=options.dims, quantile=options.quantile, scale=options.scale)


def reference_radius(
    x: np.ndarray, *, dims: int = 64, quantile: float = 0.01, scale: float = 0.5
) -> float:
    """``scale`` x the ``quantile`` of the nearest-neighbour distances of benign rows ``x``
    (any row shape), after the stage's sketch to ``dims`` values: what ``reference``
    calibrates at load, and what ``guard init`` writes as ``radius``. The defaults are
    the options'."""
    rows = x.reshape(len(x), -1)
    sketch = Sketch.make(rows.shape[1], dims)
    return calibrate_radius(sketch(rows), quantile=quantile, scale=scale)


def _metadata_classes(env: StageEnv) -> int | None:
    if env.metadata is None:
        return None
    for spec in env.metadata.outputs:
        shape = tuple(spec.shape)
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
            return int(shape[1])
    return None
