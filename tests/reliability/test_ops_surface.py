"""What a client can see: only the inference protocol, health, and answers that teach nothing.

Each test runs ``guard serve`` in a child process and calls it over loopback:

- ``/metrics`` and ``/admin/*`` answer on the operators' listener only (404 on the
  public port), which ``--metrics-port`` or ``listen:`` places and ``off`` removes;
- an upstream that is down, slow or failing is named by model, never by URL,
  address or socket error (those are in the log);
- a refusal names no stage and no threshold unless ``disclose.reasons`` is true,
  and ``disclose.headers: false`` removes every ``X-Guard-*`` header.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aiohttp import web

from guard.clients import key_digest
from guard.config import parse_policy
from guard.errors import PolicyError
from guard.models import load_samples
from tests.reliability.conftest import (
    HOST,
    GuardSpawner,
    digits_model,
    free_port,
    metric_value,
    request,
    scrape,
    v2_body,
)
from tests.reliability.deployfiles import DEPLOY, K8S

ADMIN = "admin-token-for-the-ops-tests"
BLACKLIGHT_ENV = {"GUARD_TEST_BLACKLIGHT_KEY": "the deployment's secret"}
BLACKLIGHT = {"blacklight": {"key_env": "GUARD_TEST_BLACKLIGHT_KEY", "action": "deny"}}
BUDGET = {"budget": {"limits": [{"queries": 2, "per": "1m"}]}}


def policy(*stages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "models": {"digits": digits_model(*stages)},
        "admin": {"token_sha256": key_digest(ADMIN)},
        **extra,
    }


def probes(n: int) -> np.ndarray:
    """A boundary walk: one digit nudged a little each time (what blacklight refuses)."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(0)
    return np.clip(x[0] + rng.normal(0, 0.02, (n, 64)), 0, 16).astype(np.float32)


def infer(url: str, x: np.ndarray, model: str = "digits") -> Any:
    return request("POST", f"{url}/v2/models/{model}/infer", v2_body(np.atleast_2d(x)))


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except OSError:
        return True
    return False


# -- metrics and admin ------------------------------------------------------------


def test_metrics_and_admin_answer_on_the_ops_port_only(spawn_guard: GuardSpawner) -> None:
    guard = spawn_guard(policy())
    x, _ = load_samples("digits")
    assert infer(guard.url, x[:1]).status == 200
    admin = {"Authorization": f"Bearer {ADMIN}"}

    for method, path in [("GET", "/metrics"), ("GET", "/admin/status"), ("POST", "/admin/reload")]:
        reply = request(method, f"{guard.url}{path}", None, admin)
        assert reply.status == 404, (path, reply.body)
        assert b"guard_" not in reply.body and b"reloaded" not in reply.body

    text = scrape(guard)  # the ops listener
    assert metric_value(text, "guard_requests_total", model="digits", code="200") == 1
    status = request("GET", f"{guard.ops_url}/admin/status", None, admin)
    assert status.status == 200 and "digits" in status.json()["models"]
    assert request("GET", f"{guard.ops_url}/admin/status").status == 401
    reload = request("POST", f"{guard.ops_url}/admin/reload", None, admin)
    assert reload.status == 200 and reload.json()["reloaded"] == str(guard.policy_path)
    # The public port keeps the protocol and health, and serves the reloaded policy.
    assert request("GET", f"{guard.url}/v2/health/ready").status == 200
    assert request("GET", f"{guard.url}/v2/models/digits").status == 200
    assert infer(guard.url, x[1:2]).status == 200
    assert request("GET", f"{guard.ops_url}/v2/health/ready").status == 404


def test_the_policy_places_the_ops_listener_and_the_command_line_wins(
    spawn_guard: GuardSpawner,
) -> None:
    port = free_port()
    guard = spawn_guard(
        policy(listen={"metrics_host": HOST, "metrics_port": port}), metrics_port=None
    )
    assert "guard_build_info" in request("GET", f"http://{HOST}:{port}/metrics").body.decode()
    assert f"metrics and admin on http://{HOST}:{port}" in guard.log()

    other = free_port()
    off = spawn_guard(
        policy(listen={"metrics_port": other}),
        metrics_port=None,
        extra_args=["--metrics-port", "off"],
    )
    assert refused(other)
    assert request("GET", f"{off.url}/metrics").status == 404
    assert "metrics and admin listener off" in off.log()


def test_listen_is_validated_naming_file_path_and_value(tmp_path: Path) -> None:
    base = policy()
    for listen, message in [
        ({"metrics_port": 70000}, "p.yaml: listen.metrics_port must be <= 65535; got 70000"),
        ({"metrics_port": "nine"}, "listen.metrics_port must be a port number (0: any free port) "
         "or off; got 'nine'"),
        ({"metrics_host": ""}, "listen.metrics_host must be an address to bind; got ''"),
        ({"port": 1}, "listen has unknown key(s) port"),
    ]:  # fmt: skip
        with pytest.raises(PolicyError) as caught:
            parse_policy({**base, "listen": listen}, source="p.yaml", base=tmp_path)
        assert message in str(caught.value)


# -- upstream failures ----------------------------------------------------------------


def upstream_policy(url: str, **options: Any) -> dict[str, Any]:
    upstream = {"url": url, "retries": 0, "connect_timeout": 1, **options}
    return policy(models={"digits": digits_model(), "remote": {"upstream": upstream}})


async def test_an_upstream_failure_names_the_model_not_the_address(
    spawn_guard: GuardSpawner, aiohttp_server: Any
) -> None:
    async def crash(request: web.Request) -> web.Response:
        await request.read()
        text = "worker at 10.1.2.3:7070 died: Traceback (most recent call last) ..."
        return web.json_response({"error": text}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", crash)
    failing = await aiohttp_server(app)
    down = free_port()  # nothing listens there
    x = load_samples("digits")[0][:1]
    cases = [
        (f"http://{HOST}:{down}", 503, "upstream for model remote is unreachable"),
        (str(failing.make_url("")).rstrip("/"), 502, "upstream for model remote answered 500"),
    ]
    logs: list[str] = []
    for url, status, message in cases:
        guard = await asyncio.to_thread(spawn_guard, upstream_policy(url))
        for path, body in [
            ("/v2/models/remote/infer", v2_body(x)),
            ("/v1/models/remote:predict", b'{"instances": [[1.0]]}'),
        ]:
            reply = await asyncio.to_thread(request, "POST", f"{guard.url}{path}", body)
            text = reply.body.decode()
            assert reply.status == status, text
            assert reply.json()["error"] == message
            for leak in (HOST, str(down), str(failing.port), "10.1.2.3", "Connect call", "Trace"):
                assert leak not in text, (leak, text)
        meta = await asyncio.to_thread(request, "GET", f"{guard.url}/v2/models/remote")
        assert meta.status == status and HOST not in meta.body.decode()
        for _ in range(20):  # an outage under load, or a client polling /ready
            await asyncio.to_thread(request, "GET", f"{guard.url}/v2/models/remote/ready")
        guard.stop()
        logs.append(guard.log())
        assert url in logs[-1]  # the operator sees where, and why
    assert "Connect call failed" in logs[0] and "10.1.2.3:7070 died" in logs[1]
    # One line per kind of failure per 10 s, not one per request.
    assert logs[0].count("is unreachable") == 1 and logs[1].count("answered 500") == 1


# -- refusals and headers -----------------------------------------------------------------


def walk_until_refused(url: str) -> Any:
    for row in probes(8):
        reply = infer(url, row)
        if reply.status != 200:
            return reply
    raise AssertionError("blacklight never refused the walk")


@pytest.mark.parametrize("reasons", [False, True], ids=["withheld", "disclosed"])
def test_a_deny_names_no_stage_unless_the_policy_says_so(
    spawn_guard: GuardSpawner, reasons: bool
) -> None:
    guard = spawn_guard(policy(BLACKLIGHT, disclose={"reasons": reasons}), env=BLACKLIGHT_ENV)
    reply = walk_until_refused(guard.url)
    assert reply.status == 403
    if reasons:
        assert "blacklight" in reply.json()["error"]
    else:
        assert reply.json() == {"error": "request refused by policy"}
    # Operators see everything.
    text = scrape(guard)
    assert metric_value(text, "guard_findings_total", stage="blacklight", action="deny") >= 1


@pytest.mark.parametrize("reasons", [False, True], ids=["withheld", "disclosed"])
def test_a_quota_refusal_keeps_retry_after_but_not_the_numbers(
    spawn_guard: GuardSpawner, reasons: bool
) -> None:
    guard = spawn_guard(policy(BUDGET, disclose={"reasons": reasons}))
    x, _ = load_samples("digits")
    assert [infer(guard.url, x[i]).status for i in range(2)] == [200, 200]
    reply = infer(guard.url, x[2])
    assert reply.status == 429 and 1 <= int(reply.headers["retry-after"]) <= 60
    message = reply.json()["error"]
    if reasons:
        assert "3 of 2 queries per 1m" in message
    else:
        assert message.startswith("quota exhausted for this model; retry in ")
        assert "2" not in message.split("retry in")[0] and "queries" not in message
    assert metric_value(scrape(guard), "guard_findings_total", stage="budget") >= 1


@pytest.mark.parametrize(
    "switch",
    [{"disclose": {"headers": False}}, {"headers": {"expose": False}}],
    ids=["disclose.headers", "headers.expose"],
)
def test_headers_off_removes_every_guard_header(
    spawn_guard: GuardSpawner, switch: dict[str, Any]
) -> None:
    stages = (
        {"privacy": {"mechanism": "laplace", "epsilon": 2.0, "budget": {"epsilon": 100}}},
        BLACKLIGHT,
    )
    guard = spawn_guard(policy(*stages, **switch), env=BLACKLIGHT_ENV)
    x, _ = load_samples("digits")
    ok = infer(guard.url, x[:1])
    refusal = walk_until_refused(guard.url)
    assert (ok.status, refusal.status) == (200, 403)
    for reply in (ok, refusal):
        assert not [h for h in reply.headers if h.lower().startswith("x-guard-")], reply.headers


def test_production_policies_disclose_nothing() -> None:
    for path in (
        DEPLOY / "policies" / "compose.yaml",
        K8S / "proxy" / "policy.yaml",
        K8S / "sidecar" / "policy.yaml",
    ):
        document = yaml.safe_load(path.read_text())
        parsed = parse_policy(
            {**document, "admin": None, "state": None, "clients": None,
             "models": {"digits": {"model": "builtin:digits"}}},
            source=str(path), base=path.parent,
        )  # fmt: skip
        assert (parsed.disclose.headers, parsed.disclose.reasons) == (False, False), path
