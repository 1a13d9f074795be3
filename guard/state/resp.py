"""A lean Redis client for one server: one connection, every command pipelined on it.

``redis.asyncio`` spends about 70 µs of CPU on a command (a pooled connection taken
and given back under a lock, a stream reader, a parser object per reply): a guard
request with several stages spends more on the client than on its own work.
:class:`RespClient` keeps one connection per server and writes each command the
moment it is issued; Redis answers in order, so replies resolve the waiting
futures first in, first out. Commands of concurrent requests share the socket's
writes and reads (what a pipeline does, without waiting to fill one), and a
command costs its encoding and one small parse.

It speaks what :class:`~guard.state.redis.RedisStore` uses on a single server
(``redis://``, with credentials and a database): scripts by ``EVALSHA`` (loaded
again on ``NOSCRIPT``), ``SET``, ``GET``, ``EXISTS``, ``LRANGE``. TLS, Sentinel
and Cluster stay with ``redis.asyncio``. Failures raise the exceptions
``redis.asyncio`` raises, so the store maps them the same way: an unreachable or
lost server :class:`~redis.exceptions.ConnectionError`, a reply later than
``timeout`` :class:`~redis.exceptions.TimeoutError` (the connection is dropped: the
replies after it would be out of step), an error reply
:class:`~redis.exceptions.ResponseError` (``NoScriptError`` for ``NOSCRIPT``),
and more than ``max_pending`` commands awaiting replies
:class:`~redis.exceptions.MaxConnectionsError` at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

__all__ = ["RespClient", "Script", "lean_url"]

Arg = bytes | str | int | float


def lean_url(url: str) -> bool:
    """Whether :class:`RespClient` serves ``url`` (plain ``redis://`` host and port)."""
    return urlsplit(url).scheme == "redis"


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from ``buf`` at ``pos``: ``(value, next position)``."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 0x24:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x3A:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x2A:  # * array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # + simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x2D:  # - error
        return _error(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise RedisConnectionError(f"unreadable reply from redis (type byte {kind!r})")


def _error(text: str) -> Exception:
    """An error reply as the exception ``redis.asyncio`` raises for it."""
    code, _, rest = text.partition(" ")
    if code in ("MOVED", "ASK"):  # a Cluster node: the store's message says what to set
        return (MovedError if code == "MOVED" else AskError)(rest)
    if code == "LOADING":
        return BusyLoadingError(text)
    if code == "READONLY":
        return ReadOnlyError(rest)
    return (NoScriptError if code == "NOSCRIPT" else ResponseError)(text)


def _encode(args: Sequence[Arg]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (int, float)):
            arg = repr(arg).encode()
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes, future: asyncio.Future[Any], deadline: float) -> None:
        self.transport.write(payload)  # type: ignore[union-attr]
        self.waiting.append((future, deadline))
        if self.timer is None:
            self.timer = self.client.loop.call_at(deadline, self._expire)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = _parse(buf, pos)
                if not self.waiting:
                    raise RedisConnectionError("redis sent a reply nobody asked for")
                future, _ = self.waiting.popleft()
                if not future.done():
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except _Incomplete:
            pass
        except RedisConnectionError as exc:
            self.fail(exc)
            return
        del buf[:pos]
        self._rearm()

    def _rearm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.waiting:
            self.timer = self.client.loop.call_at(self.waiting[0][1], self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.waiting and self.waiting[0][1] <= self.client.loop.time():
            self.fail(RedisTimeoutError("timed out reading from redis"))
        else:
            self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        """Fail every waiting command and drop the connection (the next command opens one)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        if self.client._connection is self:
            self.client._connection = None


class Script:
    """A Lua script run by ``EVALSHA`` (``EVAL`` once the server says it lacks it)."""

    def __init__(self, client: RespClient, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)


class RespClient:
    """One server's connection, shared by every command of this process's loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.2,
        max_pending: int = 256,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout = timeout
        self.max_pending = max_pending
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RespClient:
        """A client of ``redis://[[user]:password@]host[:port][/db]``; ``username`` and
        ``password`` in ``options`` win over the URL's."""
        parts = urlsplit(url)
        db = parts.path.strip("/")
        options.setdefault("username", unquote(parts.username) if parts.username else None)
        options.setdefault("password", unquote(parts.password) if parts.password else None)
        if options["username"] is None:
            options.pop("username")
        if options["password"] is None:
            options.pop("password")
        return cls(parts.hostname or "localhost", parts.port or 6379, db=int(db or 0), **options)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop  # type: ignore[return-value]  # set by the first connection

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (an error reply raises)."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        if len(connection.waiting) >= self.max_pending:
            raise MaxConnectionsError(f"{self.max_pending} redis commands already waiting")
        future = self.loop.create_future()
        connection.send(_encode(args), future, self.loop.time() + self.timeout)
        return await future

    async def _connect(self) -> _Connection:
        if self._connecting is not None:  # another command is opening it: wait for that one
            return await asyncio.shield(self._connecting)
        self._loop = asyncio.get_running_loop()
        self._connecting = self._loop.create_future()
        try:
            connection = await self._open()
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            self._connecting.set_result(connection)
            return connection
        finally:
            self._connecting = None

    async def _open(self) -> _Connection:
        loop = self.loop
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to redis at {self.host}:{self.port}: {exc}"
            ) from exc
        handshake: list[list[Arg]] = []
        if self.password is not None:
            auth: list[Arg] = ["AUTH", self.password]
            if self.username is not None:
                auth.insert(1, self.username)
            handshake.append(auth)
        if self.db:
            handshake.append(["SELECT", self.db])
        self._connection = connection
        for command in handshake:
            future = loop.create_future()
            connection.send(_encode(command), future, loop.time() + self.timeout)
            try:
                await future
            except ResponseError as exc:
                name = str(command[0])
                refused = AuthenticationError if name == "AUTH" else RedisConnectionError
                connection.fail(refused(f"redis refused {name}: {exc}"))
                raise refused(f"redis refused {name}: {exc}") from None
        return connection

    # -- the commands RedisStore uses ---------------------------------------------------
    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> str:
        sha: bytes = await self.execute("SCRIPT", "LOAD", source)
        return sha.decode()

    async def set(self, key: str, value: Arg, *, px: int | None = None) -> Any:
        if px is None:
            return await self.execute("SET", key, value)
        return await self.execute("SET", key, value, "PX", px)

    async def get(self, key: str) -> bytes | None:
        reply: bytes | None = await self.execute("GET", key)
        return reply

    async def exists(self, *keys: str) -> int:
        reply: int = await self.execute("EXISTS", *keys)
        return reply

    async def lrange(self, key: str, start: int, stop: int) -> list[bytes]:
        reply: list[bytes] = await self.execute("LRANGE", key, start, stop)
        return reply

    def pipeline(self, transaction: bool = False) -> _Batch:
        """Commands queued, then sent together (:meth:`_Batch.execute`): each one's reply
        or error, in order. Every command is pipelined anyway; this is the same API."""
        return _Batch(self)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.closed = True
            if connection.transport is not None:
                connection.transport.close()


class _Batch:
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.commands: list[tuple[Arg, ...]] = []

    async def __aenter__(self) -> _Batch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.commands.clear()

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> None:
        self.commands.append(("EVALSHA", sha, numkeys, *keys_and_args))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        replies = await asyncio.gather(
            *(self.client.execute(*command) for command in self.commands),
            return_exceptions=True,
        )
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        return list(replies)
