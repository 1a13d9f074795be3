"""The coverage stage on real model answers: findings, pooling across accounts, options."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from guard.backends.onnx import OnnxBackend
from guard.clients import Client
from guard.configreader import Section
from guard.errors import PolicyError
from guard.inference import InferRequest, InferResponse
from guard.models import load_samples, model_path
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.coverage import Coverage
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from guard.state.base import client_key
from guard.state.memory import MemoryStore

ONNX = OnnxBackend(model_path("digits"), name="digits", device="cpu")


def build(store: MemoryStore | None = None, **options: Any) -> Coverage:
    env = StageEnv(
        model="digits",
        backend=None,
        local=None,
        metadata=ONNX.model_metadata,
        state=store or MemoryStore(),
    )
    if "radius" not in options:
        options.setdefault("reference", "builtin:digits")
    return Coverage.from_config(Section(options, source="p.yaml", path="coverage"), env)


async def ask(
    stage: Coverage, x: np.ndarray, client: str = "alice", outputs: tuple[str, ...] = ()
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


async def run(
    stage: Coverage, queries: np.ndarray, client: str = "alice", **kw: Any
) -> tuple[list[Verdict], list[RequestContext]]:
    verdicts, contexts = [], []
    for q in queries:
        ctx = await ask(stage, q, client, **kw)
        verdicts.append(await stage.on_response(ctx))
        contexts.append(ctx)
    return verdicts, contexts


def found(contexts: list[RequestContext]) -> list[int]:
    """1-based indices of the requests with a coverage finding."""
    return [i + 1 for i, c in enumerate(contexts) if any(f.stage == "coverage" for f in c.findings)]


def knockoff(n: int, seed: int = 0) -> np.ndarray:
    """Knockoff's queries: distinct natural inputs, in a random order."""
    x, _ = load_samples("digits")
    return x[np.random.default_rng(seed).permutation(len(x))[:n]]


def honest(n: int, seed: int = 0) -> np.ndarray:
    """A client with a few popular inputs, retries, jittered copies and some fresh inputs."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    popular = x[:5]
    queries: list[np.ndarray] = []
    for _ in range(n):
        kind = rng.choice(4, p=[0.35, 0.15, 0.2, 0.3])
        if kind == 0 or not queries:
            queries.append(popular[rng.integers(5)])
        elif kind == 1:
            queries.append(queries[-1])
        elif kind == 2:
            queries.append(np.clip(queries[-1] + rng.normal(0, 0.32, 64), 0, 16))
        else:
            queries.append(x[5 + rng.integers(len(x) - 5)])
    return np.array(queries, dtype=np.float32)


async def test_a_knockoff_stream_is_found_at_min_novel() -> None:
    stage = build(action="deny")
    verdicts, contexts = await run(stage, knockoff(170))
    assert found(contexts)[0] == 150  # every distinct held-out digit is novel
    assert verdicts[149] is Verdict.DENY and verdicts[:149] == [Verdict.CONTINUE] * 149
    finding = contexts[149].findings[-1]
    assert (finding.stage, finding.technique, finding.score, finding.threshold) == (
        "coverage",
        "AML.T0024.002",
        150.0,
        150.0,
    )
    assert "150 of its last 150 queries novel" in finding.message


async def test_an_honest_mix_is_not_found() -> None:
    stage = build(action="deny")
    _, contexts = await run(stage, honest(600))
    assert found(contexts) == []
    _, log = await stage.enforcement.store.append_log(
        client_key("alice", "coverage", "digits", "w64"), b"", 1 << 20, 60.0, None
    )
    assert len(log) == 600 * (4 + 2 * 64)  # one record a query: its class and fixed-point row


async def test_padding_with_repeats_is_caught_at_max_novel() -> None:
    stage = build(action="flag", min_novel=100, max_novel=300, window=1000)
    fresh = knockoff(300)
    padded = np.repeat(fresh, 2, axis=0)  # every input twice: half the stream repeats
    _, contexts = await run(stage, padded)
    assert found(contexts)[0] == 599  # the 300th novel input


async def test_a_batch_counts_each_row_and_label_only_answers_work() -> None:
    stage = build(action="flag", min_novel=20, shard_novel=10)
    ctx = await ask(stage, knockoff(25), outputs=("label",))
    assert await stage.on_response(ctx) is Verdict.CONTINUE
    assert ctx.findings and ctx.findings[-1].action is Action.FLAG


async def test_accounts_splitting_an_extraction_are_pooled() -> None:
    stage = build(action="flag", min_novel=150, shard_novel=50, every=25)
    queries = knockoff(180)
    sybils = ["s0", "s1", "s2"]
    contexts: dict[str, list[RequestContext]] = {s: [] for s in sybils}
    bystander: list[RequestContext] = []
    for i, q in enumerate(queries):
        name = sybils[i % 3]
        ctx = await ask(stage, q, name)
        await stage.on_response(ctx)
        contexts[name].append(ctx)
        for h in honest(1, seed=i):  # an honest client active at the same time
            ctx = await ask(stage, h, "alice")
            await stage.on_response(ctx)
            bystander.append(ctx)
    # each has 60 novel of its own (< 150); at their 50th the third one brings the pool to 150
    assert found(contexts["s2"]) == [50]
    assert found(contexts["s0"]) == found(contexts["s1"]) == []  # their next entry is at 75
    assert "several accounts" in contexts["s2"][49].findings[-1].message
    assert found(bystander) == []


async def test_accounts_can_be_judged_alone() -> None:
    stage = build(action="flag", accounts=False, every=1)
    for i, q in enumerate(knockoff(180)):
        ctx = await ask(stage, q, f"s{i % 3}")
        await stage.on_response(ctx)
        assert not ctx.findings


async def test_degrade_marks_the_client() -> None:
    store = MemoryStore()
    stage = build(store, action="degrade", degrade_for=60)
    _, contexts = await run(stage, knockoff(150))
    assert contexts[-1].degraded
    ctx = await ask(stage, knockoff(1, seed=9)[0])
    assert ctx.degraded and await store.marked(client_key("alice", "degrade", "digits"))
    other = await ask(stage, knockoff(1, seed=9)[0], "bob")
    assert not other.degraded


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reference": None}, "radius is required"),
        ({"radius": 2.0}, "radius and reference are exclusive"),
        ({"reference": "builtin:nope"}, "names no built-in model"),
        ({"reference": "data.npz"}, "must be builtin:NAME"),
        ({"reference": None, "radius": -1.0}, "radius must be > 0"),
        ({"min_fraction": 0.0}, "min_fraction must be > 0"),
        ({"min_novel": 100, "shard_novel": 101}, "shard_novel must be <= 100"),
        ({"min_novel": 700, "max_novel": 600}, "max_novel must be >= 700"),
        ({"window": 500, "max_novel": 600}, "max_novel must be <= 500"),
        ({"window": 20000}, "window must be <= 10000"),
        ({"output": "logits"}, "names no output of model digits"),
        ({"period": "soon"}, "must be a duration"),
        ({"action": "explode"}, "action must be one of"),
        ({"radious": 3}, "unknown key"),
    ],
)
def test_bad_options_stop_the_load(options: dict[str, Any], message: str) -> None:
    options = {k: v for k, v in {"reference": "builtin:digits", **options}.items() if v is not None}
    env = StageEnv(model="digits", backend=None, local=None, metadata=ONNX.model_metadata)
    with pytest.raises(PolicyError, match=message):
        Coverage.from_config(Section(options, source="p.yaml", path="coverage"), env)


def test_describe_and_the_calibrated_radius() -> None:
    described = build(action="degrade").describe()
    assert described["radius"] == pytest.approx(5.0, abs=0.5)  # half the 1 % NN distance
    assert described["min_novel"] == 150 and described["classes"] == 10
    assert described["action"] == "degrade" and described["degrade_for"] == "10m"
    assert build(radius=3.5).describe()["radius"] == 3.5


def test_rules_hold_for_options_built_in_code() -> None:
    options = build(radius=3.5).options
    with pytest.raises(OptionError, match="radius and reference are exclusive"):
        dataclasses.replace(options, reference="builtin:digits")
    with pytest.raises(OptionError, match="radius is required"):
        dataclasses.replace(options, radius=None)
