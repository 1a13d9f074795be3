"""Guards on real loopback sockets, built from policies written by each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from guard.config import load_policy
from guard.server import create_app, create_ops_app
from tests.integration.mlserver_upstream import mlserver_breast_cancer  # noqa: F401  (fixture)
from tests.integration.redis_server import redis_module, redis_server  # noqa: F401  (fixtures)


class GuardServer(TestServer):
    """The guard's public listener, with its operators' listener (metrics, admin) beside it."""

    ops: TestServer

    def ops_url(self, path: str) -> Any:
        """A URL on the metrics and admin listener (``/metrics``, ``/admin/*``)."""
        return self.ops.make_url(path)


StartGuard = Callable[..., Awaitable[GuardServer]]


def digits_policy(**extra: Any) -> dict[str, Any]:
    model = {"model": "builtin:digits", "stages": [{"validate": {"min": 0.0, "max": 16.0}}]}
    model.update(extra.pop("model", {}))
    return {"version": 1, "models": {"digits": model}, **extra}


@pytest.fixture
async def start_guard(tmp_path: Path) -> AsyncIterator[StartGuard]:
    """Write a policy file, start a guard on it, return the server: ``.make_url(path)`` on
    the public listener, ``.ops_url(path)`` on the metrics and admin listener. ``environ``:
    where the policy's secrets are looked up (default: this process's environment)."""
    started: list[TestServer] = []

    async def start(
        policy: dict[str, Any],
        *,
        files: dict[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> GuardServer:
        for name, text in (files or {}).items():
            (tmp_path / name).write_text(text)
        path = tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        app = create_app(
            load_policy(path, environ=environ), registry=CollectorRegistry(), policy_path=path
        )
        server = GuardServer(app)
        await server.start_server()
        started.append(server)
        server.ops = TestServer(create_ops_app(app))
        await server.ops.start_server()
        started.append(server.ops)
        return server

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
