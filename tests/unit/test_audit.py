"""The audit log: lines written by its thread, never by the caller, dropped and counted
when the writer cannot keep up."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from guard.audit import AuditLog
from guard.clients import Client
from guard.inference import InferRequest
from guard.pipeline import Action, RequestContext


def finding(client: str = "mallory", n: int = 0) -> RequestContext:
    ctx = RequestContext(
        request_id=f"r{n}",
        model="digits",
        client=Client(client),
        request=InferRequest(model_name="digits", inputs={"input": np.zeros((1, 64), np.float32)}),
    )
    ctx.report("blacklight", Action.FLAG, "query matches 3 recent queries", score=3, threshold=2)
    return ctx


def test_findings_are_written_as_json_lines_by_the_writer_thread(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    callers = set()
    for n in range(50):
        callers.add(threading.get_ident())
        log.record(finding(n=n))
    assert log.flush()
    records = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in records] == [f"r{n}" for n in range(50)]
    assert records[0]["stage"] == "blacklight" and records[0]["client"] == "mallory"
    assert log._writer is not None and log._writer.ident not in callers
    log.close()


def test_a_stuck_disk_drops_records_instead_of_blocking_the_caller(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()  # nobody reads: the writer blocks once the pipe is full
    dropped: list[int] = []
    log = AuditLog(f"/proc/self/fd/{write_end}", on_drop=lambda: dropped.append(1), max_queued=100)
    started = time.perf_counter()
    for n in range(5000):  # ~1 MiB of lines: far past the pipe's 64 KiB and the queue
        log.record(finding(n=n))
    assert time.perf_counter() - started < 5.0  # it returned: nothing waited for the disk
    assert log.dropped > 0 and len(dropped) == log.dropped
    os.close(read_end)  # the writer's blocked write fails: it counts, logs and goes on
    started = time.perf_counter()
    log.close()
    assert time.perf_counter() - started < 5.0
    assert log.dropped > len(dropped)  # what the failed writes lost is counted too
    os.close(write_end)


def test_nothing_is_recorded_without_a_target() -> None:
    log = AuditLog(None)
    log.record(finding())
    assert log.flush() and log.dropped == 0
    log.close()
