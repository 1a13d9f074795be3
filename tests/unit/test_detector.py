"""What the detectors share: failure modes on a dead state store, degrade marks, label-only answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.errors import PolicyError, StateUnavailable
from guard.inference import InferRequest, InferResponse
from guard.pipeline import Action, BaseStage, Pipeline, RequestContext, Verdict, label_only
from guard.stages.budget import Budget
from guard.stages.detector import (
    WIDTHS,
    AnchorCache,
    DetectorOptions,
    Enforcement,
    WidthViews,
)
from guard.stages.env import StageEnv
from guard.stages.options import read_options
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from tests.integration.redis_server import RedisServer


class DeadStore(MemoryStore):
    """A store whose every operation fails as an unreachable Redis does."""

    async def incr(self, key: str, amount: int, window_s: float) -> tuple[int, float]:
        raise StateUnavailable("state store unavailable (redis: ConnectionError)")


class Backend:
    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
        return InferResponse(
            model_name="m", outputs={"probabilities": scores, "label": np.array([1, 0])}
        )


def context(x: np.ndarray | None = None) -> RequestContext:
    x = np.zeros((2, 4), np.float32) if x is None else x
    request = InferRequest(model_name="m", inputs={"input": x})
    return RequestContext(request_id="r", model="m", client=Client("alice"), request=request)


def budget(store: MemoryStore, **options: Any) -> Budget:
    env = StageEnv(model="m", backend=None, local=None, metadata=None, state=store)
    options = {"limits": [{"queries": 10, "per": 60}]} | options
    return Budget.from_config(Section(options, source="p.yaml", path="budget"), env)


async def test_dead_store_fails_closed_with_503() -> None:
    ctx = context()
    with pytest.raises(StateUnavailable) as refused:
        await Pipeline([budget(DeadStore())]).run(ctx, Backend())
    assert refused.value.status == 503
    assert (
        ctx.findings[-1].action is Action.FLAG
        and "state store unavailable" in ctx.findings[-1].message
    )


async def test_dead_store_fails_open_when_told() -> None:
    ctx = context()
    response = await Pipeline([budget(DeadStore(), on_error="open")]).run(ctx, Backend())
    assert response.outputs["label"].tolist() == [1, 0]
    assert ctx.verdict == "flag"


class Degrader(BaseStage):
    name = "degrader"

    async def on_request(self, ctx: RequestContext) -> Verdict:
        return ctx.report(self.name, Action.DEGRADE, "suspicious")


class Privacy(BaseStage):
    name = "privacy"
    handles_degrade = True


async def test_degraded_answers_are_label_only_by_default() -> None:
    ctx = context()
    response = await Pipeline([Degrader()]).run(ctx, Backend())
    assert response.outputs["probabilities"].tolist() == [[0, 1, 0], [1, 0, 0]]
    assert response.outputs["probabilities"].dtype == np.float32
    assert response.outputs["label"].tolist() == [1, 0]


async def test_a_stage_that_handles_degrade_takes_over() -> None:
    response = await Pipeline([Degrader(), Privacy()]).run(context(), Backend())
    assert response.outputs["probabilities"][0].tolist() == pytest.approx([0.1, 0.7, 0.2])


async def test_undegraded_answers_are_untouched() -> None:
    response = await Pipeline([]).run(context(), Backend())
    assert response.outputs["probabilities"][0].tolist() == pytest.approx([0.1, 0.7, 0.2])


def test_label_only_leaves_labels_and_single_scores_alone() -> None:
    response = InferResponse(
        model_name="m",
        outputs={
            "scores": np.array([[0.2, 0.8]], np.float64),
            "logit": np.array([[3.0]], np.float32),
            "label": np.array([1]),
            "embedding": np.zeros((1, 2, 2), np.float32),
        },
    )
    label_only(response)
    assert response.outputs["scores"].tolist() == [[0.0, 1.0]]
    assert response.outputs["logit"].tolist() == [[3.0]]
    assert response.outputs["embedding"].shape == (1, 2, 2)


async def test_marks_are_honoured_only_by_degrading_detectors() -> None:
    store = MemoryStore()
    env = StageEnv(model="m", backend=None, local=None, metadata=None, state=store)

    def enforcement(action: str) -> Enforcement:
        section = Section({"action": action}, source="p.yaml", path="x")
        options = read_options(DetectorOptions, section, env)
        return Enforcement.of(options, env, stage="x", technique="AML.T0000")

    await store.mark(enforcement("degrade").mark_key("alice"), 60)
    for action, degraded in (("deny", False), ("degrade", True)):
        ctx = context()
        await enforcement(action).honour_marks(ctx)
        assert ctx.degraded is degraded


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 600.0),
        (30, 30.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    assert read_degrade_for(value) == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "-1s", "1w", True, [1], float("inf"), 0])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(PolicyError, match="degrade_for must be"):
        read_degrade_for(value)


def read_degrade_for(value: Any) -> float:
    env = StageEnv(model="m", backend=None, local=None, metadata=None)
    section = Section({"degrade_for": value}, source="p.yaml")
    return read_options(DetectorOptions, section, env).degrade_for


def test_anchor_copies_are_bounded_and_go_stale() -> None:
    rows = np.ones((4, 8), np.float32)  # 128 bytes a copy
    cache = AnchorCache(max_bytes=300, fresh_s=60.0)
    for key in "abc":
        cache.put(key, rows)
    assert cache.get("a") is None  # over 300 bytes: the least recently used went
    assert cache.get("b") is rows and cache.get("c") is rows
    cache.drop("b")
    assert cache.get("b") is None
    stale = AnchorCache(max_bytes=300, fresh_s=0.0)
    stale.put("a", rows)
    time.sleep(0.001)
    assert stale.get("a") is None  # read too long ago: read again


async def test_anchors_remembered_by_one_replica_misdirect_on_another(
    redis_server: RedisServer,
) -> None:
    # Two replicas (two Enforcements, one Redis store): rows remembered through one are the
    # anchors the other answers a marked client from; the marked client's rows are not added.
    store = RedisStore(redis_server.url, key_prefix="d:", timeout=5.0)
    try:
        one, two = (
            Enforcement(
                stage="provenance",
                model="digits",
                action=Action.MISDIRECT,
                degrade_for=60.0,
                technique=None,
                store=store,
            )
            for _ in range(2)
        )
        walk = np.random.default_rng(1).uniform(0, 16, (4, 64)).astype(np.float32)
        for replica, row in zip([one, two, one], walk[:3], strict=True):
            await replica.honour_marks(context(row[None]), row[None], "input")
        await store.mark(one.misdirect_key("alice"), 60.0)
        for replica in (two, one, two):
            ctx = context(walk[3:])
            await replica.honour_marks(ctx, walk[3:], "input")
            np.testing.assert_array_equal(ctx.substitute["input"], walk[:1])  # the oldest row
        np.testing.assert_array_equal(await two._history(context(walk[:1]), 64), walk[:3])
        # The mark lapses; the client goes on through ``one`` (adding a row, so ``one``
        # drops its copy) and is marked again: ``one`` answers from the moved log at once.
        await store.mark(one.misdirect_key("alice"), 0.001)
        await asyncio.sleep(0.02)
        await one.honour_marks(context(walk[3:]), walk[3:], "input")
        assert one.anchors.get(one.rows_key("alice", 64)) is None
        np.testing.assert_array_equal(await one._history(context(walk[:1]), 64), walk)
    finally:
        await store.close()


async def test_a_marked_clients_anchors_are_its_last_history_rows() -> None:
    # The log keeps up to a quarter more than ``history`` rows before it trims; the
    # anchors are the last ``history`` of them, oldest first, in a copy of their own.
    one = Enforcement(
        stage="provenance",
        model="digits",
        action=Action.MISDIRECT,
        degrade_for=60.0,
        technique=None,
        store=MemoryStore(),
        history=8,
    )
    walk = np.random.default_rng(2).uniform(0, 16, (9, 64)).astype(np.float32)
    for row in walk:
        await one.honour_marks(context(row[None]), row[None], "input")
    kept = await one._history(context(walk[:1]), 64)
    np.testing.assert_array_equal(kept, walk[1:])
    assert kept.base is None or kept.base.nbytes == kept.nbytes  # owns its 8 rows only


class Rows:
    """The least view: the bytes it folded."""

    def __init__(self) -> None:
        self.data = b""

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def fold(self, records: bytes) -> None:
        self.data += records


def test_a_stage_keeps_views_of_a_few_widths_only() -> None:
    # A client cycling through row widths (a model without a validate stage takes any)
    # must not make a bounded set of views per width: the widths least recently used go.
    views = WidthViews(lambda width: Rows())
    kept = [views.of(width) for width in range(1, 4 * WIDTHS)]
    assert len(views._views) == WIDTHS
    assert views.of(4 * WIDTHS - 1) is kept[-1]  # the most recent stays
    assert views.of(1) is not kept[0]  # the first went: made again
