"""A client cannot write the guard's log: no forged lines, no terminal escapes.

Each test runs ``guard serve`` in a child process and talks to it over raw sockets,
so the request line reaches the guard exactly as an attacker writes it. The triggers
are requests that make the guard log something about them (a body that fails to
decode, a request id a header cannot carry, an upstream that echoes its input): the
path's version segment carries ``%0a`` (a new line with a fake record) and ``%1b``
(an ANSI escape). Whatever the guard logs about them, every line of the log is one
of its own records, and no control byte reaches the file.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.reliability.conftest import HOST, GuardProcess, GuardSpawner, digits_model

FORGED = "2026-01-01 00:00:00,000 CRITICAL guard: admin token rotated by root"
VERSION = "1%0a" + FORGED.replace(" ", "%20") + "%1b[31mRED%1b[0m"
RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)
ROW = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
)
ROW_WITH_ID = orjson.dumps(
    {
        "id": "a\nFORGED-BY-ID \x1b[31m",
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}],
    }
)


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One request on a fresh connection, as bytes; the answer's first 2 KiB."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)[:2048]


def post(port: int, path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: guard", f"Content-Length: {len(body)}"]
    head += [*headers, "Connection: close", "", ""]
    return raw_request(port, "\r\n".join(head).encode("latin-1"), body)


def echoing_upstream_policy(upstream: str) -> dict[str, Any]:
    return {
        "version": 1,
        "models": {
            "digits": digits_model(),
            "forwarded": {"upstream": {"url": upstream, "retries": 0, "timeout": 5}, "stages": []},
        },
    }


def attack(guard: GuardProcess) -> None:
    """Every request that gets the guard (or aiohttp under it) to log about it."""
    for model in ("digits", "forwarded"):
        path = f"/v2/models/{model}/versions/{VERSION}/infer"
        # A body that is not the gzip it claims to be.
        post(guard.port, path, b"not gzip at all", "Content-Encoding: gzip")
        # A request id that cannot become a header (upstream mode forwards it).
        post(guard.port, path, ROW_WITH_ID, "Content-Type: application/json")
        # An ordinary request (the upstream's 500 quotes it, with a forged line).
        post(guard.port, path, ROW, "Content-Type: application/json", "X-Request-Id: r1")
    # aiohttp's access log line carries header values: UTF-8 C1 CSI and a bidi override.
    raw_request(
        guard.port,
        "GET /v2/health/live HTTP/1.1\r\nHost: guard\r\n"
        "User-Agent: x\u009b31m\u202eevil\r\nConnection: close\r\n\r\n".encode(),
    )


@pytest.fixture
async def echo_upstream(aiohttp_server: Any) -> str:
    """An upstream whose 500 quotes the request (its id) and then some: the guard logs
    an upstream's message, and must log it as data."""

    async def handler(request: web.Request) -> web.Response:
        try:
            given = orjson.loads(await request.read()).get("id")
        except orjson.JSONDecodeError:
            given = None
        message = f"cannot serve request {given}\n{FORGED}\x1b[31m"
        return web.json_response({"error": message}, status=500)

    server = await aiohttp_server(_app(handler))
    return str(server.make_url("")).rstrip("/")


def _app(handler: Any) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def test_text_log_has_no_forged_line_and_no_escape_bytes(
    spawn_guard: GuardSpawner, echo_upstream: str
) -> None:
    guard = spawn_guard(echoing_upstream_policy(echo_upstream), access_log=True)
    await asyncio.to_thread(attack, guard)  # the upstream answers on this loop meanwhile
    guard.stop()
    log = guard.log()
    lines = log.splitlines()
    assert not any(line.startswith(FORGED) for line in lines), log[-3000:]
    assert not any(line.startswith("FORGED-BY-ID") for line in lines), log[-3000:]
    for byte in ("\x1b", "\x9b", "\u202e", "\r"):
        assert byte not in log, (byte, log[-3000:])
    # Every line is one of the guard's records or indented under one (a traceback).
    strays = [line for line in lines if line and not (RECORD.match(line) or line[0] == " ")]
    assert not strays, strays[:5]
    # The access log ran, and the escapes are visible for what they are.
    assert "GET /v2/health/live" in log and "\\x9b31m\\u202eevil" in log


async def test_json_log_is_one_object_per_line(
    spawn_guard: GuardSpawner, echo_upstream: str
) -> None:
    guard = spawn_guard(
        echoing_upstream_policy(echo_upstream),
        access_log=True,
        extra_args=["--log-format", "json"],
    )
    await asyncio.to_thread(attack, guard)  # the upstream answers on this loop meanwhile
    guard.stop()
    log = guard.log()
    assert "\x1b" not in log and "\u202e" not in log
    records = [orjson.loads(line) for line in log.splitlines() if line]  # raises if forged
    assert records and all(
        {"ts", "level", "logger", "message"} <= set(r) and r["ts"].endswith("Z") for r in records
    )
    assert not any(r["message"].startswith(FORGED) for r in records)
    # The upstream failure is logged with its detail and structured fields.
    upstream = [r for r in records if r.get("upstream") == echo_upstream]
    assert upstream and all(r["model"] == "forwarded" for r in upstream)
    assert any("answered 500" in r["message"] for r in upstream)


def test_log_format_is_validated(spawn_guard: GuardSpawner) -> None:
    guard = spawn_guard(
        {"version": 1, "models": {"digits": digits_model()}},
        extra_args=["--log-format", "xml"],
        wait=False,
    )
    assert guard.process.wait(30) == 2
    assert "invalid choice: 'xml'" in guard.log()
