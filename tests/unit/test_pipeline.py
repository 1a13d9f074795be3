"""The chain's order, verdicts, actions and failure modes."""

from __future__ import annotations

import numpy as np
import pytest

from guard.clients import Client
from guard.errors import Denied, Overloaded
from guard.inference import InferRequest, InferResponse, ModelMetadata
from guard.pipeline import Action, BaseStage, Pipeline, RequestContext, Verdict


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
