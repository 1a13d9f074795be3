"""Worker metric files (guard.workerfiles) summed by GuardMetrics.aggregate.

Two workers' files (two ``WorkerFiles`` with their own pids, in one directory) that
saw the two halves of some traffic are exposed as one process that saw all of it
exposes it: the same series, counters and histogram buckets equal, sums equal to
rounding. Values reach the files only when flushed; a dead worker's live gauge goes
with ``mark_process_dead`` and its counts stay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from guard.clients import Client
from guard.inference import InferRequest
from guard.metrics import GuardMetrics
from guard.pipeline import Action, RequestContext
from guard.workerfiles import WorkerFiles

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Process:
    """What one process holds: its value class (prometheus_client reads the global
    ``values.ValueClass`` when a labelled child is first made, so it is set again before
    every use here, as it would stay set in a worker) and its GuardMetrics."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, value_class: type) -> None:
        self.monkeypatch, self.value_class = monkeypatch, value_class
        monkeypatch.setattr(values, "ValueClass", value_class)  # restored after the test
        self.metrics = GuardMetrics(CollectorRegistry())
        self.metrics.info.info({"version": "test"})

    def use(self) -> GuardMetrics:
        self.monkeypatch.setattr(values, "ValueClass", self.value_class)
        return self.metrics


def contexts(n: int, seed: int) -> list[tuple[RequestContext, float, int]]:
    rng = np.random.default_rng(seed)
    client = Client(name="c")
    request = InferRequest(model_name="m", inputs={"x": np.zeros((1, 4), np.float32)})
    made = []
    for i in range(n):
        ctx = RequestContext(
            request_id=str(i), model=str(rng.choice(["a", "b"])), client=client, request=request
        )
        ctx.upstream_seconds = float(rng.lognormal(-7, 1))
        ctx.stage_seconds = {s: float(rng.lognormal(-10, 1)) for s in ("validate", "prada")}
        if rng.random() < 0.3:
            ctx.report("prada", Action.FLAG, "flagged")
        made.append((ctx, float(rng.lognormal(-6, 1)), int(rng.choice([200, 400, 429]))))
    return made


def series(registry: CollectorRegistry) -> Series:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def feed(process: Process, traffic: list[tuple[RequestContext, float, int]]) -> None:
    metrics = process.use()
    for ctx, seconds, code in traffic:
        metrics.observe(ctx, protocol="v2", code=code, seconds=seconds)


def test_two_workers_files_sum_to_what_one_process_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    traffic = contexts(300, seed=5)
    first, second = WorkerFiles(tmp_path, pid=101), WorkerFiles(tmp_path, pid=102)
    worker_a = Process(monkeypatch, first.value_class())
    worker_b = Process(monkeypatch, second.value_class())
    one = Process(monkeypatch, values.MutexValue)
    feed(worker_a, traffic[:120])
    feed(worker_b, traffic[120:])
    feed(one, traffic)
    worker_a.use().reloads.labels("success").inc()
    worker_b.use().reloads.labels("success").inc()
    one.use().reloads.labels("success").inc(2)
    second.flush()  # worker a's own values are flushed by its aggregate, before reading

    summed = series(worker_a.use().aggregate(tmp_path, first.flush))
    alone = {k: v for k, v in series(one.use().registry).items() if not k[0].endswith("_created")}
    assert set(summed) == set(alone)
    for key, value in alone.items():
        if key[0].endswith("_sum"):
            assert summed[key] == pytest.approx(value, rel=1e-9), key
        else:  # counts, buckets, info: exact
            assert summed[key] == value, key
    assert summed[("guard_policy_reloads_total", (("result", "success"),))] == 2
    assert summed[("guard_build_info", (("version", "test"),))] == 1


def test_values_reach_the_files_when_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = WorkerFiles(tmp_path, pid=201)
    worker = Process(monkeypatch, files.value_class())
    reader = Process(monkeypatch, values.MutexValue).metrics  # the serving worker, elsewhere
    feed(worker, contexts(10, seed=1))

    def requests() -> float:
        found = series(reader.aggregate(tmp_path))
        return sum(v for (name, _), v in found.items() if name == "guard_requests_total")

    assert requests() == 0  # counted in memory, not yet written
    files.flush()
    assert requests() == 10
    feed(worker, contexts(5, seed=2))
    files.close()  # a worker that stops writes everything
    assert requests() == 15
    files.flush()  # closed: nothing more, no error
    assert requests() == 15


def test_a_dead_workers_live_gauge_goes_and_its_counts_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = WorkerFiles(tmp_path, pid=301)
    worker = Process(monkeypatch, files.value_class())
    reader = Process(monkeypatch, values.MutexValue).metrics
    feed(worker, contexts(7, seed=3))
    worker.metrics.in_flight.inc(3)
    files.flush()
    before = series(reader.aggregate(tmp_path))
    assert before[("guard_requests_in_flight", ())] == 3
    mark_process_dead(301, str(tmp_path))  # what the master does when the worker exits
    after = series(reader.aggregate(tmp_path))
    assert after[("guard_requests_in_flight", ())] == 0
    assert {k: v for k, v in after.items() if k[0] != "guard_requests_in_flight"} == {
        k: v for k, v in before.items() if k[0] != "guard_requests_in_flight"
    }
