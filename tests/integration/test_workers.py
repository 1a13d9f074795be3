"""``guard serve --workers N``: one port, N processes, state shared through Redis or,
on the memory backend, through the master's state process.

A near-duplicate walk (Blacklight's evidence) and a quota spread over two workers (a
fresh connection per request, so the kernel's SO_REUSEPORT hashing sends them to both)
are answered exactly as by one worker, on either backend; both workers served (each
worker's own metrics file counts some of the requests); SIGHUP reloads every worker
and SIGTERM stops them all; a state process that dies is replaced.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from guard.models import load_samples
from tests.integration.redis_server import RedisServer
from tests.integration.test_cli import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "GUARD_TEST_BLACKLIGHT_KEY"


def policy(redis_url: str | None, queries: int = 1000, *, keyed: bool = True) -> dict[str, Any]:
    """Without ``keyed``, blacklight hashes with a key drawn per process: the workers of
    one master inherit its key (and a second run draws another)."""
    stages: list[dict[str, Any]] = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": queries, "per": "1m"}]}},
        {"blacklight": {"key_env": KEY_ENV} if keyed else {}},  # action: deny
    ]
    doc: dict[str, Any] = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "disclose": {"headers": True, "reasons": True},
    }
    if redis_url:
        doc["state"] = {"backend": "redis", "url": redis_url, "key_prefix": "w:"}
    return doc


class Guard:
    def __init__(self, tmp: Path, doc: dict[str, Any], workers: int) -> None:
        self.path = tmp / f"policy-{workers}.yaml"
        self.path.write_text(yaml.safe_dump(doc))
        self.port, self.metrics = free_port(), free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guard.cli",
                "--log-level",
                "info",
                "serve",
                "--policy",
                str(self.path),
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # TMPDIR: the master's metrics directory is made here, for the tests to read
            env={**os.environ, "PYTHONUNBUFFERED": "1", KEY_ENV: "k" * 32, "TMPDIR": str(tmp)},
        )

    def __enter__(self) -> Guard:
        wait_ready(self.url, self.process, timeout=60)
        self.head = self._wait_for_workers(timeout=60)
        return self

    def _wait_for_workers(self, timeout: float) -> str:
        """The output until every worker logged that it serves (the port answers as soon
        as one does); kept for :meth:`stop`."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()  # unbuffered reads: select sees what is left
        head = b""
        deadline = time.monotonic() + timeout
        while head.count(b"guard serving") < self.workers:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                head += os.read(fd, 65536)
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError("workers did not start:\n" + head.decode())
        return head.decode()

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        output = self.head + self.process.communicate(timeout=30)[0].decode()
        return self.process.returncode, output


def infer(url: str, x: np.ndarray) -> int:
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/digits/infer",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def walk(n: int, seed: int) -> np.ndarray:
    """A boundary walk: one held-out digit nudged a little each time."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    return np.clip(x[seed] + rng.normal(0, 0.02, (n, 64)), 0, 16).astype(np.float32)


def requests_per_worker(tmp: Path) -> dict[int, float]:
    """``guard_requests_total`` by worker pid, read from each worker's own metrics file
    in the master's directory (``TMPDIR`` is ``tmp``)."""
    counts = {}
    for path in tmp.glob("guard-metrics-*/counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        counts[int(path.stem.split("_")[1])] = sum(
            s.value for f in families for s in f.samples if s.name == "guard_requests_total"
        )
    return counts


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_an_attack_spread_over_two_workers_is_caught_as_on_one(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    redis: RedisServer | None = None
    if backend == "redis":
        redis = request.getfixturevalue("redis_server")
    queries = walk(24, seed=3)
    answers = {}
    for workers in (1, 2):
        if redis is not None:
            redis.flush()
        doc = policy(None if redis is None else redis.url, queries=20)
        with Guard(tmp_path, doc, workers) as guard:
            answers[workers] = [infer(guard.url, q) for q in queries]
            if workers == 2:  # once every worker wrote its file (each second)
                deadline = time.monotonic() + 10
                while sum(requests_per_worker(tmp_path).values()) < len(queries):
                    assert time.monotonic() < deadline, requests_per_worker(tmp_path)
                    time.sleep(0.1)
                per_worker = list(requests_per_worker(tmp_path).values())
            code, output = guard.stop()
        assert code == 0, output
        assert "Traceback" not in output
        assert ("state process" in output) == (workers == 2 and backend == "memory"), output
    assert answers[1] == answers[2]
    assert 403 in answers[1]  # the walk is caught (blacklight, action deny) ...
    assert answers[1][20:] == [429] * 4  # ... and the quota of 20 holds over both workers
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker  # both served


def test_sighup_reloads_every_worker(tmp_path: Path, redis_server: RedisServer) -> None:
    doc = policy(redis_server.url)
    with Guard(tmp_path, doc, 2) as guard:
        x = np.full(64, 10.0, np.float32)
        assert infer(guard.url, x) == 200
        doc["models"]["digits"]["stages"][0]["validate"]["max"] = 5.0
        guard.path.write_text(yaml.safe_dump(doc))
        guard.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        statuses: list[int] = []
        while time.monotonic() < deadline:
            statuses = [infer(guard.url, x + i / 1000) for i in range(12)]
            if set(statuses) == {400}:
                break
            time.sleep(0.2)
        code, output = guard.stop()
    assert set(statuses) == {400}, output  # every connection, whichever worker took it
    assert code == 0, output
    assert output.count("reloaded") == 2, output


def test_a_state_process_that_dies_is_replaced(tmp_path: Path) -> None:
    with Guard(tmp_path, policy(None, keyed=False), 2) as guard:
        # The workers hash with their master's key: a walk over both is caught.
        assert 403 in [infer(guard.url, q) for q in walk(16, seed=4)]
        x = np.full(64, 10.0, np.float32)
        assert infer(guard.url, x) == 200
        pid = int(guard.head.split("the state process (pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        statuses: list[int] = []
        while time.monotonic() < deadline:  # refused while it is gone (on_error: closed)
            statuses.append(infer(guard.url, x + len(statuses) / 1000))
            if statuses[-1] == 200:
                break
            time.sleep(0.1)
        code, output = guard.stop()
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert "starting another" in output and output.count("state process (pid") == 3, output
    assert code == 0, output


def test_a_master_killed_outright_takes_its_workers_and_state_process_along(
    tmp_path: Path,
) -> None:
    with Guard(tmp_path, policy(None), 2) as guard:
        state = int(guard.head.split("the state process (pid ")[1].split(")")[0])
        workers = [int(p) for p in guard.head.split("2 workers ([")[1].split("]")[0].split(",")]
        guard.process.kill()
        guard.process.wait()
        deadline = time.monotonic() + 15
        left = [state, *workers]
        while left and time.monotonic() < deadline:
            left = [pid for pid in left if _alive(pid)]
            time.sleep(0.1)
    assert not left, left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:  # reaped meanwhile
        return False
    return status != "Z"  # a zombie has exited (its parent, init, reaps it soon)


@pytest.mark.parametrize("asked", [0, -1])
def test_workers_must_be_positive(tmp_path: Path, asked: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy(None)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "guard.cli",
            "serve",
            "--policy",
            str(path),
            "--workers",
            str(asked),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "--workers must be >= 1" in result.stderr
