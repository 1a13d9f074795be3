"""PRADA: the algorithm's steps, then the stage on responses."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard._native import prada_nearest as native_nearest
from guard._py import prada as twin
from guard.backends.onnx import OnnxBackend
from guard.clients import Client
from guard.configreader import Section
from guard.defenses.prada import (
    FILTER_VALUES,
    GrowingSet,
    History,
    class_threshold,
    observe,
    shapiro_w,
)
from guard.errors import PolicyError
from guard.inference import InferRequest, InferResponse
from guard.models import load_samples, model_path
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.prada import Prada
from guard.state.base import StateStore, client_key
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from tests.integration.redis_server import RedisServer

try:
    from guard._ext import prada as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(ext is None, reason="the Cython extension is not built")

# -- the algorithm ------------------------------------------------------------------------


def naive_threshold(joined: list[float]) -> float:
    """T_c as the paper updates it, one growth at a time."""
    t, grown = 0.0, []
    for d in joined:
        grown.append(d)
        t = max(t, float(np.mean(grown) - np.std(grown)))
    return t


@pytest.mark.parametrize("joined", [[], [3.0], [3.0, 1.0], [1.0, 5.0, 2.0, 8.0, 8.5], [2.0] * 6])
def test_class_threshold_is_the_running_max_of_mean_minus_std(joined: list[float]) -> None:
    with_first = np.array(
        [np.nan, *joined], dtype=np.float32
    )  # the first member joined at no distance
    assert class_threshold(with_first) == pytest.approx(naive_threshold(joined), abs=1e-6)


def test_observe_grows_the_set_only_past_the_threshold() -> None:
    g = GrowingSet(2, cap=10)
    assert observe(g, np.array([0, 0], np.float32)).distance is None  # the first only starts G_c
    far = observe(g, np.array([3, 4], np.float32))
    assert (far.distance, far.grows) == (5.0, True)  # T was 0
    assert class_threshold(g.joined) == 5.0
    near = observe(g, np.array([0, 1], np.float32))
    assert (near.distance, near.grows) == (1.0, False)  # min over G_c, below T = 5
    assert g.members.shape == (2, 2)


@pytest.mark.parametrize("cap", [1, 3, 4, 9, 200])
def test_growing_sets_keep_their_newest_members_oldest_first(cap: int) -> None:
    rng = np.random.default_rng(cap)
    g, added = GrowingSet(5, cap), []
    for i in range(3 * cap + 7):
        x = rng.uniform(0, 1, 5).astype(np.float32)
        g.add(x, float(i))
        added.append(np.concatenate(([i], x)).astype(np.float32))
        np.testing.assert_array_equal(g.table, np.array(added[-cap:]))
        assert g.members.flags.c_contiguous and len(g) == min(cap, i + 1)
        assert g.threshold == twin.threshold(g.joined)  # T_c of the kept members
        assert g.nearest(x) == 0.0 and g.nearest(x + 1) == twin.scan(g.table, x + 1)[0]
    assert g.nbytes <= (cap + max(1, cap // 4)) * (5 * 4 + 4 + 8)  # values, joined, norm


@pytest.mark.parametrize(
    ("k", "dim", "scale"), [(8, 3072, 1.0), (60, 3072, 255.0), (200, 300, 16.0)]
)
def test_large_sets_find_the_kernels_nearest_bit_for_bit(k: int, dim: int, scale: float) -> None:
    # Large sets are compared in float32 first; the answer is still the full scan's.
    assert k * dim >= FILTER_VALUES
    rng = np.random.default_rng(k + dim)
    g = GrowingSet(dim, cap=k)
    base = rng.uniform(-scale, scale, dim).astype(np.float32)
    for i in range(k):  # near-ties: members a little off one point, and far ones
        spread = scale * (1e-3 if i % 2 else 1.0)
        g.add(base + rng.normal(0, spread, dim).astype(np.float32), float(i))
    queries = [base, g.members[3].copy(), g.members[4] + np.float32(1e-6 * scale)]
    queries += [rng.uniform(-scale, scale, dim).astype(np.float32) for _ in range(5)]
    for x in queries:
        assert g.nearest(x) == twin.nearest(g.members, x) == native_nearest(g.members, x)
        norms = (g.members.astype(np.float64) ** 2).sum(axis=1)
        largest = float(np.sqrt(norms.max()))
        assert twin.nearest_pruned(g.members, norms, largest, x) == g.nearest(x)
        if ext is not None:
            assert ext.nearest_pruned(g.members, norms, largest, x) == g.nearest(x)
            assert ext.nearest_pruned(g.members, norms, np.inf, x) == g.nearest(x)  # no bound
    assert g.nearest(g.members[3].copy()) == 0.0


def test_history_records_round_trip() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    records = np.frombuffer(
        History.encode(x, np.array([7, -1, 2**40])),
        History(4, max_per_class=2, max_distances=3).dtype,
    )
    assert records["label"].tolist() == [7, -1, 2**40]
    np.testing.assert_array_equal(records["x"], x)


def random_table(rng: np.random.Generator, k: int, dim: int) -> np.ndarray:
    table = rng.uniform(0, 16, (k, dim + 1)).astype(np.float32)
    table[0, 0] = np.nan  # the first member joined at no distance
    return table


@needs_ext
@pytest.mark.parametrize(
    ("k", "dim"), [(1, 1), (1, 64), (2, 3), (7, 64), (4, 67), (3, 130), (200, 64), (5, 3072)]
)
def test_scan_kernel_equals_its_twin_bit_for_bit(k: int, dim: int) -> None:
    rng = np.random.default_rng(k * 10_000 + dim)
    for _ in range(5):
        table, x = random_table(rng, k, dim), rng.uniform(0, 16, dim).astype(np.float32)
        assert ext.scan(table, x) == twin.scan(table, x)
        # the two values apart, for members and joined distances held apart
        members, joined = table[:, 1:].copy(), table[:, 0].copy()
        assert ext.nearest(members, x) == twin.nearest(members, x) == twin.scan(table, x)[0]
        assert ext.threshold(joined) == twin.threshold(joined) == twin.scan(table, x)[1]
        table[rng.integers(k), 1:] = x  # an exact member: distance 0
        assert ext.scan(table, x) == twin.scan(table, x) == (0.0, twin.threshold(table[:, 0]))
    assert ext.threshold(np.empty(0, np.float32)) == twin.threshold(np.empty(0)) == 0.0


@pytest.mark.parametrize("scan", [twin.scan, pytest.param(ext and ext.scan, marks=needs_ext)])
def test_scan_is_the_nearest_member_and_the_threshold(scan: Any) -> None:
    rng = np.random.default_rng(3)
    table, x = random_table(rng, 30, 64), rng.uniform(0, 16, 64).astype(np.float32)
    d2, t = scan(table, x)
    members = table[:, 1:].astype(np.float64)
    assert d2 == pytest.approx(np.min(np.sum((members - x) ** 2, axis=1)), rel=1e-6)
    assert t == pytest.approx(naive_threshold(table[1:, 0].tolist()), rel=1e-6)
    with pytest.raises(ValueError, match="table must be"):
        scan(table[:, :10], x)
    with pytest.raises(ValueError, match="table must be"):
        scan(np.empty((0, 65), np.float32), x)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 11, 20, 100, 999, 1000])
def test_shapiro_w_is_scipys_statistic(n: int) -> None:
    from scipy.stats import shapiro

    rng = np.random.default_rng(n)
    for x in (rng.normal(10, 1, n), rng.gamma(1.5, 2.0, n), rng.uniform(0, 1, n)):
        assert shapiro_w(x) == float(shapiro(x).statistic)


def test_shapiro_w_separates_normal_from_skewed_distances() -> None:
    rng = np.random.default_rng(0)
    assert shapiro_w(rng.normal(10, 1, 300)) > 0.95
    assert shapiro_w(np.concatenate([np.full(250, 0.1), rng.normal(10, 1, 50)])) < 0.9
    assert shapiro_w(np.full(10, 2.0)) == 1.0
    with pytest.raises(ValueError, match="at least 3"):
        shapiro_w(np.ones(2))


# -- the stage ------------------------------------------------------------------------------

ONNX = OnnxBackend(model_path("digits"), name="digits", device="cpu")


def build(store: StateStore | None = None, **options: Any) -> Prada:
    env = StageEnv(
        model="digits",
        backend=None,
        local=None,
        metadata=ONNX.model_metadata,
        state=store or MemoryStore(),
    )
    return Prada.from_config(Section(options, source="p.yaml", path="prada"), env)


async def ask(
    stage: Prada, x: np.ndarray, client: str = "alice", outputs: tuple[str, ...] = ()
) -> RequestContext:
    x = np.atleast_2d(x).astype(np.float32)
    request = InferRequest(model_name="digits", inputs={"input": x})
    ctx = RequestContext(request_id="r", model="digits", client=Client(client), request=request)
    await stage.on_request(ctx)
    answer = ONNX.run({"input": x})
    ctx.response = InferResponse(
        model_name="digits",
        outputs={k: v for k, v in answer.items() if not outputs or k in outputs},
    )
    return ctx


def walk(n: int, seed: int = 0) -> np.ndarray:
    """Extraction-like queries as JbDA sends them: a few seeds, then sign steps off earlier queries."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    queries = list(x[rng.choice(len(x), 10, replace=False)])
    while len(queries) < n:
        base = queries[rng.integers(len(queries))]
        queries.append(np.clip(base + np.sign(rng.normal(size=64)), 0, 16))
    return np.array(queries[:n])


async def run(
    stage: Prada, queries: np.ndarray, client: str = "alice", **kw: Any
) -> tuple[list[Verdict], RequestContext]:
    """Each query in turn; the verdicts and the last request's context."""
    verdicts = []
    for q in queries:
        ctx = await ask(stage, q, client, **kw)
        verdicts.append(await stage.on_response(ctx))
    return verdicts, ctx


async def test_benign_held_out_queries_are_not_flagged() -> None:
    x, _ = load_samples("digits")
    verdicts, _ = await run(
        build(action="deny"), x[np.random.default_rng(1).permutation(len(x))[:300]]
    )
    assert verdicts == [Verdict.CONTINUE] * 300


async def test_exact_repeats_are_not_evidence() -> None:
    """A client re-sending its own inputs exactly (retries, a popular input): distances of 0
    would read as non-natural; they are skipped."""
    x, _ = load_samples("digits")
    held_out = x[np.random.default_rng(2).permutation(len(x))[:60]]
    verdicts, _ = await run(build(action="deny"), np.concatenate([held_out] * 5))
    assert verdicts == [Verdict.CONTINUE] * 300


async def test_misdirect_answers_later_requests_from_the_first_query() -> None:
    stage = build(action="misdirect")
    queries = walk(120)
    verdicts, last = await run(stage, queries)
    assert set(verdicts) == {Verdict.CONTINUE}  # silent
    assert any(f.action is Action.MISDIRECT for f in last.findings)
    later = await ask(stage, walk(1, seed=5)[0])
    np.testing.assert_array_equal(later.substitute["input"], queries[:1].astype(np.float32))


async def test_extraction_like_queries_are_flagged_once_tested() -> None:
    stage = build(action="deny")
    verdicts, _ = await run(stage, walk(140))
    first = verdicts.index(Verdict.DENY)
    assert first + 1 == 110  # 100 distances (the first query has none), tested every 10
    _, last = await run(stage, walk(10, seed=1))
    finding = last.findings[-1]
    assert (finding.stage, finding.technique, finding.threshold) == ("prada", "AML.T0024.002", 0.9)
    assert finding.score < 0.9 and "Shapiro-Wilk" in finding.message


async def test_clients_are_separate() -> None:
    store = MemoryStore()
    stage = build(store, action="deny")
    queries = walk(200)
    assert set((await run(stage, queries[::2], "a"))[0]) == {Verdict.CONTINUE}
    assert set((await run(stage, queries[1::2], "b"))[0]) == {Verdict.CONTINUE}


async def test_class_comes_from_any_output_the_client_asked_for() -> None:
    for outputs in (("label",), ("probabilities",)):
        stage = build(action="deny")
        assert Verdict.DENY in (await run(stage, walk(110), outputs=outputs))[0]


async def test_a_batch_counts_each_row() -> None:
    stage = build(action="flag")
    ctx = await ask(stage, walk(110))
    assert await stage.on_response(ctx) is Verdict.CONTINUE
    assert ctx.findings and ctx.findings[-1].action is Action.FLAG


async def test_histories_are_bounded() -> None:
    store = MemoryStore()
    stage = build(store, max_per_class=4, max_distances=50, min_queries=20)
    await run(stage, walk(120))
    key = client_key("alice", "prada", "digits", "q", "64")
    size = History(64, max_per_class=4, max_distances=50).dtype.itemsize
    _, log = await store.append_log(key, b"", 50 * size, 60.0, None)
    assert 50 <= len(log) // size <= 50 + 50 // 4 and len(log) % size == 0  # newest queries
    (views,) = stage._views.values()
    history = await views.append(store, key, b"", 50 * size, 60.0)
    assert history.count == 120 and history.distances.size == 50
    assert all(len(g) <= 4 for g in history.sets.values())


async def test_views_are_bounded_as_the_memory_store_bounds_clients() -> None:
    # A view per client, as many as the store keeps clients (each counts at least its
    # share of the store's bytes): many passing clients do not grow this process.
    store = MemoryStore(max_clients=5, max_bytes=1 << 20)
    stage = build(store)
    for i, q in enumerate(walk(40)):
        await stage.on_response(await ask(stage, q, client=f"c{i}"))
    (views,) = stage._views.values()
    assert len(views) <= 5 and views.nbytes <= 1 << 20


def fold_all(records: bytes, chunks: list[int], **options: int) -> History:
    history = History(64, **options)
    size = history.dtype.itemsize
    at = 0
    for n in chunks:
        history.fold(records[at : at + n * size])
        at += n * size
    return history


def same_state(one: History, other: History) -> None:
    assert one.count == other.count and one.sets.keys() == other.sets.keys()
    np.testing.assert_array_equal(one.distances, other.distances)
    for c, g in one.sets.items():
        np.testing.assert_array_equal(g.table, other.sets[c].table)


@pytest.mark.parametrize("options", [{}, {"max_per_class": 3, "max_distances": 20}])
def test_a_history_folded_a_piece_at_a_time_is_the_one_folded_at_once(
    options: dict[str, int],
) -> None:
    rng = np.random.default_rng(11)
    x = np.concatenate([walk(300), walk(20)])  # repeats at the end
    labels = ONNX.run({"input": x.astype(np.float32)})["label"]
    records = History.encode(x.astype(np.float32), labels)
    o = {"max_per_class": 200, "max_distances": 1000, **options}
    whole = fold_all(records, [len(x)], **o)
    pieces = fold_all(
        records, list(np.diff([0, *sorted(rng.choice(319, 40, False) + 1), 320])), **o
    )
    same_state(whole, pieces)
    assert whole.count == 320 and whole.distances.size <= min(o["max_distances"], 320)
    assert all(len(g) <= o["max_per_class"] for g in whole.sets.values())


async def test_the_stage_view_is_the_history_rebuilt_from_the_whole_log() -> None:
    store = MemoryStore()
    stage = build(store)
    x, _ = load_samples("digits")
    queries = np.concatenate([walk(150), x[:40]])
    for i in range(0, len(queries), 7):  # batches of 7
        await stage.on_response(await ask(stage, queries[i : i + 7]))
    key = client_key("alice", "prada", "digits", "q", "64")
    (views,) = stage._views.values()
    size = History(64, max_per_class=1, max_distances=3).dtype.itemsize
    kept = await views.append(store, key, b"", 1000 * size, 60.0)
    rebuilt = History(64, max_per_class=200, max_distances=1000)
    rebuilt.fold((await store.append_log(key, b"", 1000 * size, 60.0, None))[1])
    same_state(kept, rebuilt)
    assert kept.count == len(queries) and len(kept.sets) > 1


async def verdicts_and_scores(
    stages: list[Prada], queries: list[np.ndarray]
) -> list[tuple[Verdict, float | None]]:
    """Each batch in turn, sent through the stages in rotation: each verdict and the W of
    its finding (None: no finding)."""
    out = []
    for i, batch in enumerate(queries):
        stage = stages[i % len(stages)]
        ctx = await ask(stage, batch)
        verdict = await stage.on_response(ctx)
        out.append((verdict, ctx.findings[-1].score if ctx.findings else None))
    return out


async def test_two_replicas_on_one_redis_decide_as_one(redis_server: RedisServer) -> None:
    # Two guard processes (two stages, each with its own views) share one real Redis and
    # take turns at one client's requests; every decision and W is that of one stage alone.
    x, _ = load_samples("digits")
    queries = np.concatenate([x[:30], walk(160), x[30:40]])
    sizes = np.random.default_rng(4).integers(1, 4, 100)  # batches of 1 to 3 queries
    batches = np.split(queries, np.cumsum(sizes)[np.cumsum(sizes) < len(queries)])
    alone = await verdicts_and_scores([build(action="deny")], batches)
    denied = [score for verdict, score in alone if verdict is Verdict.DENY]
    assert denied and all(w is not None and w < 0.9 for w in denied)  # the walk is caught
    stores = [RedisStore(redis_server.url, key_prefix="p:", timeout=5.0) for _ in range(2)]
    try:
        replicas = [build(store, action="deny") for store in stores]
        assert await verdicts_and_scores(replicas, batches) == alone
    finally:
        for store in stores:
            await store.close()


async def test_degrade_marks_the_client() -> None:
    store = MemoryStore()
    stage = build(store, action="degrade", degrade_for=60)
    _, last = await run(stage, walk(110))
    assert last.degraded
    x, _ = load_samples("digits")
    ctx = await ask(stage, x[0])
    assert ctx.degraded and await store.marked(client_key("alice", "degrade", "digits"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delta": 1.0}, "delta must be < 1"),
        ({"min_queries": 2}, "min_queries must be >= 3"),
        ({"max_distances": 100, "min_queries": 200}, "min_queries must be <= 100"),
        ({"max_distances": 6000}, "max_distances must be <= 5000"),
        ({"output": "logits"}, "names no output of model digits"),
        ({"input": "pixels"}, "names no input of model digits"),
        ({"every": 0}, "every must be >= 1"),
        ({"windows": 3}, "unknown key"),
    ],
)
def test_bad_options_stop_the_load(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build(**options)


def test_describe() -> None:
    described = build(action="degrade").describe()
    assert described["delta"] == 0.9 and described["min_queries"] == 100
    assert described["action"] == "degrade" and described["degrade_for"] == "10m"
