"""Clients that ask too much: oversized bodies, slow senders, idle and excess connections,
more requests in flight than the policy allows. Each gets a clear 4xx/503 or a closed
connection, within the configured limit, and the guard stays up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from guard.models import load_samples
from tests.reliability.conftest import (
    HOST,
    GuardProcess,
    GuardSpawner,
    assert_healthy,
    digits_model,
    metric_value,
    request,
    scrape,
    v2_body,
)

INFER = "/v2/models/digits/infer"


def policy(**limits: Any) -> dict[str, Any]:
    return {"version": 1, "models": {"digits": digits_model()}, "limits": limits}


def head(length: int | None = None, *, chunked: bool = False) -> bytes:
    lines = [f"POST {INFER} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def trickle(sock: socket.socket, piece: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send ``piece`` every ``every`` s until the guard answers or closes; (answer, seconds)."""
    started = time.monotonic()
    answer = b""
    sock.settimeout(every)
    while time.monotonic() - started < limit:
        with contextlib.suppress(OSError):
            sock.sendall(piece)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset: the guard closed on us
            break
        if not chunk:
            break
        answer += chunk
        if b"\r\n\r\n" in answer:
            break
    return answer, time.monotonic() - started


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes ``sock`` (reading only), or None if it stays open."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


@pytest.fixture
def guard(spawn_guard: GuardSpawner) -> GuardProcess:
    return spawn_guard(policy(max_body_bytes=65536, body_timeout=1.0, idle_timeout=1.5))


def test_oversized_bodies_are_413_declared_or_streamed(guard: GuardProcess) -> None:
    declared = request("POST", guard.url + INFER, b"[" * 70000)
    assert declared.status == 413 and "limit of 65536" in declared.json()["error"]

    # Chunked: no length to check up front; refused once the count passes the limit.
    with socket.create_connection((HOST, guard.port), timeout=10) as sock:
        sock.sendall(head(chunked=True))
        chunk = b"[" * 16384
        answer, seconds = trickle(sock, b"%x\r\n%s\r\n" % (len(chunk), chunk), 0.01, 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 2
    assert_healthy(guard)


@pytest.mark.parametrize("shape", ["trickle", "stall", "chunked-trickle"])
def test_a_body_that_does_not_arrive_in_time_is_408(guard: GuardProcess, shape: str) -> None:
    with socket.create_connection((HOST, guard.port), timeout=10) as sock:
        if shape == "chunked-trickle":
            sock.sendall(head(chunked=True))
            answer, seconds = trickle(sock, b"1\r\n \r\n", 0.2, 8)
        else:
            sock.sendall(head(1000) + b"{")
            answer, seconds = trickle(sock, b" " if shape == "trickle" else b"", 0.2, 8)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within 1 s" in answer
    assert 0.9 < seconds < 3.0
    assert_healthy(guard)


def test_slow_headers_and_idle_connections_are_closed(guard: GuardProcess) -> None:
    with socket.create_connection((HOST, guard.port), timeout=10) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\n")
        _, seconds = trickle(sock, b"X", 0.2, 8)  # one header byte at a time, never done
    assert seconds < 3.5, "a client trickling its headers kept the connection"
    with socket.create_connection((HOST, guard.port), timeout=10) as idle:
        assert (closed := closed_within(idle, 5)) is not None and 1.0 < closed < 3.5
    with socket.create_connection((HOST, guard.port), timeout=10) as kept:
        x = load_samples("digits")[0][:1]
        kept.sendall(head(len(body := v2_body(x))) + body)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert (closed := closed_within(kept, 5)) is not None and 1.0 < closed < 3.5
    assert_healthy(guard)


def test_descriptor_exhaustion_is_survived(spawn_guard: GuardSpawner) -> None:
    """More connections than the process may hold: refused or queued, never a crash."""
    guard = spawn_guard(policy(idle_timeout=30.0), nofile=128)
    held: list[socket.socket] = []
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection((HOST, guard.port), timeout=2))
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{guard.pid}/fd")) >= 120  # at the limit, really
        assert guard.alive()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while not guard.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_healthy(guard)


async def test_max_in_flight_sheds_with_503_and_recovers(
    spawn_guard: GuardSpawner, aiohttp_server: Any
) -> None:
    release = asyncio.Event()
    x = load_samples("digits")[0][:1]

    async def held(request_: web.Request) -> web.Response:
        await request_.read()
        await release.wait()
        outputs = [{"name": "label", "shape": [1], "datatype": "INT64", "data": [0]}]
        return web.json_response({"model_name": "digits", "outputs": outputs})

    app = web.Application()
    app.router.add_post("/v2/models/digits/infer", held)
    upstream = await aiohttp_server(app)
    model = {"upstream": {"url": str(upstream.make_url("")), "timeout": 30}, "stages": []}
    guard = await asyncio.to_thread(
        spawn_guard, {"version": 1, "models": {"digits": model}, "limits": {"max_in_flight": 4}}
    )
    url = guard.url + INFER
    body = v2_body(x)
    waiting = [asyncio.create_task(asyncio.to_thread(request, "POST", url, body)) for _ in range(4)]
    for _ in range(100):
        await asyncio.sleep(0.05)
        text = await asyncio.to_thread(scrape, guard)
        if metric_value(text, "guard_requests_in_flight") == 4:
            break
    assert metric_value(text, "guard_requests_in_flight") == 4
    started = time.monotonic()
    shed = await asyncio.to_thread(request, "POST", url, body)
    assert shed.status == 503 and "serving 4 requests" in shed.json()["error"]
    assert time.monotonic() - started < 1.0
    release.set()
    assert [r.status for r in await asyncio.gather(*waiting)] == [200] * 4
    after = await asyncio.to_thread(request, "POST", url, body)
    assert after.status == 200
    assert metric_value(await asyncio.to_thread(scrape, guard), "guard_requests_in_flight") == 0
    assert np.isfinite(metric_value(scrape(guard), "guard_requests_total", code="503"))


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"body_timeout": 0}, "limits.body_timeout must be > 0"),
        ({"idle_timeout": -1}, "limits.idle_timeout must be > 0"),
        ({"idle_timeout": float("inf")}, "limits.idle_timeout must be <= 86400"),
        ({"read_timeout": 5}, "unknown key(s) read_timeout"),
    ],
)
def test_limit_keys_are_checked_at_load(limits: dict[str, Any], message: str) -> None:
    from guard.config import parse_policy
    from guard.errors import PolicyError

    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_policy(policy(**limits), source="policy.yaml", base=Path("."))
