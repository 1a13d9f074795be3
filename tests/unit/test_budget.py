"""The budget stage: quotas over fixed windows, 429 with Retry-After."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.errors import PolicyError, RateLimited
from guard.inference import InferRequest
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.budget import Budget
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from guard.state.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(store: MemoryStore | None = None, **options: Any) -> Budget:
    options = {"limits": [{"queries": 5, "per": "1s"}, {"queries": 8, "per": "1m"}]} | options
    env = StageEnv(
        model="digits", backend=None, local=None, metadata=None, state=store or MemoryStore()
    )
    return Budget.from_config(Section(options, source="p.yaml", path="budget"), env)


def context(rows: int = 1, client: str = "alice", shadow: bool = False) -> RequestContext:
    request = InferRequest(model_name="digits", inputs={"input": np.zeros((rows, 64), np.float32)})
    return RequestContext(
        request_id="r", model="digits", client=Client(client), request=request, shadow_mode=shadow
    )


async def test_each_window_limits_and_resets() -> None:
    clock = Clock()
    stage = build(MemoryStore(clock=clock))
    for _ in range(5):
        assert await stage.on_request(context()) is Verdict.CONTINUE
    ctx = context()
    with pytest.raises(RateLimited, match="6 of 5 queries per 1s") as refused:
        await stage.on_request(ctx)
    assert refused.value.retry_after == pytest.approx(1.0)
    assert ctx.findings[-1].action is Action.DENY and ctx.findings[-1].technique == "AML.T0040"
    assert (ctx.findings[-1].score, ctx.findings[-1].threshold) == (6.0, 5.0)
    clock.now += 1.0  # the 1 s window resets; the minute's has 6 of 8
    assert await stage.on_request(context()) is Verdict.CONTINUE
    with pytest.raises(RateLimited, match="9 of 8 queries per 1m") as refused:
        await stage.on_request(context(rows=2))
    assert refused.value.retry_after == pytest.approx(59.0)


async def test_rows_or_requests_are_counted() -> None:
    with pytest.raises(RateLimited):
        await build().on_request(context(rows=6))
    stage = build(count="requests")
    for _ in range(5):
        assert await stage.on_request(context(rows=6)) is Verdict.CONTINUE


async def test_clients_have_their_own_quota() -> None:
    stage = build()
    await stage.on_request(context(rows=5, client="a"))
    assert await stage.on_request(context(rows=5, client="b")) is Verdict.CONTINUE


@pytest.mark.parametrize("action", ["flag", "shadow", "degrade"])
async def test_non_deny_actions_serve_the_request(action: str) -> None:
    stage = build(action=action)
    ctx = context(rows=6)
    assert await stage.on_request(ctx) is Verdict.CONTINUE
    assert ctx.findings[-1].action is Action(action)
    assert ctx.degraded is (action == "degrade")


async def test_shadow_mode_never_refuses() -> None:
    ctx = context(rows=6, shadow=True)
    assert await build().on_request(ctx) is Verdict.CONTINUE
    assert ctx.findings[-1].action is Action.SHADOW and ctx.findings[-1].intended is Action.DENY


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limits": None}, "limits must list at least one"),
        ({"limits": []}, "limits must list at least one"),
        ({"limits": [{"queries": 5}]}, r"limits\[0\].per is required"),
        ({"limits": [{"queries": 0, "per": 1}]}, "queries must be >= 1"),
        ({"limits": [{"queries": 5, "per": "soon"}]}, "per must be a duration"),
        ({"limits": [{"queries": 5, "per": "0s"}]}, "per must be a positive duration"),
        ({"limits": [{"queries": 5, "per": -1}]}, "per must be > 0"),
        (
            {"limits": [{"queries": 5, "per": 60}, {"queries": 9, "per": "1m"}]},
            "repeats the window 1m",
        ),
        ({"limits": [{"queries": 5, "per": 1, "burst": 2}]}, "unknown key"),
        ({"count": "bytes"}, "count must be one of rows, requests"),
    ],
)
def test_bad_options_stop_the_load(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build(**options)


def test_durations_and_describe() -> None:
    stage = build(
        limits=[
            {"queries": 1, "per": "500ms"},
            {"queries": 2, "per": 90},
            {"queries": 3, "per": "1d"},
        ]
    )
    assert [q.per for q in stage.options.limits] == [0.5, 90.0, 86400.0]
    assert stage.describe()["limits"] == [
        {"queries": 1, "per": "0.5s"},
        {"queries": 2, "per": "90s"},
        {"queries": 3, "per": "1d"},
    ]


def test_rules_hold_for_options_built_in_code() -> None:
    options = build().options
    with pytest.raises(OptionError, match="limits must list at least one"):
        dataclasses.replace(options, limits=())
    with pytest.raises(OptionError, match=r"limits\[1\].per repeats the window 1s"):
        dataclasses.replace(options, limits=(options.limits[0], options.limits[0]))
