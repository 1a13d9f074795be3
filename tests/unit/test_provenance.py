"""The provenance detector: chains of linked queries per client, repeats free."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.defenses.misdirect import anchor_rows
from guard.defenses.provenance import link_rows
from guard.errors import PolicyError
from guard.inference import InferRequest
from guard.models import load_samples
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.provenance import Provenance
from guard.state.memory import MemoryStore


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
