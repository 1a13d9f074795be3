"""A real ``redis-server`` on loopback for tests.

:class:`RedisServer` runs one on a free port of 127.0.0.1 with its files in a
temporary directory: no persistence, no protected-mode surprises, its log at
``<dir>/redis.log``. It can be stopped and started again on the same port, to
test what the guard does while its state store is down.

The ``redis_server`` fixture (import it into a ``conftest.py``) serves a test
module and flushes between tests. Without a ``redis-server`` on ``PATH`` (or at
``$GUARD_REDIS_SERVER``) it skips, unless ``GUARD_REQUIRE_REDIS`` is set (to
anything but ``0``): then it fails.

:class:`RedisClusterServers` runs a real Redis Cluster: three primaries
(``--cluster-enabled yes``, each with its own config file and bus port), joined
by ``redis-cli --cluster create`` and ready once every node reports
``cluster_state:ok``. Nodes can be killed and restarted one at a time (a node
keeps its ``nodes.conf``, so it rejoins with its slots). The cluster does not
require full coverage: while a node is down, the slots of the others are
served. The ``redis_cluster`` fixture serves a test session and flushes every
node between tests; it needs ``redis-cli`` beside ``redis-server``.

:class:`RedisSentinelServers` runs a primary, a replica of it and a sentinel
(``redis-server --sentinel``) watching them; :meth:`~RedisSentinelServers.failover`
promotes the replica, and killing the primary makes the sentinel do it after a
second. The ``redis_sentinel`` fixture serves a test session.

:class:`TlsRedisServer` answers TLS only, with certificates the ``openssl``
command makes for it (``redis_tls`` fixture, per module).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

HOST = "127.0.0.1"
REQUIRE_ENV = "GUARD_REQUIRE_REDIS"
SERVER_ENV = "GUARD_REDIS_SERVER"


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` keep the port."""

    def __init__(
        self, executable: str, workdir: Path, *, port: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = _free_port() if port is None else port
        self.extra = tuple(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def args(self) -> list[str]:
        return [
            self.executable,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            self.args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
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

    def kill(self) -> None:
        """SIGKILL: connections die mid-command, nothing is flushed; idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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

    def client(self) -> redis.Redis:
        """A plain (single-node, blocking) client of this server, for inspection."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5.0)


class RedisClusterServers:
    """A Redis Cluster of ``size`` primaries, each with ``replicas`` replicas, on loopback."""

    def __init__(
        self, executable: str, cli: str, workdir: Path, size: int = 3, replicas: int = 0
    ) -> None:
        self.cli = cli
        self.replicas = replicas
        size *= 1 + replicas
        ports = _free_ports(2 * size)
        self.nodes = []
        for i in range(size):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir()
            extra = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(ports[2 * i + 1]),  # the bus: not port + 10000
                "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
            ]  # fmt: skip
            self.nodes.append(RedisServer(executable, node_dir, port=ports[2 * i], extra=extra))

    @property
    def url(self) -> str:
        """One node's URL: a cluster client finds the others from it."""
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [self.cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(
                "redis-cli --cluster create failed:\n"
                + created.stdout.decode(errors="replace")[-2000:]
                + created.stderr.decode(errors="replace")[-2000:]
            )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and knows every other."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self.info(node) for node in self.nodes if node.running]
            if all(
                s.get("cluster_state") == "ok"
                and s.get("cluster_known_nodes") == str(len(self.nodes))
                and s.get("cluster_slots_ok") == "16384"
                for s in states
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become ready: {states}")
            time.sleep(0.05)

    def restart(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again and wait until the cluster is whole."""
        node.start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        found = []
        for node in self.nodes:
            if node.running:
                with node.client() as client:
                    if client.info("replication")["role"] == "master":
                        found.append(node)
        return found

    def node_of(self, key: str) -> RedisServer:
        """The running node that serves ``key`` now."""
        for node in self.nodes:
            if node.running:
                with node.client() as client:
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                    for low, high, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if low <= slot <= high:
                            return self._at(int(primary[1]))
        raise LookupError(f"no running node serves {key!r}")

    def _at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def info(self, node: RedisServer) -> dict[str, str]:
        """``CLUSTER INFO`` of one node."""
        with node.client() as client:
            text = client.execute_command("CLUSTER", "INFO").decode()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def keys(self) -> dict[int, list[str]]:
        """Every key of the cluster, by the port of the node that holds it."""
        found = {}
        for node in self.nodes:
            with node.client() as client:
                found[node.port] = sorted(k.decode() for k in client.keys("*"))
        return found


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` watching one primary, named ``master``; alone, so a
    quorum of 1, and quick: the primary is down after 1 s without an answer."""

    def __init__(
        self, executable: str, workdir: Path, *, master: str, primary_port: int, port: int
    ) -> None:
        super().__init__(executable, workdir, port=port)
        self.master = master
        self.config = workdir / "sentinel.conf"  # the sentinel rewrites it: written once
        self.config.write_text(
            f"bind {HOST}\nport {self.port}\ndir {workdir}\nlogfile {self.log_path}\n"
            f"sentinel monitor {master} {HOST} {primary_port} 1\n"
            f"sentinel down-after-milliseconds {master} 1000\n"
            f"sentinel failover-timeout {master} 4000\n"
        )

    def args(self) -> list[str]:
        return [self.executable, str(self.config), "--sentinel"]

    def primary_port(self) -> int:
        with self.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        return int(port)


class RedisSentinelServers:
    """A primary, its replica and a sentinel on loopback: Redis with failover."""

    MASTER = "guard"

    def __init__(self, executable: str, workdir: Path) -> None:
        first, second = workdir / "a", workdir / "b"
        first.mkdir()
        second.mkdir()
        ports = _free_ports(3)  # picked together: one after the other could repeat
        quick = ("--repl-diskless-sync-delay", "0")  # a replica syncs at once, not after 5 s
        primary = RedisServer(executable, first, port=ports[0], extra=quick)
        replica = RedisServer(
            executable,
            second,
            port=ports[1],
            extra=(*quick, "--replicaof", HOST, str(primary.port)),
        )
        self.nodes = [primary, replica]
        (workdir / "sentinel").mkdir()
        self.sentinel = SentinelServer(
            executable,
            workdir / "sentinel",
            master=self.MASTER,
            primary_port=primary.port,
            port=ports[2],
        )

    @property
    def address(self) -> str:
        """The sentinel, as a policy names it (``host:port``)."""
        return f"{HOST}:{self.sentinel.port}"

    @property
    def sentinel_address(self) -> tuple[str, int]:
        return (HOST, self.sentinel.port)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self.sentinel.start()
        self.wait_ready(timeout)

    def primary(self) -> RedisServer:
        """The node the sentinel names primary now."""
        port = self.sentinel.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the sentinel's primary is a running primary with a replica in sync
        that the sentinel knows."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                primary = self.primary()
                with primary.client() as client:
                    info = client.info("replication")
                with self.sentinel.client() as client:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", self.MASTER)
                if (
                    primary.running
                    and info["role"] == "master"
                    and info.get("connected_slaves", 0) >= 1
                    and info.get("slave0", {}).get("state") == "online"
                    and any(_replica_ok(entry) for entry in replicas)
                ):
                    return
            except (redis.RedisError, OSError, StopIteration):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel set did not become ready")
            time.sleep(0.05)

    def failover(self, timeout: float = 30.0) -> None:
        """``SENTINEL FAILOVER``: the replica is promoted; wait until it serves."""
        before = self.primary()
        deadline = time.monotonic() + timeout
        while True:  # NOGOODSLAVE until the sentinel has fresh news of the replica
            try:
                with self.sentinel.client() as client:
                    client.execute_command("SENTINEL", "FAILOVER", self.MASTER)
                break
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.wait_switch(before, timeout)

    def wait_switch(self, before: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until the sentinel names another primary than ``before`` and it serves;
        then make ``before``, if it runs, its replica (as the sentinel would, 10 s later)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                after = self.primary()
                if after is not before:
                    with after.client() as client:
                        if client.info("replication")["role"] == "master":
                            break
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the failover did not happen")
            time.sleep(0.05)
        if before.running:
            self._follow(before, after)
        return after

    def restart(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again, as a replica of the primary, and wait
        until the set is whole."""
        node.start()
        primary = self.primary()
        if primary is not node:
            self._follow(node, primary)
        self.wait_ready(timeout)

    @staticmethod
    def _follow(node: RedisServer, primary: RedisServer) -> None:
        with node.client() as client:
            client.replicaof(HOST, primary.port)

    def stop(self) -> None:
        self.sentinel.stop()
        for node in self.nodes:
            node.stop()

    def flush(self) -> None:
        with self.primary().client() as client:
            client.flushall()
            client.execute_command("WAIT", 1, 5000)


class TlsRedisServer(RedisServer):
    """``redis-server`` answering TLS only (``--port 0 --tls-port``), its certificate for
    127.0.0.1 signed by a CA made for it with the ``openssl`` command; clients need no
    certificate of their own. :attr:`ca` is the CA's certificate file."""

    def __init__(self, executable: str, openssl: str, workdir: Path) -> None:
        super().__init__(executable, workdir)
        self.ca = workdir / "ca.pem"
        key, cert = workdir / "server.key", workdir / "server.pem"
        run = functools.partial(subprocess.run, check=True, capture_output=True, cwd=workdir)
        run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=guard test CA",
                "-keyout",
                "ca.key",
                "-out",
                str(self.ca),
            ]
        )
        run(
            [
                openssl,
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                "server.csr",
            ]
        )
        (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run([openssl, "x509", "-req", "-in", "server.csr", "-CA", str(self.ca),
             "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
             "-out", str(cert)])  # fmt: skip
        self.extra = (
            "--tls-port", str(self.port), "--port", "0",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
        )  # fmt: skip

    @property
    def url(self) -> str:
        """``rediss://`` with the CA to verify the server by (a query the client reads)."""
        return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self.ca}"

    def _answers(self) -> bool:
        try:
            with redis.Redis(
                host=HOST, port=self.port, ssl=True, ssl_ca_certs=str(self.ca), socket_timeout=1
            ) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False


def openssl_executable() -> str:
    """The openssl command (it makes the TLS tests' certificates), or skip (fail when
    GUARD_REQUIRE_REDIS is set)."""
    found = shutil.which("openssl")
    if found:
        return found
    reason = "openssl not found on PATH (apt-get install openssl)"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(reason)


def _replica_ok(entry: dict[bytes, bytes]) -> bool:
    """A SENTINEL REPLICAS entry of a replica fit to promote."""
    return entry.get(b"flags") == b"slave" and entry.get(b"master-link-status") == b"ok"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now on 127.0.0.1 (held open together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _free_port() -> int:
    return _free_ports(1)[0]


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


def redis_cli() -> str:
    """The redis-cli beside the redis-server that runs (it creates clusters)."""
    server = Path(redis_executable())
    beside = server.with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if found:
        return found
    reason = "redis-cli not found (it comes with redis-server: apt-get install redis-server)"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def running_cluster(workdir: Path, replicas: int = 0) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(redis_executable(), redis_cli(), workdir, replicas=replicas)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def running_sentinel(workdir: Path) -> Iterator[RedisSentinelServers]:
    servers = RedisSentinelServers(redis_executable(), workdir)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


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


@pytest.fixture(scope="session")
def redis_cluster_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterServers]:
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterServers) -> RedisClusterServers:
    """A running three-node Redis Cluster, emptied before the test (nodes a test stopped
    are started again)."""
    for node in redis_cluster_session.nodes:
        if not node.running:
            redis_cluster_session.restart(node)
    redis_cluster_session.flush()
    return redis_cluster_session


@pytest.fixture(scope="session")
def redis_sentinel_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisSentinelServers]:
    with running_sentinel(tmp_path_factory.mktemp("redis-sentinel")) as servers:
        yield servers


@pytest.fixture
def redis_sentinel(redis_sentinel_session: RedisSentinelServers) -> RedisSentinelServers:
    """A primary, its replica and a sentinel, emptied before the test (a node a test
    stopped is started again; after a failover the roles stay swapped)."""
    for node in redis_sentinel_session.nodes:
        if not node.running:
            redis_sentinel_session.restart(node)
    redis_sentinel_session.wait_ready()
    redis_sentinel_session.flush()
    return redis_sentinel_session


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    """A redis-server speaking TLS only, for a test module."""
    server = TlsRedisServer(
        redis_executable(), openssl_executable(), tmp_path_factory.mktemp("redis-tls")
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
