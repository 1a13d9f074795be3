"""A real ``redis-server`` on loopback for tests.

:class:`RedisServer` runs one on a free port of 127.0.0.1 with its files in a
temporary directory: no persistence, no protected-mode surprises, its log at
``<dir>/redis.log``. It can be stopped and started again on the same port, to
test what the guard does while its state store is down.

The ``redis_server`` fixture (import it into a ``conftest.py``) serves a test
module and flushes between tests. Without a ``redis-server`` on ``PATH`` (or at
``$GUARD_REDIS_SERVER``) it skips, unless ``GUARD_REQUIRE_REDIS`` is set (to
anything but ``0``): then it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
REQUIRE_ENV = "GUARD_REQUIRE_REDIS"
SERVER_ENV = "GUARD_REDIS_SERVER"


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` keep the port."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.executable,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (
                    self.log_path.read_text(errors="replace")[-2000:]
                    if self.log_path.exists()
                    else ""
                )
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s); idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def flush(self) -> None:
        self._command(b"FLUSHALL")

    def _answers(self) -> bool:
        try:
            return self._command(b"PING") == b"+PONG\r\n"
        except OSError:
            return False

    def _command(self, name: bytes) -> bytes:
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(name), name))
            return sock.recv(64)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def redis_executable() -> str:
    """The redis-server to run, or skip (fail when GUARD_REQUIRE_REDIS is set)."""
    configured = os.environ.get(SERVER_ENV)
    found = shutil.which(configured) if configured else shutil.which("redis-server")
    if found:
        return found
    reason = (
        f"{SERVER_ENV}={configured} is not an executable"
        if configured
        else "redis-server not found on PATH (apt-get install redis-server, or set GUARD_REDIS_SERVER)"
    )
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_server(redis_module: RedisServer) -> RedisServer:
    """A running redis-server, emptied before the test (restarted if a test stopped it)."""
    if redis_module.process is None or redis_module.process.poll() is not None:
        redis_module.start()
    redis_module.flush()
    return redis_module
