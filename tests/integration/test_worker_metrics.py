"""``guard serve --workers 2``: one ``/metrics`` for every worker, real processes and HTTP.

The metrics port serves the sum over both workers: the requests counter, histograms
and reload counter add up to what was sent, exactly as one worker reports the same
traffic (same names, label sets and counts; only the ``*_created`` samples are
missing), and ``guard_build_info`` is 1. Each worker's own file shows that both
served. A worker killed with SIGKILL and restarted, worker 0 (the one that serves the
metrics port) included, loses nothing of the total once its counts were written (each
worker writes its file every second; a SIGKILL loses what it counted since), and one
stopped with SIGTERM loses nothing at all (it writes as it exits). ``/admin/reload`` on the metrics
port reloads every worker. The master's private directory is gone after it exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from guard.workerfiles import FLUSH_S
from guard.workers import EARLY_EXIT_S
from tests.integration.test_workers import Guard, infer, requests_per_worker

ADMIN_TOKEN = "t" * 32

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def stateless_policy(max_value: float = 16.0) -> dict[str, Any]:
    """``digits`` behind ``validate`` alone: no per-client state, so a memory store may
    run several workers."""
    return {
        "version": 1,
        "models": {
            "digits": {
                "model": "builtin:digits",
                "stages": [{"validate": {"min": 0.0, "max": max_value}}],
            }
        },
        "admin": {"token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
    }


def scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(series: Series, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lab), v in series.items() if n == name and wanted <= set(lab))


def traffic(url: str, good: int, bad: int, seed: int) -> list[int]:
    """``good`` valid digits and ``bad`` out-of-range ones (400), each on a fresh
    connection, so SO_REUSEPORT spreads them over the workers."""
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(0, 16, 64) for _ in range(good)]
    inputs += [rng.uniform(0, 16, 64) + 100 for _ in range(bad)]
    return [infer(url, np.asarray(x, np.float32)) for x in rng.permutation(np.array(inputs))]


def wait_for(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def settled(port: int, sent: int) -> Series:
    """The scrape once it counts ``sent`` requests (each worker writes its file every
    second), checked again two seconds later: no more than ``sent``, ever."""
    wait_for(lambda: total(scrape(port), "guard_requests_total") == sent)
    time.sleep(2 * FLUSH_S)
    series = scrape(port)
    assert total(series, "guard_requests_total") == sent
    return series


def test_two_workers_serve_the_sum_on_one_port_as_one_worker_would(tmp_path: Path) -> None:
    good, bad = 30, 10
    scraped: dict[int, Series] = {}
    for workers in (1, 2):
        with Guard(tmp_path, stateless_policy(), workers) as guard:
            codes = traffic(guard.url, good, bad, seed=7)
            assert codes.count(200) == good and codes.count(400) == bad
            scraped[workers] = settled(guard.metrics, good + bad)
            per_worker = requests_per_worker(tmp_path)
            if workers == 1:
                assert per_worker == {}  # one process: no multiprocess files at all
            else:
                assert len(per_worker) == 2, per_worker
                assert all(n > 0 for n in per_worker.values()), per_worker  # both served
                assert sum(per_worker.values()) == good + bad
                try:  # no per-worker metrics port any more
                    scrape(guard.metrics + 1)
                    raise AssertionError("a second metrics port answered")
                except (urllib.error.URLError, ConnectionError):
                    pass
            code, output = guard.stop()
        assert code == 0, output
        assert "Traceback" not in output
    assert not list(tmp_path.glob("guard-metrics-*"))  # the master removed its directory

    one, two = scraped[1], scraped[2]
    for series in (one, two):
        requests = "guard_requests_total"
        assert total(series, requests) == good + bad
        assert total(series, requests, verdict="allow", code="200") == good
        assert total(series, requests, verdict="rejected", code="400") == bad
        assert total(series, "guard_request_duration_seconds_count") == good + bad
        assert total(series, "guard_request_duration_seconds_bucket", le="+Inf") == good + bad
        assert total(series, "guard_build_info") == 1  # once, not once per worker
        assert total(series, "guard_requests_in_flight") == 0
    # The same series as one worker, less the creation times; counts equal.
    assert {k for k in one if not k[0].endswith("_created")} == set(two)
    assert any(k[0].endswith("_created") for k in one)  # one worker: unchanged
    for key, value in one.items():
        name, labels = key
        if name.endswith(("_total", "_count")) or ("le", "+Inf") in labels:
            assert two[key] == value, key
    # Histograms: cumulative buckets per label set, summed per bucket over the workers.
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in two.items()
        if k[0] == "guard_request_duration_seconds_bucket"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)


def test_a_killed_or_stopped_worker_loses_none_of_the_total(tmp_path: Path) -> None:
    with Guard(tmp_path, stateless_policy(), 2) as guard:
        started = time.monotonic()
        sent = len(traffic(guard.url, 20, 4, seed=1))
        settled(guard.metrics, sent)  # flushed: a worker killed now has nothing unwritten
        # A worker that fails within 5 s of its start stops them all (a bad setup).
        time.sleep(max(0.0, EARLY_EXIT_S + 1 - (time.monotonic() - started)))
        directory = next(tmp_path.glob("guard-metrics-*"))
        for victim in sorted(requests_per_worker(tmp_path)):  # each original worker in turn
            before = set(requests_per_worker(tmp_path))
            os.kill(victim, signal.SIGKILL)
            # Restarted: a new pid's files, the dead one's live gauge removed by the master,
            # and the metrics port (worker 0's, when it was the victim) answering again.
            wait_for(lambda before=before: set(requests_per_worker(tmp_path)) - before)
            wait_for(lambda victim=victim: not (directory / f"gauge_livesum_{victim}.db").exists())
            series = wait_for(lambda: scrape(guard.metrics))
            assert total(series, "guard_requests_total") == sent  # nothing lost
            assert (directory / f"counter_{victim}.db").exists()  # its counts stay
            assert total(series, "guard_requests_in_flight") == 0
        # Workers stopped with SIGTERM write everything as they exit: what they served
        # just before is counted without waiting for their once-a-second write. (Once the
        # restarted ones serve: one stopped while it starts would count as failing at start.)
        time.sleep(EARLY_EXIT_S + 1)
        live = live_workers(directory)
        sent += len(traffic(guard.url, 12, 0, seed=2))
        for pid in live:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: len(live_workers(directory) - live) == 2)  # both restarted
        series = settled(guard.metrics, sent)
        assert total(series, "guard_request_duration_seconds_count") == sent
        code, output = guard.stop()
    assert code == 0, output
    assert output.count("restarting") == 4, output
    assert not directory.exists()


def live_workers(directory: Path) -> set[int]:
    """Pids with a live gauge file (the master removes a dead worker's)."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("gauge_livesum_*.db")}


def test_admin_reload_on_the_metrics_port_reloads_every_worker(tmp_path: Path) -> None:
    doc = stateless_policy()
    with Guard(tmp_path, doc, 2) as guard:
        x = np.full(64, 10.0, np.float32)
        assert infer(guard.url, x) == 200
        doc["models"]["digits"]["stages"][0]["validate"]["max"] = 5.0
        guard.path.write_text(yaml.safe_dump(doc))
        wait_for(lambda: scrape(guard.metrics))  # worker 0 binds it after the public port
        request = urllib.request.Request(
            f"http://127.0.0.1:{guard.metrics}/admin/reload",
            method="POST",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
            assert "reloaded" in json.loads(reply.read())
        deadline = time.monotonic() + 15
        statuses: list[int] = []
        while time.monotonic() < deadline:
            statuses = [infer(guard.url, x + i / 1000) for i in range(12)]
            if set(statuses) == {400}:
                break
            time.sleep(0.2)
        reloads = wait_for(
            lambda: (
                total(scrape(guard.metrics), "guard_policy_reloads_total", result="success") == 2
            )
        )
        code, output = guard.stop()
    assert set(statuses) == {400}, output  # every connection, whichever worker took it
    assert reloads and code == 0, output
    assert output.count("reloaded") == 2, output  # worker 0, then the other through the master
