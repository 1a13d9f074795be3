"""Guards as real processes, and the plumbing the reliability suite shares.

:class:`GuardProcess` is ``guard serve`` in a child process, on a free port of
127.0.0.1, its stdout and stderr in a log file the tests read (secrets,
tracebacks). It can be killed, paused, resumed and measured (RSS from
``/proc``). The ``spawn_guard`` fixture starts them and stops every one at the
end of the test, however it ends.

Long variants are opt-in: ``GUARD_SOAK_SECONDS`` (the soak's length, default
25), ``GUARD_FUZZ_EXAMPLES`` (hypothesis examples per property, default 60).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.integration.conftest import http, start_guard  # noqa: F401  (fixtures)
from tests.integration.mlserver_upstream import mlserver_breast_cancer  # noqa: F401  (fixture)
from tests.integration.redis_server import redis_module, redis_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def free_port(*, besides: int | None = None) -> int:
    """A port free now on 127.0.0.1 (and not ``besides``: two ports picked one after
    the other may otherwise be the same, the first socket being closed already)."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != besides:
            return port


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One blocking HTTP exchange on a fresh connection; raises on a timeout (a hang)."""
    parsed = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        conn.request(method, parsed.path or "/", body=body, headers=dict(headers or {}))
        reply = conn.getresponse()
        return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


@dataclass
class GuardProcess:
    """One ``guard serve`` child process."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    policy_path: Path
    metrics_port: int | None = None  # the operators' listener (/metrics, /admin/*)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ops_url(self) -> str:
        """The metrics and admin listener's base URL."""
        if self.metrics_port is None:
            raise RuntimeError("this guard was started with its metrics listener off")
        return f"http://{HOST}:{self.metrics_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        """Resident set size now, from ``/proc/<pid>/status``."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1.0) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise RuntimeError(
                    f"guard exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"guard not ready after {timeout:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit status. Idempotent."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()


def _child_setup(nofile: int | None) -> Callable[[], None]:
    def setup() -> None:
        if sys.platform.startswith("linux"):  # die with the test run, even on SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return setup


@dataclass
class GuardSpawner:
    """Starts guards in ``workdir``; :meth:`stop_all` ends them."""

    workdir: Path
    started: list[GuardProcess] = field(default_factory=list)

    def __call__(
        self,
        policy: Mapping[str, Any],
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        access_log: bool = False,
        files: Mapping[str, str] | None = None,
        nofile: int | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        metrics_port: int | None = 0,
    ) -> GuardProcess:
        """``metrics_port``: 0 picks a free one, None leaves ``--metrics-port`` to the policy."""
        index = len(self.started)
        for name, text in (files or {}).items():
            (self.workdir / name).write_text(text)
        policy_path = self.workdir / f"policy-{index}.yaml"
        policy_path.write_text(yaml.safe_dump(dict(policy)))
        port = port or free_port()
        if metrics_port == 0:
            metrics_port = free_port(besides=port)
        argv = [sys.executable, "-m", "guard.cli", "--log-level", log_level, "serve"]
        argv += ["--policy", str(policy_path), "--host", HOST, "--port", str(port)]
        if metrics_port is not None:
            argv += ["--metrics-host", HOST, "--metrics-port", str(metrics_port)]
        argv += extra_args
        if "--workers" not in extra_args:  # one process: its metrics are the guard's
            argv += ["--workers", "1"]
        if access_log:
            argv.append("--access-log")
        log_path = self.workdir / f"guard-{index}.log"
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(nofile),
            )
        guard = GuardProcess(port, log_path, process, policy_path, metrics_port)
        self.started.append(guard)
        if wait:
            guard.wait_ready()
        return guard

    def stop_all(self) -> None:
        for guard in self.started:
            with contextlib.suppress(Exception):
                guard.stop()


@pytest.fixture
def spawn_guard(tmp_path: Path) -> Iterator[GuardSpawner]:
    spawner = GuardSpawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.stop_all()


def digits_model(*stages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "builtin:digits",
        "stages": [{"validate": {"min": 0.0, "max": 16.0}}, *stages],
        **extra,
    }


def v2_body(x: Any, datatype: str = "FP32") -> bytes:
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": datatype,
        "data": x.ravel().tolist(),
    }
    return orjson.dumps({"inputs": [tensor]})


def assert_healthy(
    guard: GuardProcess, model: str = "digits", headers: dict[str, str] | None = None
) -> None:
    """The process lives, says ready, answers a valid request, and logged no traceback."""
    from guard.models import load_samples

    assert guard.alive(), guard.log()[-3000:]
    assert guard.ready()
    x = load_samples(model)[0][:1]
    reply = request("POST", f"{guard.url}/v2/models/{model}/infer", v2_body(x), headers or {})
    assert reply.status == 200, reply.body[:500]
    log = guard.log()
    assert "Traceback" not in log, log[-3000:]
    assert "unhandled error" not in log, log[-3000:]


def scrape(guard: GuardProcess) -> str:
    return request("GET", f"{guard.ops_url}/metrics").body.decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
