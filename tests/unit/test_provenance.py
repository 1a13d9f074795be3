"""The provenance detector: chains of linked queries per client, repeats free."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.defenses.misdirect import anchor_rows
from guard.defenses.provenance import ROW, ChainView, canonical, link_rows
from guard.errors import PolicyError
from guard.inference import InferRequest
from guard.models import load_samples
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.provenance import Provenance
from guard.state import StateStore
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from tests.integration.redis_server import RedisServer


def build(store: MemoryStore | None = None, **options: Any) -> Provenance:
    env = StageEnv(
        model="digits", backend=None, local=None, metadata=None, state=store or MemoryStore()
    )
    options = {"distance": 6.0} | options
    return Provenance.from_config(Section(options, source="p.yaml", path="provenance"), env)


def context(x: np.ndarray, client: str = "alice") -> RequestContext:
    request = InferRequest(
        model_name="digits", inputs={"input": np.atleast_2d(x).astype(np.float32)}
    )
    return RequestContext(request_id="r", model="digits", client=Client(client), request=request)


def test_link_rows_finds_the_nearest_earlier_row_and_repeats() -> None:
    history = np.array([[0.0, 0.0], [10.0, 0.0]])
    links = link_rows(history, np.array([[9.0, 0.0], [0.0, 0.0], [50.0, 0.0], [50.5, 0.0]]), 2.0)
    assert [(round(k.nearest, 3), k.parent, k.repeat, k.linked) for k in links] == [
        (1.0, 1, False, True),
        (0.0, 0, True, False),
        (40.0, 1, False, False),  # too far from everything
        (0.5, 4, False, True),  # the batch's third row
    ]
    assert link_rows(np.zeros((0, 2)), np.array([[1.0, 1.0]]), 1.0)[0].parent == -1


def test_anchor_rows_picks_the_earliest_within_radius() -> None:
    history = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    rows = np.array([[1.2, 0.0], [10.5, 0.0], [30.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        anchor_rows(history, rows, 2.0), [[0.0, 0.0], [10.0, 0.0], [30.0, 0.0]]
    )
    np.testing.assert_array_equal(anchor_rows(history, rows, None), [[0.0, 0.0]] * 3)
    np.testing.assert_array_equal(anchor_rows(np.zeros((0, 2)), rows, None), rows)


async def test_a_noisy_walk_is_caught_by_its_chain() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(0)
    stage = build()
    verdicts = []
    for _ in range(10):  # fresh noise each time: no two queries alike
        q = np.clip(x[3] + rng.normal(0, 0.5, 64), 0, 16)
        verdicts.append(await stage.on_request(context(q)))
    assert verdicts[:7] == [Verdict.CONTINUE] * 7 and verdicts[7:] == [Verdict.DENY] * 3


async def test_honest_clients_stay_below_the_chain_length() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(1)
    stage = build()
    for i in range(200):  # fresh digits, each now and then retried exactly or jittered
        row = x[i]
        for sent in (row, row, np.clip(row + rng.normal(0, 0.3, 64), 0, 16)):
            ctx = context(sent)
            assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_exact_repeats_do_not_grow_a_chain() -> None:
    x, _ = load_samples("digits")
    stage = build(links=2)
    for _ in range(20):
        ctx = context(x[5])
        assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_chains_are_per_client() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(2)
    stage = build(links=3)
    for i in range(30):  # thirty clients, one jittered copy of a popular digit each
        ctx = context(np.clip(x[6] + rng.normal(0, 0.3, 64), 0, 16), client=f"u{i}")
        assert await stage.on_request(ctx) is Verdict.CONTINUE and not ctx.findings


async def test_misdirect_finding_substitutes_the_first_row() -> None:
    x, _ = load_samples("digits")
    rng = np.random.default_rng(3)
    stage = build(action="misdirect", links=3)
    walk = np.clip(x[8] + rng.normal(0, 0.5, (4, 64)), 0, 16).astype(np.float32)
    contexts = [context(q) for q in walk]
    for ctx in contexts:
        assert await stage.on_request(ctx) is Verdict.CONTINUE
    assert contexts[-2].findings and contexts[-2].findings[0].action is Action.MISDIRECT
    np.testing.assert_array_equal(contexts[-1].substitute["input"], walk[:1])


async def test_the_history_is_bounded() -> None:
    store = MemoryStore()
    stage = build(store, history=16)
    x, _ = load_samples("digits")
    for row in x[:40]:
        await stage.on_request(context(row))
    key, size = stage.key("alice", 64), 64 * 2  # float16 rows
    _, log = await store.append_log(key, b"", 1 << 20, 60.0, None)
    assert 16 * size <= len(log) <= 20 * size  # trimmed to 16 rows past a quarter more
    view = await stage.views(64).append(store, key, b"", 16 * size, 60.0)
    assert view.held == 16 and sum(view.counts.values()) == 16


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"distance": -1.0}, "distance"),
        ({"links": 1}, "links"),
        ({"action": "bogus"}, "action"),
        ({"distance": 6.0, "window": 3}, "window"),
    ],
)
def test_bad_options_stop_the_load(options: dict[str, Any], error: str) -> None:
    with pytest.raises(PolicyError, match=error):
        build(**options)


def test_distance_is_required() -> None:
    env = StageEnv(model="digits", backend=None, local=None, metadata=None, state=MemoryStore())
    with pytest.raises(PolicyError, match="distance"):
        Provenance.from_config(Section({}, source="p.yaml", path="provenance"), env)


def test_misdirect_is_refused_where_a_stage_cannot_do_it() -> None:
    from guard.stages.budget import Budget

    env = StageEnv(model="digits", backend=None, local=None, metadata=None, state=MemoryStore())
    section = Section(
        {"limits": [{"queries": 1, "per": "1m"}], "action": "misdirect"},
        source="p.yaml",
        path="budget",
    )
    with pytest.raises(PolicyError, match="action"):
        Budget.from_config(section, env)


def walk_and_noise(rng: np.random.Generator, n: int, width: int = 64) -> np.ndarray:
    """``n`` rows: walks around a few starting rows (linked), fresh rows, exact repeats."""
    starts = rng.uniform(0, 16, (3, width))
    rows = []
    for _ in range(n):
        kind = rng.integers(4)
        if kind == 0 or not rows:
            rows.append(rng.uniform(0, 16, width))  # fresh
        elif kind == 1:
            rows.append(rows[rng.integers(len(rows))])  # an exact repeat
        else:
            rows.append(np.clip(starts[kind - 2] + rng.normal(0, 0.6, width), 0, 16))
    return canonical(np.array(rows))


def state(view: ChainView) -> tuple[Any, ...]:
    """What a view decides from, oldest kept row first."""
    order = np.argsort(view.seqs)
    return (
        view.held,
        view.folded,
        view.rows[order].tobytes(),
        *(np.asarray(column)[order].tolist() for column in (view.seqs, view.chains)),
        *(np.asarray(column)[order].tolist() for column in (view.linked, view.nearest)),
        sorted(view.counts.items()),
    )


@pytest.mark.parametrize("width", [3, 64, 3072])
def test_the_view_links_each_row_to_the_nearest_kept_row(width: int) -> None:
    # Against the exhaustive scan over the window the row saw: same nearest row, repeat
    # and link; chains and their counts as a brute-force pass over the rows derives them.
    rng = np.random.default_rng(4)
    cap, distance = 24, 3.0 * np.sqrt(width / 64)
    view = ChainView(width, cap, distance)
    kept: list[tuple[np.ndarray, int]] = []  # (row, chain), oldest first
    for record in walk_and_noise(rng, 120, width):
        row = record.astype(np.float32)
        window = np.array([r for r, _ in kept]).reshape(-1, width)
        (expected,) = link_rows(window, row[None], distance)
        before = view.rows[: view.held].copy()  # the parent's slot may take the row
        link = view.add(row, record.tobytes())
        assert (link.repeat, link.linked) == (expected.repeat, expected.linked)
        assert link.nearest == pytest.approx(expected.nearest, rel=1e-5)
        if expected.parent >= 0:
            np.testing.assert_array_equal(before[link.parent], window[expected.parent])
        if link.repeat:
            continue
        chain = kept[expected.parent][1] if link.linked else view.folded - 1
        kept = [*kept, (row, chain)][-cap:]
        slot = view.find(record.tobytes())
        assert view.chains[slot] == chain
        assert view.chain_rows(slot) == sum(c == chain for _, c in kept)
    assert view.held == cap and sum(view.counts.values()) == cap


def test_a_view_folded_request_by_request_equals_one_rebuilt_from_the_whole_log() -> None:
    rng = np.random.default_rng(5)
    records = walk_and_noise(rng, 90)
    incremental, rebuilt = ChainView(64, 128, 6.0), ChainView(64, 128, 6.0)
    at = 0
    while at < len(records):  # requests of 1 to 4 rows, folded as they come
        size = int(rng.integers(1, 5))
        incremental.fold(records[at : at + size].tobytes())
        at += size
    rebuilt.fold(records.tobytes())
    assert state(incremental) == state(rebuilt)
    assert max(incremental.counts.values()) >= 8  # the walks made long chains


async def test_the_stage_view_equals_one_rebuilt_from_its_log() -> None:
    store, rng = MemoryStore(), np.random.default_rng(6)
    stage = build(store, history=512, links=100)
    for row in walk_and_noise(rng, 200):
        await stage.on_request(context(row.astype(np.float32)))
    key, size = stage.key("alice", 64), 64 * ROW.itemsize
    view = await stage.views(64).append(store, key, b"", 512 * size, 60.0)
    _, log = await store.append_log(key, b"", 512 * size, 60.0, None)
    rebuilt = ChainView(64, 512, 6.0)
    rebuilt.fold(log)
    assert state(view) == state(rebuilt) and view.held < 200  # repeats were not appended


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[StateStore]:
    store = RedisStore(redis_server.url, key_prefix="p:", timeout=5.0)
    yield store
    await store.close()


async def first_findings(stages: list[Provenance], walk: np.ndarray) -> list[float]:
    """The scores of the findings as ``stages`` take the client's requests in turn."""
    scores = []
    for i, q in enumerate(walk):
        ctx = context(q)
        await stages[i % len(stages)].on_request(ctx)
        scores.append(ctx.findings[0].score if ctx.findings else 0.0)
    return scores


async def test_two_replicas_on_one_redis_store_find_what_one_would(
    redis_store: StateStore,
) -> None:
    # A client's requests alternate between two replicas (two stages, one Redis store):
    # each folds the other's rows from the log, so the chain grows and the finding comes
    # at the same request, with the same scores, as on one replica; both views agree.
    x, _ = load_samples("digits")
    rng = np.random.default_rng(7)
    walk = np.clip(x[3] + rng.normal(0, 0.5, (30, 64)), 0, 16).astype(np.float32)
    walk[10] = walk[4]  # an exact repeat, sent to the other replica
    fresh = rng.uniform(0, 16, (6, 64)).astype(np.float32)
    walk = np.concatenate([walk[:15], fresh, walk[15:]])
    one = await first_findings([build(MemoryStore(), links=12, history=24)], walk)
    replicas = [build(redis_store, links=12, history=24) for _ in range(2)]
    two = await first_findings(replicas, walk)
    # the 12th distinct walk row (one is a repeat) flags; 24 kept rows hold 6 fresh ones
    assert two == one and one.index(12.0) == 12 and max(one) == 18.0
    key = replicas[0].key("alice", 64)
    views = [await r.views(64).append(redis_store, key, b"", 24 * 128, 60.0) for r in replicas]
    assert state(views[0]) == state(views[1])
