"""A hostile client's first hour: each way one client could hurt others or the guard,
reproduced on the wire against a real ``guard serve`` process.

- Stalled bodies from one client hold that client's request slots, never everyone's.
- Bodies that do not decode (a lying ``Content-Encoding``), clients that vanish
  mid-body, and request ids that cannot be headers get a 4xx or a quiet close,
  never a 500 with a traceback.
- A flood of 8 MiB bodies from one client leaves another client's latency within
  3x of its latency without the flood.
- Refusals say ``deny`` (4xx) or ``error`` (5xx); a version a model does not have is 404.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import statistics
import struct
import threading
import time
import zlib
from typing import Any

import numpy as np
import orjson
import pytest

from guard.clients import key_digest
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
KEYS = "".join(
    f"  {name}:\n    key_sha256: {key_digest(name + '-key')}\n" for name in ("mallory", "alice")
)


def keyed_policy(**limits: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "models": {"digits": digits_model()},
        "clients": {"keys_file": "keys.yaml"},
        "limits": limits,
    }


def spawn_keyed(spawn_guard: GuardSpawner, **limits: Any) -> GuardProcess:
    return spawn_guard(keyed_policy(**limits), files={"keys.yaml": "clients:\n" + KEYS})


def as_(name: str) -> dict[str, str]:
    return {"X-API-Key": f"{name}-key"}


def head(length: int, *, key: str | None = None, extra: str = "") -> bytes:
    lines = [f"POST {INFER} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {length}"]
    if key:
        lines.append(f"X-API-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def exchange(guard: GuardProcess, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; the status and body of the answer."""
    with socket.create_connection((HOST, guard.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < _expected(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer else 0
    return status, answer.partition(b"\r\n\r\n")[2]


def _expected(answer: bytes) -> int:
    head_, _, _ = answer.partition(b"\r\n\r\n")
    for line in head_.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head_) + 4 + int(line.split(b":")[1])
    return 0


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a client that crashed or was killed would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_one_client_stalling_bodies_does_not_refuse_the_others(
    spawn_guard: GuardSpawner,
) -> None:
    """Mallory opens more connections than max_in_flight, each announcing a body it never
    sends. Alice is still served at once; Mallory's excess gets 429 without a wait."""
    guard = spawn_keyed(spawn_guard, max_in_flight=16, max_in_flight_per_client=8)
    x = load_samples("digits")[0][:1]
    stalled: list[socket.socket] = []
    try:
        for _ in range(24):
            sock = socket.create_connection((HOST, guard.port), timeout=5)
            sock.sendall(head(1000, key="mallory-key"))
            stalled.append(sock)
        time.sleep(0.3)  # every header read: the guard holds what it will hold
        started = time.monotonic()
        reply = request("POST", guard.url + INFER, v2_body(x), as_("alice"), timeout=5)
        assert reply.status == 200, reply.body
        assert time.monotonic() - started < 2.0
        refused = 0
        for sock in stalled[8:]:  # past her 8 slots: answered at once
            sock.settimeout(2)
            answer = sock.recv(4096)
            refused += answer.startswith(b"HTTP/1.1 429")
            assert b"requests in progress" in answer
        assert refused == 16
    finally:
        for sock in stalled:
            sock.close()
    assert_healthy(guard, headers=as_("alice"))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_body_that_is_not_its_declared_encoding_is_400(
    spawn_guard: GuardSpawner, encoding: str
) -> None:
    guard = spawn_guard({"version": 1, "models": {"digits": digits_model()}})
    body = b"certainly not compressed"
    status, answer = exchange(
        guard, head(len(body), extra=f"Content-Encoding: {encoding}\r\n") + body
    )
    assert status == 400
    # aiohttp's parser may refuse a broken deflate stream before the guard sees the
    # request; it still answers 400 naming the encoding, and logs no traceback.
    assert encoding in answer.decode()
    assert_healthy(guard)
    assert metric_value(scrape(guard), "guard_errors_total", type="internal") == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_with_its_compressed_length_is_read_whole(
    spawn_guard: GuardSpawner, encoding: str
) -> None:
    guard = spawn_guard({"version": 1, "models": {"digits": digits_model()}})
    plain = v2_body(load_samples("digits")[0][:3])
    body = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    status, answer = exchange(
        guard, head(len(body), extra=f"Content-Encoding: {encoding}\r\n") + body
    )
    assert status == 200, answer
    assert orjson.loads(answer)["outputs"][0]["shape"][0] == 3


def test_clients_vanishing_mid_body_leave_no_traceback(spawn_guard: GuardSpawner) -> None:
    guard = spawn_guard({"version": 1, "models": {"digits": digits_model()}})
    for _ in range(100):
        sock = socket.create_connection((HOST, guard.port), timeout=5)
        sock.sendall(head(5000) + b'{"inputs": [')
        reset(sock)
    time.sleep(0.3)
    assert_healthy(guard)
    text = scrape(guard)
    assert metric_value(text, "guard_errors_total", type="internal") == 0
    assert len(guard.log()) < 20_000  # no line per vanished client at the default level


@pytest.mark.parametrize(
    "request_id", ["a\nb", "x\r\nX-Evil: 1", "nul\x00byte", "é" * 3, "x" * 300]
)
def test_request_ids_that_cannot_be_headers_still_reach_the_upstream(
    spawn_guard: GuardSpawner, request_id: str
) -> None:
    upstream = spawn_guard({"version": 1, "models": {"digits": {"model": "builtin:digits"}}})
    guard = spawn_guard(
        {
            "version": 1,
            "models": {"digits": {"upstream": upstream.url, "model": "builtin:digits"}},
        }
    )
    x = load_samples("digits")[0][:1]
    body = orjson.loads(v2_body(x))
    body["id"] = request_id
    reply = request("POST", guard.url + INFER, orjson.dumps(body))
    assert reply.status == 200, reply.body
    assert reply.json()["id"] == request_id  # the body carries it back as sent
    assert_healthy(guard)


def test_a_flood_of_large_bodies_leaves_others_latency_within_3x(
    spawn_guard: GuardSpawner,
) -> None:
    """Mallory sends 8 MiB JSON bodies (with a NaN: the slow path) back to back; Alice's
    small requests keep their median latency within 3x of what it is without the flood."""
    guard = spawn_keyed(spawn_guard)
    x = load_samples("digits")[0][:1]
    small = v2_body(x)
    rows = np.random.default_rng(0).uniform(0, 16, (7_400, 64)).astype(np.float32)
    big = v2_body(rows).replace(b'"data":[', b'"data":[NaN,', 1)
    assert len(big) > 8 << 20

    def latencies(n: int) -> list[float]:
        seconds = []
        for _ in range(n):
            started = time.perf_counter()
            assert request("POST", guard.url + INFER, small, as_("alice")).status == 200
            seconds.append(time.perf_counter() - started)
            time.sleep(0.01)
        return seconds

    latencies(20)  # warm up
    quiet = statistics.median(latencies(60))
    stop = threading.Event()
    sent: list[int] = []

    def flood() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                sent.append(request("POST", guard.url + INFER, big, as_("mallory"), 30).status)

    flooders = [threading.Thread(target=flood) for _ in range(2)]
    for thread in flooders:
        thread.start()
    try:
        time.sleep(0.5)
        loud = statistics.median(latencies(60))
    finally:
        stop.set()
        for thread in flooders:
            thread.join(60)
    assert sent and set(sent) <= {400, 429}, sent  # refused (NaN, batch size) or throttled
    assert loud <= 3 * quiet, f"median {quiet * 1e3:.2f} ms quiet, {loud * 1e3:.2f} ms flooded"
    assert_healthy(guard, headers=as_("alice"))


def test_refusals_say_deny_and_unknown_versions_are_404(spawn_guard: GuardSpawner) -> None:
    guard = spawn_guard({"version": 1, "models": {"digits": digits_model()}})
    x = load_samples("digits")[0][:1]
    bad = request("POST", guard.url + INFER, v2_body(x + 100))
    assert bad.status == 400 and bad.headers["x-guard-verdict"] == "deny"
    ok = request("POST", guard.url + "/v2/models/digits/versions/1/infer", v2_body(x))
    assert ok.status == 200
    for path in (
        "/v2/models/digits/versions/7/infer",
        "/v2/models/digits/versions/latest/infer",
        "/v1/models/digits/versions/7:predict",
    ):
        body = v2_body(x) if path.startswith("/v2") else orjson.dumps({"instances": x.tolist()})
        missing = request("POST", guard.url + path, body)
        assert missing.status == 404 and "no version" in missing.json()["error"], path
    for path in ("/v2/models/digits/versions/7", "/v2/models/digits/versions/7/ready"):
        assert request("GET", guard.url + path).status == 404


def test_a_compression_bomb_is_413_with_memory_flat(spawn_guard: GuardSpawner) -> None:
    """260 KB of gzip that inflates to 256 MiB: refused once the inflated bytes pass the
    limit (32 MiB), without ever holding the rest."""
    guard = spawn_guard({"version": 1, "models": {"digits": digits_model()}})
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(256)) + packer.flush()
    before = guard.rss_bytes()
    started = time.monotonic()
    status, answer = exchange(guard, head(len(bomb), extra="Content-Encoding: gzip\r\n") + bomb)
    assert status == 413 and "exceeds the limit" in orjson.loads(answer)["error"]
    assert time.monotonic() - started < 10.0
    assert guard.rss_bytes() - before < 128 << 20  # the limit and buffers, not 256 MiB
    assert_healthy(guard)


def test_a_client_past_its_decode_rate_is_throttled_alone(spawn_guard: GuardSpawner) -> None:
    guard = spawn_keyed(spawn_guard, parse_bytes_per_second=200_000, max_body_bytes=200_000)
    x = load_samples("digits")[0]
    batch = v2_body(x[:100])  # about 40 KB a request
    statuses = [request("POST", guard.url + INFER, batch, as_("mallory")).status for _ in range(12)]
    assert statuses[:4] == [200] * 4 and 429 in statuses
    throttled = request("POST", guard.url + INFER, batch, as_("mallory"))
    assert throttled.status == 429 and float(throttled.headers["retry-after"]) >= 1
    assert request("POST", guard.url + INFER, batch, as_("alice")).status == 200
