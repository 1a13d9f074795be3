"""The upstream HTTP/1.1 client against real loopback servers, on asyncio and on uvloop.

aiohttp servers for what real servers do (chunked answers, ``Connection: close``,
idle keep-alive connections closed, TLS); a raw asyncio server for what they do
wrong (a garbled status line, a dropped connection, no answer at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from guard.backends.http import HttpBackend, UpstreamConfig
from guard.backends.upstream import (
    BrokenExchange,
    ConnectError,
    Origin,
    ResponseTooLarge,
    UpstreamClient,
    header_block,
)
from guard.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from guard.inference import InferRequest
from tests.integration.conftest import StartGuard

Run = Callable[[Coroutine[Any, Any, Any]], Any]
HANG = object()  # the raw server's script: accept the request, never answer


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine to its end on a fresh event loop of the parametrized kind."""
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    else:
        factory = asyncio.new_event_loop

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 60))
        finally:
            loop.close()

    return run


@asynccontextmanager
async def serve(app: web.Application, **runner: Any) -> AsyncIterator[str]:
    """An aiohttp server on a free loopback port; yields its base URL."""
    ssl_context = runner.pop("ssl_context", None)
    app_runner = web.AppRunner(app, **runner)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = app_runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await app_runner.cleanup()


class RawServer:
    """A loopback server that reads HTTP/1.1 requests and answers from a script:
    ``answer(n, head, body)`` (``n``: the request's number on its connection) returns
    the bytes to send, None to close without answering, or HANG. An HTTP/1.0 answer
    is followed by the close."""

    def __init__(self, answer: Callable[[int, bytes, bytes], Any]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.url = ""
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                n += 1
                self.requests += 1
                reply = self.answer(n, head, body)
                if reply is HANG:
                    await asyncio.sleep(3600)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if reply.startswith(b"HTTP/1.0"):  # its body ends with the connection
                    return
        except asyncio.CancelledError:
            return  # the test is over
        finally:
            self._tasks.discard(task)
            writer.close()


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def backend(url: str, client: UpstreamClient | None, **config: Any) -> HttpBackend:
    return HttpBackend(UpstreamConfig(url=url, **config), name="m", session=client)


async def get(client: UpstreamClient, url: str, path: str = "/", **kw: Any) -> Any:
    timeouts = {"timeout": kw.pop("timeout", 5.0), "connect_timeout": kw.pop("connect", 2.0)}
    body = kw.pop("body", None)
    method = "GET" if body is None else "POST"
    headers = header_block(kw.pop("headers", {}))
    return await client.request(Origin.parse(url), method, path, body, headers, **timeouts)


def echo_app(peers: list[Any]) -> web.Application:
    """Echoes the body; records each request's client port (which connection carried it)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        body = await request.read()
        if request.query.get("chunked"):
            reply = web.StreamResponse(headers={"X-Seen-Host": request.host})
            reply.enable_chunked_encoding()
            await reply.prepare(request)
            for start in range(0, len(body), 300_001):  # odd sizes: chunks split anywhere
                await reply.write(body[start : start + 300_001])
            await reply.write_eof()
            return reply
        reply = web.Response(body=body, headers={"X-Seen-Host": request.host})
        if request.query.get("close"):
            reply.force_close()
        return reply

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def test_keep_alive_reuses_one_connection_and_bodies_of_any_size_round_trip(run: Run) -> None:
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, size=5 << 20, dtype=np.uint8).tobytes()  # 5 MiB of binary

    async def scenario() -> None:
        peers: list[int] = []
        client = UpstreamClient()
        async with serve(echo_app(peers)) as url:
            for size in (0, 1, 1000, 70_000):
                reply = await get(client, url, "/x", body=big[:size])
                assert reply.status == 200 and reply.body == big[:size]
            assert len(set(peers)) == 1  # one keep-alive connection carried them all
            reply = await get(client, url, "/x?chunked=1", body=big)
            assert reply.body == big and reply.headers["transfer-encoding"] == "chunked"
            assert reply.headers["x-seen-host"] == url.removeprefix("http://")
            reply = await get(client, url, "/x", body=big)
            assert reply.body == big
            assert len(set(peers)) == 1
        await client.close()

    run(scenario())


def test_connection_close_and_idle_close_by_the_server_open_a_fresh_connection(
    run: Run,
) -> None:
    async def scenario() -> None:
        peers: list[int] = []
        client = UpstreamClient()
        async with serve(echo_app(peers), keepalive_timeout=0.2) as url:
            assert (await get(client, url, "/a?close=1", body=b"1")).body == b"1"
            assert (await get(client, url, "/a", body=b"2")).body == b"2"
            assert len(set(peers)) == 2  # the server said close: not reused
            await asyncio.sleep(0.6)  # the server closes the idle connection
            assert (await get(client, url, "/a", body=b"3")).body == b"3"
            assert len(set(peers)) == 3
        await client.close()

    run(scenario())


def test_a_request_on_a_connection_the_server_dropped_is_retried_on_a_fresh_one(
    run: Run,
) -> None:
    # The race an idle close cannot always avoid: the server drops the connection
    # just as the next request arrives on it.
    def answer(n: int, head: bytes, body: bytes) -> bytes | None:
        return ok() if n == 1 else None

    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(answer) as server:
            assert (await get(client, server.url)).status == 200
            with pytest.raises(BrokenExchange, match="without answering"):
                await get(client, server.url)
            assert (await get(client, server.url)).status == 200  # a fresh connection
            assert server.connections == 2
            assert await backend(server.url, client).ready()  # retried: the third connection
            assert server.connections == 3 and server.requests == 5
            with pytest.raises(UpstreamError, match="failed") as caught:
                await backend(server.url, client, retries=0).metadata()
            assert caught.value.status == 502
        await client.close()

    run(scenario())


def test_an_upstream_that_never_answers_times_out_and_is_not_retried(run: Run) -> None:
    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(lambda n, head, body: HANG) as server:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await get(client, server.url, timeout=0.3)
            assert 0.25 < loop.time() - started < 2
            with pytest.raises(UpstreamTimeout, match="did not answer in time") as caught:
                await backend(server.url, client, timeout=0.3, retries=3).metadata()
            assert caught.value.status == 504
            assert server.requests == 2  # never retried
        await client.close()

    run(scenario())


def test_a_refused_port_is_503_and_a_connect_that_hangs_times_out(run: Run) -> None:
    async def scenario() -> None:
        client = UpstreamClient()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
            with pytest.raises(ConnectError) as refused:
                await get(client, f"http://127.0.0.1:{port}")
            assert "Connect call failed" in refused.value.strerror
            with pytest.raises(UpstreamUnavailable, match="unreachable") as caught:
                await backend(f"http://127.0.0.1:{port}", client).metadata()
            assert caught.value.status == 503
            assert not await backend(f"http://127.0.0.1:{port}", client).ready()
        with socket.socket() as listener, contextlib.ExitStack() as stack:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)  # never accepts: once its backlog is full, SYNs go unanswered
            port = listener.getsockname()[1]
            for _ in range(3):
                filler = stack.enter_context(socket.socket())
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await get(client, f"http://127.0.0.1:{port}", timeout=5, connect=0.3)
            assert loop.time() - started < 2
            hung = backend(f"http://127.0.0.1:{port}", client, timeout=5, connect_timeout=0.3)
            with pytest.raises(UpstreamTimeout):  # as aiohttp's sock_connect timeout was
                await hung.metadata()
        await client.close()

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/2 200\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=[
        "status",
        "http2",
        "not-http",
        "folded",
        "no-colon",
        "length",
        "lengths",
        "chunk",
        "crlf",
        "chunk-sign",
        "chunk-0x",
        "chunk-underscore",
    ],
)
def test_a_garbled_answer_is_502_after_the_retries(run: Run, reply: bytes) -> None:
    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(lambda n, head, body: reply) as server:
            with pytest.raises(BrokenExchange):
                await get(client, server.url)
            with pytest.raises(UpstreamError, match="failed") as caught:
                await backend(server.url, client, retries=1).metadata()
            assert caught.value.status == 502
            assert server.requests == 3  # one, then one and its retry
        await client.close()

    run(scenario())


def test_an_answer_over_the_cap_is_refused_unread_and_not_retried(run: Run) -> None:
    big = b"x" * (3 << 20)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("chunked"):
            reply = web.StreamResponse()
            reply.enable_chunked_encoding()
            await reply.prepare(request)
            for _ in range(3):
                await reply.write(big[: 1 << 20])
            await reply.write_eof()
            return reply
        return web.Response(body=big)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        client = UpstreamClient(max_response_bytes=2 << 20)
        async with serve(app) as url:
            for path in ("/", "/?chunked=1"):
                with pytest.raises(ResponseTooLarge):
                    await get(client, url, path)
            with pytest.raises(UpstreamError, match="failed") as caught:
                await backend(url, client, retries=3).metadata()
            assert caught.value.status == 502
            small = UpstreamClient(max_response_bytes=4 << 20)
            assert (await get(small, url, "/?chunked=1")).body == big
            await small.close()
        await client.close()

    run(scenario())


def test_interim_answers_gzip_and_bodies_read_to_the_close(run: Run) -> None:
    doc = orjson.dumps({"outputs": list(range(1000))})
    packed = gzip.compress(doc)
    replies = {
        b"/interim": b"HTTP/1.1 100 Continue\r\n\r\n" + ok(doc),
        b"/gzip": ok(packed, b"Content-Encoding: gzip\r\n"),
        b"/to-close": b"HTTP/1.0 200 OK\r\n\r\n" + doc,
        b"/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    }

    def answer(n: int, head: bytes, body: bytes) -> bytes:
        return replies[head.split(b" ")[1]]

    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(answer) as server:
            for path in ("/interim", "/gzip", "/to-close", "/interim"):
                reply = await get(client, server.url, path)
                assert reply.status == 200 and reply.body == doc, path
            reply = await get(client, server.url, "/empty")
            assert reply.status == 204 and reply.body == b""
            # interim + gzip kept their connection; the body read to the close did not
            assert server.connections == 2
        await client.close()

    run(scenario())


def test_the_pool_is_bounded_and_waiting_counts_against_the_timeout(run: Run) -> None:
    async def scenario() -> None:
        open_now = 0
        most = 0

        async def slow(request: web.Request) -> web.Response:
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)
            await asyncio.sleep(0.1)
            open_now -= 1
            return web.Response(body=b"ok")

        app = web.Application()
        app.router.add_get("/{tail:.*}", slow)
        client = UpstreamClient(limit=2)
        async with serve(app) as url:
            replies = await asyncio.gather(*(get(client, url) for _ in range(8)))
            assert [r.body for r in replies] == [b"ok"] * 8
            assert most == 2
            results = await asyncio.gather(
                *(get(client, url, timeout=0.15) for _ in range(6)), return_exceptions=True
            )
            timeouts = [r for r in results if isinstance(r, asyncio.TimeoutError)]
            assert 0 < len(timeouts) < 6  # the first two got through; the last waited too long
            assert (await get(client, url)).body == b"ok"  # no slot was lost
        await client.close()

    run(scenario())


def test_close_ends_every_connection_and_later_requests_fail(run: Run) -> None:
    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(lambda n, head, body: ok()) as server:
            await asyncio.gather(*(get(client, server.url) for _ in range(3)))
            await client.close()
            await asyncio.sleep(0.05)
            assert not server._tasks  # the server saw every connection end
            with pytest.raises(ConnectError, match="closed"):
                await get(client, server.url)

    run(scenario())


def test_infer_sends_one_request_with_the_configured_headers(run: Run) -> None:
    seen: list[bytes] = []
    outputs = [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.5]}]

    def answer(n: int, head: bytes, body: bytes) -> bytes:
        seen.append(head + body)
        return ok(orjson.dumps({"model_name": "up", "outputs": outputs}))

    async def scenario() -> None:
        client = UpstreamClient()
        async with RawServer(answer) as server:
            http = backend(
                server.url + "/prefix", client, model="up", headers={"Authorization": "Bearer t"}
            )
            x = np.zeros((1, 3), np.float32)
            request = InferRequest(model_name="m", inputs={"x": x}, id="req-1")
            response = await http.infer(request)
            assert response.model_name == "m" and response.id == "req-1"
            assert response.outputs["y"].tolist() == [0.5]
        await client.close()
        head, _, body = seen[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /prefix/v2/models/up/infer HTTP/1.1"
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        assert headers[b"Host"] == server.url.removeprefix("http://").encode()
        assert headers[b"Authorization"] == b"Bearer t"
        assert headers[b"X-Request-Id"] == b"req-1"
        assert headers[b"Content-Type"] == b"application/json"
        assert int(headers[b"Content-Length"]) == len(body)
        assert orjson.loads(body)["inputs"][0]["data"] == [0.0, 0.0, 0.0]

    run(scenario())


def test_header_values_that_would_break_the_framing_are_refused() -> None:
    for bad in ({"X": "a\r\nInjected: 1"}, {"X Y": "a"}, {"X": "\u2603"}, {"": "a"}):
        with pytest.raises(ValueError, match="cannot be sent"):
            header_block(bad)
    assert header_block({"X-A": "b c"}) == "X-A: b c\r\n"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        command += ["-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no openssl to make a test certificate: {exc}")
    return cert, key


def test_https_upstreams_verify_the_certificate(run: Run, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def scenario() -> None:
        peers: list[int] = []
        client = UpstreamClient(ssl_context=trusting)
        async with serve(echo_app(peers), ssl_context=server_context) as url:
            assert url.startswith("https://")
            for body in (b"one", b"two" * 100_000):
                assert (await get(client, url, "/x?chunked=1", body=body)).body == body
            assert len(set(peers)) == 1
            default = UpstreamClient()  # the system's trust store does not know this one
            with pytest.raises(UpstreamUnavailable, match="unreachable"):
                await backend(url, default).metadata()
            await default.close()
        await client.close()

    run(scenario())


def test_answers_arriving_in_pieces_split_anywhere_are_parsed_whole(run: Run) -> None:
    rng = np.random.default_rng(11)
    doc = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    sizes = [1, 2, 15, 16, 17, 700, 4269]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (n, doc[:n]) for n in sizes)
    expected = b"".join(doc[:n] for n in sizes)
    replies = [
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(doc, b"X-A: 1\r\nX-A: 2\r\n"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"0\r\nX-Trailer: t\r\n\r\n",
    ]

    async def scenario() -> None:
        client = UpstreamClient()

        async def pieces(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:  # answers each request in pieces cut at random places
            for reply in replies * 4:
                await reader.readuntil(b"\r\n\r\n")
                cuts = np.sort(rng.choice(np.arange(1, len(reply)), size=12, replace=False))
                for start, end in zip([0, *cuts], [*cuts, len(reply)], strict=True):
                    writer.write(reply[start:end])
                    await writer.drain()
                    await asyncio.sleep(0.002)
            writer.close()

        server = await asyncio.start_server(pieces, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        for _ in range(4):
            first = await get(client, url)
            assert first.body == doc and first.headers["x-a"] == "1, 2"
            assert (await get(client, url)).body == expected
        await client.close()
        server.close()

    run(scenario())


async def test_the_guard_reuses_and_at_shutdown_closes_its_upstream_connections(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    outputs = [{"name": "label", "shape": [1], "datatype": "INT64", "data": [3]}]
    answer = ok(orjson.dumps({"model_name": "digits", "outputs": outputs}))
    async with RawServer(lambda n, head, body: answer) as upstream:
        model = {"upstream": {"url": upstream.url}, "stages": []}
        guard = await start_guard({"version": 1, "models": {"digits": model}})
        body = orjson.dumps(
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
        )
        for _ in range(5):
            async with http.post(guard.make_url("/v2/models/digits/infer"), data=body) as reply:
                assert reply.status == 200, await reply.text()
        assert upstream.connections == 1 and upstream.requests == 5
        assert upstream._tasks  # the keep-alive connection is open
        await guard.ops.close()
        await guard.close()  # the application's cleanup closes the client
        for _ in range(50):
            if not upstream._tasks:
                break
            await asyncio.sleep(0.01)
        assert not upstream._tasks
