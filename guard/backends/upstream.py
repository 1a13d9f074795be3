"""A lean HTTP/1.1 client for upstreams: pooled keep-alive connections, one write a request.

The guard talks to a few upstreams, over and over, with requests it built itself.
A general client (``aiohttp.ClientSession``) spends more CPU on one such exchange
than the rest of the proxy path (request objects, header multidicts, timeout
context managers, stream readers); this one does only what that exchange needs:

- :class:`UpstreamClient` holds one bounded pool of persistent connections per
  origin (scheme, host, port): at most ``limit`` connections to each, requests
  past it wait for one to come free (within their total timeout). Idle
  connections are reused most recent first; those idle longer than
  ``keepalive`` seconds are closed when the pool is next used.
- A request is one buffer (request line, ``Host``, ``Content-Length``, the
  caller's headers, then the body; a body of 64 KiB or more is a second write,
  not a copy), written on an :class:`asyncio.Protocol` (asyncio or uvloop).
- The answer is parsed by hand: status line, headers, then a body framed by
  ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the
  connection; ``1xx`` interim answers are skipped, ``gzip``/``deflate`` bodies
  are decoded. Strict: a garbled status line, a header line without a colon, a
  folded header, conflicting lengths or a bad chunk size end the exchange with
  :class:`BrokenExchange`.
- Bounded: a head over 64 KiB, or a body (as sent or decoded) over
  ``max_response_bytes`` (default 256 MiB) raises :class:`ResponseTooLarge`, and
  the connection is closed rather than read to its end.
- The connection is kept for the next request unless the server says
  ``Connection: close`` (or speaks HTTP/1.0 without ``keep-alive``), the body
  ran to the end of the connection, or anything went wrong.

Failures, for :class:`~guard.backends.http.HttpBackend` to map to statuses:
:class:`ConnectError` (refused, unresolvable, TLS handshake failed),
``asyncio.TimeoutError`` (the connect took over ``connect_timeout``, or the
whole exchange, waiting for a pooled connection included, over ``timeout``),
:class:`BrokenExchange` (the connection dropped or the answer is garbled: a
server closing an idle keep-alive connection shows up here, and a caller may
retry on a fresh connection), :class:`ResponseTooLarge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

POOL_LIMIT = 256  # connections per origin, as aiohttp's TCPConnector(limit=256) had in all
KEEPALIVE_S = 15.0  # aiohttp's keepalive_timeout
MAX_RESPONSE_BYTES = 256 << 20
MAX_HEAD_BYTES = 64 << 10
MAX_LINE_BYTES = 8 << 10  # a chunk-size line or a trailer line
_SEPARATE_WRITE = 64 << 10  # bodies this large are written after the head, not copied into it
_NO_BODY = frozenset((204, 304))
_HEX = b"0123456789abcdefABCDEF"


class ClientError(Exception):
    """Base of this module's failures (timeouts are ``asyncio.TimeoutError``)."""


class ConnectError(ClientError):
    """No connection could be opened: ``strerror`` says why (refused, DNS, TLS)."""

    def __init__(self, message: str, strerror: str | None = None) -> None:
        super().__init__(message)
        self.strerror = strerror or message


class BrokenExchange(ClientError):
    """The connection dropped or the answer is not HTTP/1.x; safe to retry afresh."""


class ResponseTooLarge(ClientError):
    """The answer is larger than the client accepts."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case; repeated headers joined with ", "
    body: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream URL points: the pool's key, the ``Host`` header and a path prefix."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str  # the URL's path without a trailing slash ("" for the root)

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        return cls(parts.scheme, host, port, host_header, parts.path.rstrip("/"))

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def quote_path(segment: str) -> str:
    """A path segment as aiohttp/yarl would send it (reserved sub-delims kept)."""
    return quote(segment, safe="/:@!$&'()*+,;=~")


def header_block(headers: Mapping[str, str]) -> str:
    """``Name: value\\r\\n`` lines; raises ValueError on a name or value that would
    break the framing (line breaks, NUL, non-Latin-1)."""
    lines = []
    for name, value in headers.items():
        text = f"{name}: {value}\r\n"
        bad_name = not name or any(c in name for c in " \t:\r\n\0") or not name.isascii()
        bad_value = any(c in value for c in "\r\n\0") or max(map(ord, value), default=0) > 255
        if bad_name or bad_value:
            raise ValueError(f"header {name!r} cannot be sent as it is")
        lines.append(text)
    return "".join(lines)


class UpstreamClient:
    """Pools of keep-alive HTTP/1.1 connections, one per origin; close with :meth:`close`."""

    def __init__(
        self,
        *,
        limit: int = POOL_LIMIT,
        keepalive: float = KEEPALIVE_S,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.limit = limit
        self.keepalive = keepalive
        self.max_response_bytes = max_response_bytes
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self.closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def request(
        self,
        origin: Origin,
        method: str,
        path: str,
        body: bytes | None,
        headers: str,
        *,
        timeout: float,
        connect_timeout: float,
    ) -> Response:
        """One exchange: ``headers`` is a :func:`header_block`; ``path`` starts with ``/``.

        ``Host`` and ``Content-Length`` (when there is a body) are added here.
        """
        pool = self._pools.get(origin.key)
        if pool is None:
            if self.closed:
                raise ConnectError("the client is closed")
            pool = self._pools[origin.key] = _Pool(self, origin)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await pool.acquire(loop, deadline, connect_timeout)
        if body is None:
            head = f"{method} {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n{headers}\r\n"
        else:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                f"Content-Length: {len(body)}\r\n{headers}\r\n"
            )
        return await conn.exchange(loop, head.encode("latin-1"), body, deadline)

    async def close(self) -> None:
        """Close every connection, idle or busy; later requests raise ConnectError."""
        self.closed = True
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        await asyncio.sleep(0)  # let the transports run connection_lost


class _Pool:
    __slots__ = ("client", "origin", "idle", "busy", "count", "waiters")

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.idle: deque[_Connection] = deque()
        self.busy: set[_Connection] = set()  # in an exchange (closed with the pool)
        self.count = 0  # connections open or being opened
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float, connect_timeout: float
    ) -> _Connection:
        while True:
            idle = self.idle
            if idle:
                stale = loop.time() - self.client.keepalive
                while idle and idle[0].idle_since < stale:
                    idle.popleft().close()
                if idle:
                    return idle.pop()
            if self.client.closed:
                raise ConnectError("the client is closed")
            if self.count < self.client.limit:
                return await self._connect(loop, deadline, connect_timeout)
            got = await self._wait(loop, deadline)
            if got is not None and not got.closed:
                return got

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection | None:
        """A connection handed over by release(), or None when a slot came free."""
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                conn = waiter.result()  # handed over just as we were cancelled: give it back
                if conn is not None:
                    self.release(conn)
                else:
                    self._wake()
            raise
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, deadline: float, connect_timeout: float
    ) -> _Connection:
        origin = self.origin
        self.count += 1
        conn = _Connection(self)
        secure = origin.scheme == "https"
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=self.client._ssl() if secure else None,
                    server_hostname=origin.host if secure else None,
                ),
                timeout=max(0.0, min(connect_timeout, deadline - loop.time())),
            )
        except BaseException as exc:
            if conn.transport is not None:
                conn.close()  # connected just as the wait ended; connection_lost counts it
            else:
                self.count -= 1
                self._wake()
            if isinstance(exc, (OSError, ssl.SSLError)) and not isinstance(
                exc, asyncio.TimeoutError
            ):
                reason = exc.strerror or str(exc)
                if "Connect call failed" not in reason and not isinstance(
                    exc, (ssl.SSLError, socket.gaierror)
                ):  # as asyncio words it (uvloop does not): where, then why
                    reason = f"Connect call failed {(origin.host, origin.port)}: {reason}"
                raise ConnectError(str(exc), reason) from exc
            raise
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the pool after a complete exchange on a reusable connection."""
        if conn.closed:
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self.client.closed:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self.idle.append(conn)

    def lost(self, conn: _Connection) -> None:
        """A connection closed (by either side): its slot is free."""
        self.count -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()
        for conn in list(self.busy):
            conn.abort()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the client is closed"))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


# Parser states
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(8)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parser of the answer in progress."""

    __slots__ = (
        "pool",
        "loop",
        "transport",
        "closed",
        "idle_since",
        "waiter",
        "state",
        "pending",
        "status",
        "headers",
        "keep",
        "chunks",
        "size",
        "remaining",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[Response] | None = None
        self.state = _IDLE
        self.pending = b""  # an unfinished head or line
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep = True
        self.chunks: list[bytes] = []
        self.size = 0  # body bytes received so far
        self.remaining = 0  # of the body (Content-Length) or of the current chunk

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool.lost(self)  # called once, after connection_made
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.state == _UNTIL_CLOSE:
                try:
                    self._finish()
                except ClientError as error:
                    waiter.set_exception(error)
            else:
                reason = "the upstream closed the connection"
                if self.state not in (_IDLE, _HEAD) or self.pending:
                    reason += " in the middle of its answer"
                elif self.state == _HEAD:
                    reason += " without answering"
                waiter.set_exception(BrokenExchange(reason + (f": {exc}" if exc else "")))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost finishes or fails the exchange

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except ClientError as exc:
            self._fail(exc)

    # the exchange

    async def exchange(
        self, loop: asyncio.AbstractEventLoop, head: bytes, body: bytes | None, deadline: float
    ) -> Response:
        transport = self.transport
        if transport is None or self.closed:
            raise BrokenExchange("the pooled connection was closed")
        waiter: asyncio.Future[Response] = loop.create_future()
        self.waiter = waiter
        self.state = _HEAD
        self.pending = b""
        busy = self.pool.busy
        busy.add(self)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            if body is None:
                transport.write(head)
            elif len(body) < _SEPARATE_WRITE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            response = await waiter
        except BaseException:
            self.abort()  # mid-exchange: it cannot carry another request, nor flush its body
            raise
        finally:
            timer.cancel()
            busy.discard(self)
            self.waiter = None
        if self.keep and not self.closed:
            self.state = _IDLE
            self.pool.release(self)
        else:
            self.close()
        return response

    def close(self) -> None:
        """Close after what is written has been sent (an idle connection, or after an answer)."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """Close now, dropping anything not yet sent (a failed or abandoned exchange)."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _fail(self, exc: ClientError) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.keep = False
        self.abort()

    def _finish(self) -> None:
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        encoding = self.headers.get("content-encoding")
        if encoding and encoding != "identity":
            body = self._decode(body, encoding)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self.status, self.headers, body))
        self.state = _IDLE

    def _decode(self, body: bytes, encoding: str) -> bytes:
        if encoding in ("gzip", "x-gzip"):
            wbits = 16 + zlib.MAX_WBITS
        elif encoding == "deflate":
            wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
        else:
            raise BrokenExchange(f"the upstream sent an unknown Content-Encoding {encoding!r}")
        cap = self.pool.client.max_response_bytes
        try:
            inflate = zlib.decompressobj(wbits)
            out = inflate.decompress(body, cap + 1)
        except zlib.error as exc:
            raise BrokenExchange(f"the upstream sent a corrupt {encoding} body: {exc}") from None
        if len(out) > cap:
            raise ResponseTooLarge(f"the upstream's decoded answer is over {cap} bytes")
        return out

    # the parser

    def _feed(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        pos = 0
        end = len(data)
        while pos < end:
            state = self.state
            if state in (_LENGTH, _CHUNK_DATA):
                take = min(self.remaining, end - pos)
                self.chunks.append(data[pos : pos + take] if pos or take < end else data)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self.state = _CHUNK_END
            elif state == _HEAD:
                split = data.find(b"\r\n\r\n", pos)
                if split < 0:
                    if end - pos > MAX_HEAD_BYTES:
                        raise ResponseTooLarge("the upstream's answer has a head over 64 KiB")
                    self.pending = data[pos:]
                    return
                if split - pos > MAX_HEAD_BYTES:
                    raise ResponseTooLarge("the upstream's answer has a head over 64 KiB")
                self._head(data[pos:split])
                pos = split + 4
            elif state in (_CHUNK_SIZE, _TRAILER):
                split = data.find(b"\r\n", pos)
                if split < 0:
                    if end - pos > MAX_LINE_BYTES:
                        raise BrokenExchange("the upstream sent an overlong chunk line")
                    self.pending = data[pos:]
                    return
                line = data[pos:split]
                pos = split + 2
                if state == _TRAILER:
                    if not line:
                        self._finish()
                else:
                    self._chunk_size(line)
            elif state == _CHUNK_END:
                if end - pos < 2:
                    self.pending = data[pos:]
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise BrokenExchange("the upstream sent a chunk without its CRLF")
                pos += 2
                self.state = _CHUNK_SIZE
            elif state == _UNTIL_CLOSE:
                self.size += end - pos
                self._check_size()
                self.chunks.append(data[pos:] if pos else data)
                return
            else:  # _IDLE: nothing was asked
                raise BrokenExchange("the upstream sent bytes nobody asked for")

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(code) != 3
            or not code.isdigit()
            or rest[3:4] not in (b"", b" ")
        ):
            raise BrokenExchange(f"the upstream sent a bad status line {status_line[:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise BrokenExchange(f"the upstream sent a bad header line {line[:80]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key == "content-length" and headers[key] != text:
                    raise BrokenExchange("the upstream sent conflicting Content-Length headers")
                if key != "content-length":
                    headers[key] = f"{headers[key]}, {text}"
            else:
                headers[key] = text
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): skip it
            if status == 101:
                raise BrokenExchange("the upstream switched protocols")
            return
        self.status = status
        self.headers = headers
        self.chunks = []
        self.size = 0
        connection = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.keep = "close" not in connection
        else:
            self.keep = "keep-alive" in connection
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in _NO_BODY:
            self._finish()
        elif encoding is not None:
            if length is not None:  # RFC 9112 6.3: smuggling-shaped; do not reuse
                self.keep = False
            if encoding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self.state = _CHUNK_SIZE
            else:
                self.keep = False
                self.state = _UNTIL_CLOSE
        elif length is not None:
            if not length.isdigit() or not length.isascii():
                raise BrokenExchange(f"the upstream sent a bad Content-Length {length[:40]!r}")
            self.remaining = int(length)
            self.size = self.remaining
            self._check_size()
            if self.remaining == 0:
                self._finish()
            else:
                self.state = _LENGTH
        else:
            self.keep = False
            self.state = _UNTIL_CLOSE

    def _chunk_size(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip(b" \t")
        # int(x, 16) also takes "0x", "_", signs and spaces: only hex digits here
        if not digits or len(digits) > 16 or digits.strip(_HEX):
            raise BrokenExchange(f"the upstream sent a bad chunk size {line[:40]!r}")
        size = int(digits, 16)
        if size == 0:
            self.state = _TRAILER
            return
        self.size += size
        self._check_size()
        self.remaining = size
        self.state = _CHUNK_DATA

    def _check_size(self) -> None:
        cap = self.pool.client.max_response_bytes
        if self.size > cap:
            raise ResponseTooLarge(f"the upstream's answer is over {cap} bytes")
