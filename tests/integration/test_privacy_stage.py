"""The ``privacy`` stage over real sockets, its policy validation, and budgets in Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from guard.backends.onnx import OnnxBackend
from guard.clients import Client
from guard.config import parse_policy
from guard.defenses.accountant import Accountant, Budget
from guard.errors import Overloaded, PolicyError, RateLimited
from guard.inference import InferRequest, InferResponse, RequestedOutput
from guard.metrics import GuardMetrics
from guard.models import load_samples, model_path
from guard.pipeline import RequestContext
from guard.runtime import build_runtime
from guard.stages.env import StageEnv
from guard.stages.privacy import BudgetOptions, MechanismOptions, Privacy, PrivacyOptions
from guard.state.memory import MemoryStore
from tests.integration.conftest import StartGuard, digits_policy
from tests.integration.redis_server import RedisServer, redis_module, redis_server  # noqa: F401

SECRET_ENV = "GUARD_TEST_PRIVACY_SECRET"
ENVIRON = {SECRET_ENV: "a-test-secret-of-enough-length"}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs and the model's own probabilities for them."""
    x, _ = load_samples("digits")
    x = x[:8]
    local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    return x, local.run({"input": x})["probabilities"]


def privacy_policy(**privacy: Any) -> dict[str, Any]:
    options = {"mechanism": "laplace", "epsilon": 2.0, "secret_env": SECRET_ENV, **privacy}
    return digits_policy(
        model={"stages": [{"validate": {"min": 0.0, "max": 16.0}}, {"privacy": options}]}
    )


def body(x: np.ndarray, outputs: list[str] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if outputs:
        doc["outputs"] = [{"name": name} for name in outputs]
    return orjson.dumps(doc)


async def infer(
    http: aiohttp.ClientSession, guard: Any, x: np.ndarray, outputs: list[str] | None = None
) -> tuple[int, dict[str, np.ndarray] | str, Any]:
    async with http.post(guard.make_url("/v2/models/digits/infer"), data=body(x, outputs)) as reply:
        payload = orjson.loads(await reply.read())
        if reply.status != 200:
            return reply.status, payload["error"], reply.headers
        tensors = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in payload["outputs"]}
        return reply.status, tensors, reply.headers


# -- serving ------------------------------------------------------------------------------


async def test_answers_are_noisy_keep_the_label_and_repeat_exactly(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, true_p = digits
    guard = await start_guard(privacy_policy(), environ=ENVIRON)
    status, first, _ = await infer(http, guard, x)
    assert status == 200, first
    p = first["probabilities"]
    assert not np.allclose(p, true_p, atol=1e-3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(p, axis=1), np.argmax(true_p, axis=1))
    np.testing.assert_array_equal(first["label"], np.argmax(true_p, axis=1))

    _, again, _ = await infer(http, guard, x)
    np.testing.assert_array_equal(again["probabilities"], p)
    # The same rows in another batch, in another order, get the same answers.
    order = [5, 2, 7]
    _, mixed, _ = await infer(http, guard, np.concatenate([x[order], x[:1] + 1.0]))
    np.testing.assert_array_equal(mixed["probabilities"][:3], p[order])


async def test_bins_answer_with_the_label_the_runner_up_and_the_bins_level(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, true_p = digits
    bins = {"mechanism": "bins", "cuts": [0.5], "confidences": [0.48, 0.975], "ranked": 1}
    policy = digits_policy(
        model={"stages": [{"validate": {"min": 0.0, "max": 16.0}}, {"privacy": bins}]}
    )
    guard = await start_guard(policy)
    status, answer, headers = await infer(http, guard, x)
    assert status == 200, answer
    p, order = answer["probabilities"], np.argsort(-true_p, axis=1)
    np.testing.assert_array_equal(answer["label"], order[:, 0])
    np.testing.assert_array_equal(np.argsort(-p, axis=1, kind="stable")[:, :2], order[:, :2])
    level = np.where(true_p.max(axis=1) < 0.5, 0.48, 0.975)
    np.testing.assert_allclose(p.max(axis=1), level, rtol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert "X-Guard-Privacy-Epsilon" not in headers  # no epsilon, no budget
    _, again, _ = await infer(http, guard, x)
    np.testing.assert_array_equal(again["probabilities"], p)


@pytest.mark.parametrize(
    ("bins", "message"),
    [
        ({"cuts": [0.5]}, "privacy.confidences is required"),
        ({"cuts": [0.5], "confidences": [0.9]}, "needs one level more than cuts (2); got 1"),
        ({"confidences": [0.9], "budget": {"epsilon": 10}}, "bins has no epsilon"),
        ({"confidences": [0.9], "ranked": -1}, "privacy.ranked must be >= 0"),
    ],
)
def test_invalid_bins_stop_the_load_naming_the_key(bins: dict[str, Any], message: str) -> None:
    stages = [{"privacy": {"mechanism": "bins", **bins}}]
    policy = parse_policy(
        digits_policy(model={"stages": stages}), source="p.yaml", base=Path("."), environ=ENVIRON
    )
    with pytest.raises(PolicyError) as caught:
        build_runtime(policy, session=None)
    assert message in str(caught.value)


async def test_the_budget_runs_out_into_label_only_answers(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, true_p = digits
    guard = await start_guard(
        privacy_policy(budget={"epsilon": 20.0, "per": "1d"}), environ=ENVIRON
    )
    status, _, headers = await infer(http, guard, x)  # 8 rows at ε=2: 16 of 20
    assert status == 200
    assert headers["X-Guard-Privacy-Epsilon"] == "16/20"
    assert headers["X-Guard-Verdict"] == "allow"
    status, answer, headers = await infer(http, guard, x[:4])  # 8 more would make 24
    assert status == 200
    assert headers["X-Guard-Verdict"] == "degrade"
    np.testing.assert_array_equal(
        answer["probabilities"], np.eye(10)[np.argmax(true_p[:4], axis=1)]
    )
    status, _, headers = await infer(http, guard, x[:2])  # 4 more fit exactly
    assert headers["X-Guard-Privacy-Epsilon"] == "20/20"
    async with http.get(guard.ops_url("/metrics")) as reply:
        metrics = await reply.text()
    assert 'guard_findings_total{action="degrade",model="digits",stage="privacy"} 1.0' in metrics


async def test_deny_answers_429_with_retry_after(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _ = digits
    policy = privacy_policy(budget={"epsilon": 4.0, "per": "1h"}, on_exhausted="deny")
    policy["disclose"] = {"reasons": True}  # refusals name the budget (off by default)
    guard = await start_guard(policy, environ=ENVIRON)
    assert (await infer(http, guard, x[:2]))[0] == 200
    status, message, headers = await infer(http, guard, x[:1])
    assert status == 429
    assert "privacy budget of epsilon 4 per 1h for model digits is spent" in message
    assert 1 <= int(headers["Retry-After"]) <= 3600


async def test_shadow_mode_records_exhaustion_and_answers_as_usual(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _ = digits
    policy = privacy_policy(budget={"epsilon": 2.0}, on_exhausted="deny")
    guard = await start_guard({**policy, "mode": "shadow"}, environ=ENVIRON)
    assert (await infer(http, guard, x[:1]))[0] == 200
    status, answer, headers = await infer(http, guard, x[:1])
    assert status == 200
    assert headers["X-Guard-Verdict"] == "shadow"
    assert answer["probabilities"].max() < 1.0  # still a noisy answer, not a refusal


async def test_a_label_derived_from_noise_is_charged_even_when_scores_are_not_asked_for(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _ = digits
    guard = await start_guard(
        privacy_policy(epsilon=0.5, keep_argmax=False, budget={"epsilon": 100.0}),
        environ=ENVIRON,
    )
    status, answer, headers = await infer(http, guard, x, outputs=["label"])
    assert status == 200, answer
    assert set(answer) == {"label"}
    assert headers["X-Guard-Privacy-Epsilon"] == "4/100"  # 8 rows at ε=0.5
    _, full, _ = await infer(http, guard, x)
    np.testing.assert_array_equal(answer["label"], np.argmax(full["probabilities"], axis=1))
    np.testing.assert_array_equal(full["label"], answer["label"])


async def test_label_only_requests_are_free_when_the_label_is_kept(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, true_p = digits
    guard = await start_guard(privacy_policy(budget={"epsilon": 1.0}), environ=ENVIRON)
    for _ in range(3):
        status, answer, headers = await infer(http, guard, x, outputs=["label"])
        assert status == 200
        assert "X-Guard-Privacy-Epsilon" not in headers
    np.testing.assert_array_equal(answer["label"], np.argmax(true_p, axis=1))


# -- the stage itself ---------------------------------------------------------------------


def context(x: np.ndarray, scores: np.ndarray, *, degraded: bool = False) -> RequestContext:
    ctx = RequestContext(
        request_id="r",
        model="digits",
        client=Client("alice"),
        request=InferRequest("digits", {"input": x}),
    )
    ctx.response = InferResponse(
        "digits", {"probabilities": scores.copy(), "label": np.argmax(scores, axis=1)}
    )
    ctx.degraded = degraded
    return ctx


def stage(
    *,
    environ: dict[str, str] = ENVIRON,
    state: MemoryStore | None = None,
    metrics: GuardMetrics | None = None,
    rng: np.random.Generator | None = None,
    **options: Any,
) -> Privacy:
    """A privacy stage built on its own: Laplace ε=1, degraded Laplace ε=0.25."""
    defaults: dict[str, Any] = {
        "mechanism": "laplace",
        "epsilon": 1.0,
        "degraded": MechanismOptions(mechanism="laplace", epsilon=0.25),
        "secret_env": SECRET_ENV,
    }
    env = StageEnv(
        model="digits",
        backend=None,
        local=None,
        metadata=None,
        state=state,
        metrics=metrics,
        environ=environ,
    )
    return Privacy(PrivacyOptions(**{**defaults, **options}), env, rng=rng)


async def test_a_degraded_client_gets_the_degraded_mechanism_charged_at_its_own_cost(
    digits: Any,
) -> None:
    x, true_p = digits
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    privacy = stage(budget=BudgetOptions(epsilon=10.0), metrics=metrics)
    normal, degraded = context(x, true_p), context(x, true_p, degraded=True)
    await privacy.on_response(normal)
    await privacy.on_response(degraded)
    a = normal.response.outputs["probabilities"]
    b = degraded.response.outputs["probabilities"]
    assert not np.allclose(a, b)  # a different scale draws different noise
    assert degraded.headers["X-Guard-Privacy-Epsilon"] == "10/10"  # 8 + 8 * 0.25
    spent = registry.get_sample_value(
        "guard_privacy_budget_spent_total", {"model": "digits", "mechanism": "laplace"}
    )
    assert spent == pytest.approx(10.0)
    answers = registry.get_sample_value(
        "guard_privacy_answers_total", {"model": "digits", "mechanism": "laplace"}
    )
    assert answers == 16


async def test_fresh_noise_when_not_consistent(digits: Any) -> None:
    x, true_p = digits
    privacy = stage(consistent=False, rng=np.random.default_rng(0))
    assert privacy.secret is None
    first, second = context(x, true_p), context(x, true_p)
    await privacy.on_response(first)
    await privacy.on_response(second)
    assert not np.array_equal(
        first.response.outputs["probabilities"], second.response.outputs["probabilities"]
    )


async def test_deny_outside_the_server_raises_rate_limited(digits: Any) -> None:
    x, true_p = digits
    privacy = stage(budget=BudgetOptions(epsilon=1.0), on_exhausted="deny")
    with pytest.raises(RateLimited, match="it does not reset") as caught:
        await privacy.on_response(context(x, true_p))
    assert caught.value.retry_after is None


async def test_scores_that_cannot_be_perturbed_are_never_released(digits: Any) -> None:
    x, true_p = digits
    privacy = stage(on_error="open")
    ctx = context(x, true_p * 3.0)  # not probabilities
    with pytest.raises(Overloaded, match="cannot be released"):
        await privacy.on_response(ctx)


async def test_an_added_scores_output_is_removed_from_the_request_and_the_answer(
    digits: Any,
) -> None:
    x, true_p = digits
    privacy = stage(
        keep_argmax=False,
        degraded=MechanismOptions(mechanism="laplace", epsilon=1.0, keep_argmax=False),
    )
    ctx = context(x, true_p)
    ctx.request.outputs.append(RequestedOutput("label"))
    await privacy.on_request(ctx)
    assert [o.name for o in ctx.request.outputs] == ["label", "probabilities"]
    await privacy.on_response(ctx)
    assert [o.name for o in ctx.request.outputs] == ["label"]
    assert set(ctx.response.outputs) == {"label"}


# -- policy validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mechanism": "laplace"}, "privacy.epsilon is required"),
        ({"mechanism": "laplace", "epsilon": 0}, "privacy.epsilon must be > 0.0; got 0"),
        ({"mechanism": "noise"}, "privacy.mechanism must be one of laplace, gaussian"),
        (
            {"mechanism": "laplace", "epsilon": 1, "sigma": 1},
            "privacy.sigma does not apply to mechanism laplace",
        ),
        ({"mechanism": "gaussian"}, "takes sigma or epsilon (one of them)"),
        (
            {"mechanism": "round", "k": 2},
            "privacy.k does not apply to mechanism round (it takes decimals, keep_argmax)",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "delta": 1e-5},
            "privacy.delta applies to mechanism gaussian only",
        ),
        (
            {"mechanism": "round", "budget": {"epsilon": 10}},
            "privacy.budget needs a noisy mechanism",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "budget": {"epsilon": 10, "per": "daily"}},
            "privacy.budget.per must be a duration such as 30s",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "budget": {"epsilon": 10, "per": 0.5}},
            "privacy.budget.per must be >= 1s; got 0.5s",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "budget": {"per": "1d"}},
            "privacy.budget.epsilon is required",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "on_exhausted": "wait"},
            "privacy.on_exhausted must be one of",
        ),
        (
            {
                "mechanism": "laplace",
                "epsilon": 1,
                "degraded": {"mechanism": "laplace", "epsilon": 2},
            },
            "privacy.degraded must be label_only or laplace with at least as much noise",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "degraded": {"mechanism": "round"}},
            "privacy.degraded must be label_only or laplace",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "output": "logits"},
            "privacy.output names no output of model digits",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "secret_env": "GUARD_TEST_UNSET_VARIABLE"},
            "names environment variable GUARD_TEST_UNSET_VARIABLE, which is not set",
        ),
        (
            {"mechanism": "laplace", "epsilon": 1, "epsilon_per_query": 1},
            "has unknown key(s) epsilon_per_query",
        ),
    ],
)
def test_invalid_options_stop_the_load_with_a_clear_message(options: dict, message: str) -> None:
    stages = [{"privacy": options}]
    policy = parse_policy(
        digits_policy(model={"stages": stages}), source="p.yaml", base=Path("."), environ=ENVIRON
    )
    with pytest.raises(PolicyError) as caught:
        build_runtime(policy, session=None)
    assert message in str(caught.value)
    assert str(caught.value).startswith("p.yaml: models.digits.stages[0].privacy")


def test_a_short_secret_is_refused() -> None:
    options = {"mechanism": "laplace", "epsilon": 1, "secret_env": "GUARD_TEST_SHORT"}
    policy = parse_policy(
        digits_policy(model={"stages": [{"privacy": options}]}),
        source="p.yaml",
        base=Path("."),
        environ={"GUARD_TEST_SHORT": "short"},
    )
    with pytest.raises(PolicyError, match="needs at least 16"):
        build_runtime(policy, session=None)


async def test_valid_options_are_described() -> None:
    options = {
        "mechanism": "gaussian",
        "epsilon": 1.0,
        "delta": 1e-6,
        "budget": {"epsilon": 50, "per": "12h"},
        "on_exhausted": "degrade",
        "degraded": {"mechanism": "gaussian", "sigma": 10.0},
        "secret_env": SECRET_ENV,
    }
    policy = parse_policy(
        digits_policy(model={"stages": [{"privacy": options}]}),
        source="p.yaml",
        base=Path("."),
        environ=ENVIRON,
    )
    runtime = build_runtime(policy, session=None)
    try:
        described = runtime.models["digits"].describe()["stages"][0]
    finally:
        await runtime.close()
    assert described["epsilon_per_answer"] == pytest.approx(1.0)
    assert described["budget"]["unit"] == "rho"
    assert described["budget"]["epsilon"] == pytest.approx(50.0)
    assert described["budget"]["window_s"] == 43200.0
    assert described["degraded"]["sigma"] == 10.0


# -- budgets in Redis ---------------------------------------------------------------------


async def test_budgets_in_redis_are_exact_under_concurrency(redis_server: RedisServer) -> None:  # noqa: F811
    from guard.state.redis import RedisStore

    store = RedisStore(redis_server.url, key_prefix="test:", timeout=5.0)
    try:
        budget = Budget(unit="epsilon", limit=3.0, window_s=60.0)
        first = Accountant(store, budget, model="digits")
        second = Accountant(store, budget, model="digits")  # another replica, same store
        results = await asyncio.gather(
            *(acc.charge("alice", 0.25) for _ in range(20) for acc in (first, second))
        )
        assert sum(r.granted for r in results) == 12
        assert max(r.used for r in results) == pytest.approx(3.0)
        assert not (await first.charge("alice", 0.25)).granted
        assert (await first.charge("bob", 3.0)).granted
    finally:
        await store.close()
