"""The memory state shared by the workers of one ``guard serve --workers N``.

A worker's :class:`~guard.state.memory.MemoryStore` is its own: detection spread over
workers would go unseen. With ``state.backend: memory`` and more than one worker, the
master forks a *state process* before the workers: it holds the one MemoryStore and
serves it on a Unix socket in a private directory (mode 0700) named in
``GUARD_STATE_SOCKET``; every worker's store is a :class:`LocalStore`, which sends each
operation there and awaits its result. An attack spread over the workers is then seen
as by one process, as with Redis, without running Redis.

The wire: each message is a 4-byte little-endian length and a pickle: ``(operation,
args, kwargs)`` one way, ``(ok, result or message)`` the other. Pickle trusts its
sender: only processes of this user can reach the socket (the directory's mode), and
those can read this process's memory anyway. A connection's operations are answered
in order, so a worker writes each as issued and matches replies first in, first out
(like :class:`~guard.state.resp.RespClient`); the state process runs them one at a
time (a MemoryStore operation never waits), so each is atomic as in one process.

The state process is one core's worth of state work for the whole host: past a few
thousand requests a second of a policy with detectors, use Redis. It holds what it
started with (``max_clients``, ``max_bytes``); a reload that changes them changes
nothing there. If it dies, the master starts another (the state starts empty, as
after a restart of one process) and operations fail meanwhile (the stages'
``on_error``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from guard.errors import StateUnavailable
from guard.state.base import FingerprintMatch
from guard.state.memory import MemoryStore

__all__ = ["SOCKET_ENV", "LocalStore", "run_state_process", "serve_state", "serving"]

SOCKET_ENV = "GUARD_STATE_SOCKET"
TIMEOUT_S = 2.0  # an operation not answered by then fails (the state process is stuck)
_OPERATIONS = frozenset(
    {
        "incr",
        "spend",
        "mark",
        "marked",
        "push",
        "items",
        "match_fingerprints",
        "append_bytes",
        "read_bytes",
        "append_log",
    }
)
_LENGTH = 4
_BACKLOG = 1 << 20  # bytes of replies a connection may hold unread before it waits

log = logging.getLogger(__name__)


def _frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_LENGTH, "little") + data


# -- the state process ------------------------------------------------------------------
async def serve_state(path: str, store: MemoryStore) -> None:
    """Serve ``store`` on the Unix socket ``path`` until cancelled (then its connections
    close, as when the process ends)."""
    connections: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(writer)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(_LENGTH), "little")
                operation, args, kwargs = pickle.loads(await reader.readexactly(size))
                try:
                    if operation not in _OPERATIONS:
                        raise ValueError(f"no operation {operation!r}")
                    reply = (True, await getattr(store, operation)(*args, **kwargs))
                except Exception as exc:  # the caller's fault: its reply, not this process's end
                    reply = (False, f"{operation}: {type(exc).__name__}: {exc}")
                writer.write(_frame(reply))
                if writer.transport.get_write_buffer_size() > _BACKLOG:
                    await writer.drain()  # a worker not reading: stop reading its requests
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away
        except Exception:  # an unreadable message: this connection is out of step
            log.exception("state process: dropped a connection")
        finally:
            connections.discard(writer)
            writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        async with server:
            await server.serve_forever()
    finally:
        for writer in list(connections):
            writer.transport.abort()


def run_state_process(path: str, max_clients: int, max_bytes: int) -> None:
    """The state process's body: serve a fresh MemoryStore on ``path`` until killed. It
    ignores the signals the master forwards to workers, so that it outlives their
    draining; the master stops it once they have exited."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if os.path.exists(path):
        os.unlink(path)  # a dead predecessor's
    store = MemoryStore(max_clients=max_clients, max_bytes=max_bytes)
    asyncio.run(serve_state(path, store))


def serving(path: str) -> bool:
    """Whether a state process accepts connections on ``path`` (a socket file left by a
    dead one does not)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# -- a worker's store ---------------------------------------------------------------------
class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        while len(buf) - pos >= _LENGTH:
            end = pos + _LENGTH + int.from_bytes(buf[pos : pos + _LENGTH], "little")
            if len(buf) < end:
                break
            reply = pickle.loads(buf[pos + _LENGTH : end])
            pos = end
            if not self.waiting:
                self.fail(ConnectionError("the state process sent a reply nobody asked for"))
                return
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to the state process lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class LocalStore:
    """:class:`~guard.state.base.StateStore` in this host's state process (see the module)."""

    backend = "memory"
    shared = True
    same_master = True  # the workers of one master (it draws their secrets before forking)

    def __init__(self, path: str, *, on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._on_error = on_error
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    async def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        try:
            connection = self._connection
            if connection is None or connection.closed:
                connection = await self._connect()
            future = connection.loop.create_future()
            connection.transport.write(_frame((operation, args, kwargs)))  # type: ignore[union-attr]
            connection.waiting.append(future)
            ok, result = await asyncio.wait_for(future, TIMEOUT_S)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError) and self._connection is not None:
                self._connection.fail(ConnectionError("timed out"))  # replies now out of step
            self._failed(operation)
            raise StateUnavailable(
                f"state store unavailable (state process: {type(exc).__name__})"
            ) from exc
        if not ok:
            self._failed(operation)
            raise StateUnavailable(f"state store error ({result})")
        return result

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection, however many callers wait for it
            if self._connection is not None and not self._connection.closed:
                return self._connection  # opened while this caller waited
            loop = asyncio.get_running_loop()
            _, fresh = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Connection(loop), self.path), TIMEOUT_S
            )
            self._connection = fresh
            return fresh

    def _failed(self, operation: str) -> None:
        if self._on_error is not None:
            self._on_error(operation)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.closed = True
            if connection.transport is not None:
                connection.transport.close()

    # -- the operations (see StateStore) ------------------------------------------------
    async def incr(self, key: str, amount: int, window_s: float) -> tuple[int, float]:
        result: tuple[int, float] = await self._call("incr", key, amount, window_s)
        return result

    async def spend(
        self, key: str, amount: int, limit: int, window_s: float | None
    ) -> tuple[bool, int]:
        result: tuple[bool, int] = await self._call("spend", key, amount, limit, window_s)
        return result

    async def mark(self, key: str, ttl_s: float) -> None:
        await self._call("mark", key, ttl_s)

    async def marked(self, key: str) -> bool:
        return bool(await self._call("marked", key))

    async def push(self, key: str, items: Sequence[bytes], cap: int, ttl_s: float) -> int:
        return int(await self._call("push", key, list(items), cap, ttl_s))

    async def items(self, key: str) -> list[bytes]:
        result: list[bytes] = await self._call("items", key)
        return result

    async def match_fingerprints(
        self,
        table: str,
        client: str,
        fingerprints: Sequence[Sequence[int]],
        *,
        threshold: int,
        max_queries: int,
        ttl_s: float,
        max_per_hash: int,
        digests: Sequence[bytes] | None = None,
        max_per_client: int | None = None,
    ) -> list[FingerprintMatch]:
        result: list[FingerprintMatch] = await self._call(
            "match_fingerprints",
            table,
            client,
            [list(f) for f in fingerprints],
            threshold=threshold,
            max_queries=max_queries,
            ttl_s=ttl_s,
            max_per_hash=max_per_hash,
            digests=None if digests is None else [bytes(d) for d in digests],
            max_per_client=max_per_client,
        )
        return result

    async def append_bytes(self, key: str, data: bytes, max_bytes: int, ttl_s: float) -> int:
        return int(await self._call("append_bytes", key, bytes(data), max_bytes, ttl_s))

    async def read_bytes(self, key: str) -> bytes:
        result: bytes = await self._call("read_bytes", key)
        return result

    async def append_log(
        self, key: str, data: bytes, max_bytes: int, ttl_s: float, since: int | None
    ) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self._call(
            "append_log", key, bytes(data), max_bytes, ttl_s, since
        )
        return result
