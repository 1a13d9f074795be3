"""Hostile bytes on the wire (hypothesis): lying lengths, broken chunking, false
encodings, stalls, half-sent bodies, resets, pipelined garbage.

Each example opens a raw socket to a real guard process, sends a request built
from pieces that may each lie, then either waits for the answer or vanishes
(close or reset) part-way. Whatever arrives, the guard answers within its limits
with a 2xx or 4xx (or closes the connection), never a 5xx, and after every
example it is healthy and has logged no traceback and counted no internal error.

``GUARD_FUZZ_EXAMPLES`` sets the number of examples (default 60).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.models import load_samples
from tests.reliability.conftest import (
    HOST,
    GuardProcess,
    GuardSpawner,
    assert_healthy,
    digits_model,
    env_int,
    metric_value,
    scrape,
    v2_body,
)

EXAMPLES = env_int("GUARD_FUZZ_EXAMPLES", 60)
STALL = 0.5  # the guard's body_stall_timeout here
ANSWER_WITHIN = 4.0  # seconds: body_timeout (2 s) and a margin
PATHS = ("/v2/models/digits/infer", "/v1/models/digits:predict", "/v2/models/raw/infer")


@dataclass(frozen=True)
class Wire:
    """One request as it goes on the wire, and how the client behaves while sending it."""

    path: str
    body: bytes
    length: str | None  # Content-Length as sent (may lie), None: absent
    chunked: bool
    chunk_size: int
    bad_chunk: bool  # a chunk header that is not hex
    encoding: str | None  # Content-Encoding as sent
    compress: bool  # whether the body really is in that encoding
    cut: float  # fraction of the bytes sent before the client stops (1.0: all)
    ending: str  # "wait" for the answer, "close", "reset"
    pause: float  # seconds between the head and the body
    pipelined: bytes  # bytes sent after the request, on the same connection


def _body() -> st.SearchStrategy[bytes]:
    x = load_samples("digits")[0]
    valid = st.integers(1, 4).map(lambda n: v2_body(x[:n]))
    junk = st.binary(max_size=2000)
    return st.one_of(valid, junk, valid.map(lambda b: b[: len(b) // 2]))


@st.composite
def wires(draw: st.DrawFn) -> Wire:
    body = draw(_body())
    encoding = draw(st.sampled_from([None, None, "gzip", "deflate", "br", "x-made-up"]))
    compress = encoding in ("gzip", "deflate") and draw(st.booleans())
    if compress:
        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    chunked = draw(st.booleans())
    size = len(body)
    length = None if chunked else draw(
        st.sampled_from([str(size), str(size), str(size + 7), str(max(0, size - 5)), "0",
                         "-1", "abc", str(10**12), f"{size}, {size}"])
    )  # fmt: skip
    return Wire(
        path=draw(st.sampled_from(PATHS)),
        body=body,
        length=length,
        chunked=chunked,
        chunk_size=draw(st.integers(1, 700)),
        bad_chunk=chunked and draw(st.integers(0, 5)) == 0,
        encoding=encoding,
        compress=compress,
        cut=draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.0])),
        ending=draw(st.sampled_from(["wait", "wait", "close", "reset"])),
        pause=draw(st.sampled_from([0.0, 0.0, 0.05, STALL + 0.2])),
        pipelined=draw(
            st.sampled_from([b"", b"GARBAGE\r\n\r\n", b"GET /v2/health/live HTTP/1.1\r\n\r\n"])
        ),
    )


def encode(wire: Wire) -> tuple[bytes, bytes]:
    """The head and the body bytes as the client sends them."""
    lines = [f"POST {wire.path} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    if wire.length is not None:
        lines.append(f"Content-Length: {wire.length}")
    if wire.chunked:
        lines.append("Transfer-Encoding: chunked")
    if wire.encoding is not None:
        lines.append(f"Content-Encoding: {wire.encoding}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    body = wire.body
    if wire.chunked:
        pieces = [body[i : i + wire.chunk_size] for i in range(0, len(body), wire.chunk_size)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        body = framed.replace(b"\r\n", b"\r\nzz", 1) if wire.bad_chunk else framed
    return head, body[: int(len(body) * wire.cut)]


def play(guard: GuardProcess, wire: Wire) -> int | None:
    """Send ``wire``; the status of the answer, or None when the client left first."""
    head, body = encode(wire)
    sock = socket.create_connection((HOST, guard.port), timeout=ANSWER_WITHIN)
    try:
        sock.sendall(head)
        if wire.pause:
            time.sleep(wire.pause)
        with contextlib.suppress(OSError):
            sock.sendall(body + wire.pipelined)
        if wire.ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        if wire.ending == "close":
            return None
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)  # raises TimeoutError past ANSWER_WITHIN: a hang
                if not chunk:
                    break
                answer += chunk
        assert time.monotonic() - started < ANSWER_WITHIN + 0.5
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None
    finally:
        sock.close()


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardProcess]:
    spawner = GuardSpawner(tmp_path_factory.mktemp("wire"))
    try:
        yield spawner({
            "version": 1,
            "models": {
                "digits": digits_model({"blacklight": {"action": "flag"}}),
                "raw": {"model": "builtin:digits", "stages": []},
            },
            "limits": {"max_body_bytes": 1 << 16, "body_timeout": 2, "body_stall_timeout": STALL},
        })  # fmt: skip
    finally:
        spawner.stop_all()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(wire=wires())
def test_whatever_arrives_on_the_wire_gets_no_5xx(guard: GuardProcess, wire: Wire) -> None:
    status = play(guard, wire)
    assert status is None or status < 500, (wire, status)
    assert "Traceback" not in guard.log(), (wire, guard.log()[-3000:])


def test_the_guard_is_healthy_after_the_wire_fuzzing(guard: GuardProcess) -> None:
    """Runs after the property (same module-scoped guard)."""
    time.sleep(STALL + 0.5)  # the last example's connection is answered or closed
    assert_healthy(guard)
    assert metric_value(scrape(guard), "guard_errors_total", type="internal") == 0
