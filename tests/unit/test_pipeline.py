"""The chain's order, verdicts, actions and failure modes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guard.clients import Client
from guard.configreader import Section
from guard.errors import Denied, Overloaded, RateLimited
from guard.inference import InferRequest, InferResponse, ModelMetadata
from guard.pipeline import Action, BaseStage, Pipeline, RequestContext, Verdict, ensure_prepared
from guard.stages.budget import Budget
from guard.stages.env import StageEnv
from guard.state.memory import MemoryStore


class Recorder(BaseStage):
    def __init__(
        self, name: str, log: list[str], *, respond: bool = False, action: Action | None = None
    ):
        self.name = name
        self.log = log
        self.respond = respond
        self.action = action

    async def on_request(self, ctx: RequestContext) -> Verdict:
        self.log.append(f"{self.name}.request")
        if self.action is not None:
            return ctx.report(self.name, self.action, "seen", score=1.0, threshold=0.5)
        if self.respond:
            ctx.response = InferResponse(model_name="m", outputs={"y": np.zeros(1)})
            return Verdict.RESPOND
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        self.log.append(f"{self.name}.response")
        return Verdict.CONTINUE


class RequestOnly(BaseStage):
    name = "request_only"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def on_request(self, ctx: RequestContext) -> Verdict:
        self.log.append("request_only.request")
        return Verdict.CONTINUE


class Broken(BaseStage):
    name = "broken"

    def __init__(self, fail_open: bool) -> None:
        self.fail_open = fail_open

    async def on_request(self, ctx: RequestContext) -> Verdict:
        raise RuntimeError("state store unreachable")


class EchoBackend:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        self.log.append("backend")
        return InferResponse(model_name=request.model_name, outputs=dict(request.inputs))

    async def metadata(self) -> ModelMetadata:
        raise NotImplementedError

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def _ctx(shadow: bool = False) -> RequestContext:
    request = InferRequest(model_name="m", inputs={"x": np.ones((1, 2), np.float32)})
    return RequestContext(
        request_id="r", model="m", client=Client("c"), request=request, shadow_mode=shadow
    )


async def test_request_stages_in_order_response_stages_reversed() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recorder("a", log), RequestOnly(log), Recorder("b", log)])
    await pipeline.run(_ctx(), EchoBackend(log))
    assert log == [
        "a.request",
        "request_only.request",
        "b.request",
        "backend",
        "b.response",
        "a.response",
    ]


async def test_hooks_an_instance_calls_idle_are_skipped() -> None:
    log: list[str] = []
    quiet = Recorder("quiet", log)
    quiet.idle_hooks = frozenset({"on_request"})  # its settings leave it nothing to do there
    await Pipeline([Recorder("a", log), quiet]).run(_ctx(), EchoBackend(log))
    assert log == ["a.request", "backend", "quiet.response", "a.response"]


async def test_coverage_leaves_the_request_side_only_when_it_has_no_mark_to_honour() -> None:
    from guard.stages.coverage import Coverage

    env = StageEnv(model="m", backend=None, local=None, metadata=None, state=MemoryStore())
    for action, request_side in [("flag", False), ("degrade", True), ("misdirect", True)]:
        section = Section({"radius": 1.0, "action": action}, source="p.yaml")
        pipeline = Pipeline([Coverage.from_config(section, env)])
        assert bool(pipeline._request_stages) is request_side, action
        assert pipeline._response_stages


async def test_respond_skips_backend_and_unwinds_only_stages_that_ran() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recorder("a", log), Recorder("b", log, respond=True), Recorder("c", log)])
    response = await pipeline.run(_ctx(), EchoBackend(log))
    assert log == ["a.request", "b.request", "b.response", "a.response"]
    assert list(response.outputs) == ["y"]


@pytest.mark.parametrize(
    ("action", "shadow", "denied", "verdict", "taken"),
    [
        (Action.ALLOW, False, False, "allow", Action.ALLOW),
        (Action.FLAG, False, False, "flag", Action.FLAG),
        (Action.DEGRADE, False, False, "degrade", Action.DEGRADE),
        (Action.DENY, False, True, "deny", Action.DENY),
        (Action.SHADOW, False, False, "shadow", Action.SHADOW),
        (Action.DENY, True, False, "shadow", Action.SHADOW),
        (Action.FLAG, True, False, "shadow", Action.SHADOW),
    ],
)
async def test_actions(
    action: Action, shadow: bool, denied: bool, verdict: str, taken: Action
) -> None:
    log: list[str] = []
    ctx = _ctx(shadow)
    pipeline = Pipeline([Recorder("detector", log, action=action)])
    if denied:
        with pytest.raises(Denied):
            await pipeline.run(ctx, EchoBackend(log))
        assert "backend" not in log
    else:
        await pipeline.run(ctx, EchoBackend(log))
        assert "backend" in log
    assert ctx.verdict == verdict
    (finding,) = ctx.findings
    assert finding.action is taken and finding.intended is action
    assert ctx.degraded is (taken is Action.DEGRADE)


async def test_stage_failure_closed_refuses_and_open_serves_flagged() -> None:
    log: list[str] = []
    with pytest.raises(Overloaded, match="broken"):
        await Pipeline([Broken(fail_open=False)]).run(_ctx(), EchoBackend(log))
    assert log == []
    ctx = _ctx()
    await Pipeline([Broken(fail_open=True)]).run(ctx, EchoBackend(log))
    assert log == ["backend"]
    assert ctx.verdict == "flag"
    assert "RuntimeError" in ctx.findings[0].message


async def test_stage_time_is_recorded() -> None:
    ctx = _ctx()
    await Pipeline([Recorder("a", [])]).run(ctx, EchoBackend([]))
    assert set(ctx.stage_seconds) == {"a"}
    assert ctx.stage_seconds["a"] >= 0
    assert ctx.upstream_seconds is not None


class Preparing(BaseStage):
    """A stage with a state round trip of ``wait`` seconds on each side."""

    def __init__(
        self,
        name: str,
        log: list[str],
        wait: float = 0.0,
        fails: bool = False,
        respond: bool = False,
    ) -> None:
        self.name, self.log, self.wait, self.fails, self.respond = name, log, wait, fails, respond

    async def prepare_request(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.prepare")
        await asyncio.sleep(self.wait)
        self.log.append(f"{self.name}.prepared")
        if self.fails:
            raise RuntimeError(f"{self.name} store down")
        ctx.stage_state[self.name] = "ready"

    async def on_request(self, ctx: RequestContext) -> Verdict:
        self.log.append(f"{self.name}.request:{ctx.stage_state.get(self.name)}")
        if self.respond:
            ctx.response = InferResponse(model_name="m", outputs={"y": np.zeros(1)})
            return Verdict.RESPOND
        return Verdict.CONTINUE

    async def prepare_response(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.prepare_response")
        await asyncio.sleep(self.wait)


@pytest.mark.parametrize("concurrent", [False, True])
async def test_prepare_hooks_run_together_after_the_stages_before_them(concurrent: bool) -> None:
    log: list[str] = []
    stages = [RequestOnly(log), Preparing("a", log, 0.01), Preparing("b", log, 0.0)]
    await Pipeline(stages, concurrent=concurrent).run(_ctx(), EchoBackend(log))
    together = ["a.prepare", "b.prepare", "b.prepared", "a.prepared"]  # b's wait is shorter
    in_turn = ["a.prepare", "a.prepared", "b.prepare", "b.prepared"]
    assert log == [
        "request_only.request",
        *(together if concurrent else in_turn),
        "a.request:ready",
        "b.request:ready",
        "backend",
        "a.prepare_response",
        "b.prepare_response",
    ]


async def test_a_failed_prepare_is_the_first_failing_stage_in_order() -> None:
    log: list[str] = []
    stages = [Preparing("a", log, 0.1, fails=True), Preparing("b", log, 0.0, fails=True)]
    with pytest.raises(Overloaded, match="stage a is unavailable"):
        await Pipeline(stages, concurrent=True).run(_ctx(), EchoBackend(log))
    assert "backend" not in log


async def test_a_chain_cut_short_prepares_responses_only_for_stages_that_ran() -> None:
    log: list[str] = []
    stages = [Preparing("a", log), Preparing("b", log, respond=True), Preparing("c", log)]
    await Pipeline(stages).run(_ctx(), EchoBackend(log))
    assert "backend" not in log and "c.request:ready" not in log
    assert [e for e in log if "response" in e] == ["a.prepare_response", "b.prepare_response"]


async def test_a_stage_called_alone_prepares_itself_once() -> None:
    stage = Budget.from_config(
        Section({"limits": [{"queries": 1, "per": "1m"}]}, source="p.yaml", path="budget"),
        StageEnv(model="m", backend=None, local=None, metadata=None, state=MemoryStore()),
    )
    ctx = _ctx()
    await ensure_prepared(stage, "prepare_request", ctx)
    await ensure_prepared(stage, "prepare_request", ctx)  # already: not counted twice
    assert await stage.on_request(ctx) is Verdict.CONTINUE
    with pytest.raises(RateLimited):
        await stage.on_request(_ctx())
