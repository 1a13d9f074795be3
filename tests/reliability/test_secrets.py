"""Secrets stay secret: API keys (right and wrong ones), the admin token, the upstream's
credentials, the blacklight key and a Redis password never appear in the guard's log
(debug level, access log on), its audit records, its metrics, ``guard check``'s output
or any answer, while every one of them is in use and the error paths run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from guard.clients import key_digest, new_key
from guard.config import parse_policy
from guard.errors import PolicyError
from guard.models import load_samples
from tests.reliability.conftest import REPO, GuardSpawner, digits_model, free_port, v2_body

API_KEY = new_key()
ADMIN_TOKEN = "adm-" + new_key()
UPSTREAM_TOKEN = "Bearer up-" + new_key()
BLACKLIGHT_SECRET = "bl-" + new_key()
REDIS_PASSWORD = "rp-" + new_key()[3:]
ENV = {
    "GUARD_ADMIN_TOKEN": ADMIN_TOKEN,
    "UPSTREAM_TOKEN": UPSTREAM_TOKEN,
    "GUARD_BLACKLIGHT_KEY": BLACKLIGHT_SECRET,
    # Nothing listens there: every state operation fails, and its failure path is logged.
    "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
}


def near_miss(secret: str) -> str:
    """A wrong key a client might send: the real one with its last character changed."""
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


SECRETS = [API_KEY, ADMIN_TOKEN, UPSTREAM_TOKEN.split()[1], BLACKLIGHT_SECRET, REDIS_PASSWORD,
           near_miss(API_KEY), near_miss(ADMIN_TOKEN)]  # fmt: skip


def policy(upstream: str) -> dict[str, Any]:
    upstream_model = {
        "upstream": {
            "url": upstream,
            "timeout": 2,
            "headers": {"Authorization": "${UPSTREAM_TOKEN}"},
        },
        "stages": [{"validate": {"shape": [64], "dtype": "FP32", "min": 0.0, "max": 16.0}}],
    }
    detected = digits_model(
        {"budget": {"limits": [{"queries": 100, "per": "1m"}], "on_error": "open"}},
        {"blacklight": {"key_env": "GUARD_BLACKLIGHT_KEY", "on_error": "open"}},
    )
    return {
        "version": 1,
        "models": {"forwarded": upstream_model, "digits": detected},
        "clients": {"keys_file": "keys.yaml"},
        "admin": {"token_env": "GUARD_ADMIN_TOKEN"},
        "audit": {"path": "-"},
        "state": {"backend": "redis", "url_env": "REDIS_URL", "timeout": 0.2},
    }


async def test_secrets_never_leave_the_guard(
    spawn_guard: GuardSpawner, aiohttp_server: Any, tmp_path: Any
) -> None:
    seen_auth: list[str | None] = []

    async def infer(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        await request.read()
        if request.headers.get("X-Request-Id") == "reject-me":
            return web.json_response({"error": "credentials refused"}, status=401)
        if request.headers.get("X-Request-Id") == "crash-me":
            return web.Response(status=500, text="Traceback (most recent call last): ...")
        outputs = [{"name": "label", "shape": [1], "datatype": "INT64", "data": [3]}]
        return web.json_response({"model_name": "digits", "outputs": outputs})

    app = web.Application()
    app.router.add_post("/v2/models/forwarded/infer", infer)
    upstream = await aiohttp_server(app)
    keys = {"clients": {"alice": {"key_sha256": key_digest(API_KEY)}}}
    guard = await asyncio.to_thread(
        spawn_guard,
        policy(str(upstream.make_url(""))),
        env=ENV,
        log_level="debug",
        access_log=True,
        files={"keys.yaml": yaml.safe_dump(keys)},
    )

    x = load_samples("digits")[0]
    seen: list[str] = []
    ok, wrong = {"X-API-Key": API_KEY}, {"X-API-Key": near_miss(API_KEY)}
    calls = [
        ("POST", "/v2/models/forwarded/infer", ok, v2_body(x[:1])),
        ("POST", "/v2/models/forwarded/infer", {**ok, "X-Request-Id": "reject-me"}, v2_body(x[:1])),
        ("POST", "/v2/models/forwarded/infer", {**ok, "X-Request-Id": "crash-me"}, v2_body(x[:1])),
        ("POST", "/v2/models/forwarded/infer", ok, v2_body(x[:1] + 99)),  # 400 from validate
        ("POST", "/v2/models/digits/infer", ok, v2_body(x[1:2])),  # state store down: flagged
        ("POST", "/v2/models/digits/infer", wrong, v2_body(x[1:2])),
        ("POST", "/v2/models/digits/infer", {}, v2_body(x[1:2])),
        ("GET", "/v2/models/digits", wrong, None),
        ("GET", "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"}, None),
        ("GET", "/admin/status", {"Authorization": f"Bearer {near_miss(ADMIN_TOKEN)}"}, None),
        ("POST", "/admin/reload", {"X-Admin-Token": ADMIN_TOKEN}, None),
        ("GET", "/metrics", {}, None),
    ]
    statuses = []
    async with aiohttp.ClientSession() as session:
        for method, path, headers, body in calls:
            base = guard.ops_url if path.startswith(("/admin/", "/metrics")) else guard.url
            async with session.request(method, base + path, headers=headers, data=body) as reply:
                statuses.append(reply.status)
                seen.append(await reply.text())
                seen.append(str(dict(reply.headers)))
    assert statuses == [200, 401, 502, 400, 200, 401, 401, 401, 200, 401, 200, 200], statuses
    assert seen_auth and all(auth == UPSTREAM_TOKEN for auth in seen_auth)  # the secret was used

    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "guard.cli", "--log-level", "debug", "check", str(guard.policy_path)],
        capture_output=True, text=True, timeout=120, cwd=guard.policy_path.parent,
        env={**_environ(), **ENV},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    seen += [check.stdout, check.stderr]
    guard.stop()
    log = guard.log()
    assert '"stage"' in log and "state store unavailable" in log  # audit and failure paths ran
    assert "GET /admin/status" in log  # the access log ran
    for text in [*seen, log]:
        for secret in SECRETS:
            assert secret not in text, (
                f"a secret leaked: ...{text[max(0, text.find(secret) - 80) :][:200]}"
            )


def _environ() -> dict[str, str]:
    import os

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_credentials_in_an_upstream_url_are_refused_without_echoing_them() -> None:
    url = f"http://user:{REDIS_PASSWORD}@127.0.0.1:8080"
    document = {"version": 1, "models": {"digits": {"upstream": url}}}
    with pytest.raises(PolicyError, match="must not carry credentials") as caught:
        parse_policy(document, source="policy.yaml", base=Path("."))
    assert REDIS_PASSWORD not in str(caught.value)
