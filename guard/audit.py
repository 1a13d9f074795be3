"""The audit log: one JSON line per finding.

Security teams read it beside the rest of their threat data, so each record
names the MITRE ATLAS technique the finding evidences where a stage knows it.
Records carry the client's *name* (from the keys file or its address), never
its key.

Findings come fastest exactly under attack, so the event loop never writes
them: :meth:`AuditLog.record` formats a finding's lines and queues them, and a
writer thread appends them to the file. The queue is bounded
(``MAX_QUEUED`` batches): when the disk cannot keep up, records are dropped and
counted (:attr:`AuditLog.dropped`, ``guard_audit_dropped_total``), never
waited for. :meth:`AuditLog.close` writes what is queued, then stops the thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import orjson

from guard.pipeline import RequestContext

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000  # batches (one per request with findings) waiting for the writer
CLOSE_WAIT = 5.0  # seconds close() waits for the writer to finish


class AuditLog:
    """Appends findings to a file (or stderr with ``-``); nothing at all when unset."""

    def __init__(
        self,
        target: str | None,
        *,
        on_drop: Callable[[], None] | None = None,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.target = target
        self.dropped = 0
        self._on_drop = on_drop
        self._stream: IO[bytes] | None = None
        if target == "-":
            self._stream = sys.stderr.buffer
        elif target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(target, "ab")  # noqa: SIM115 - closed in close()
        self._queue: queue.Queue[bytes | None] = queue.Queue(max_queued)
        self._queued = 0  # batches queued and written: flush() waits for them to meet
        self._written = 0
        self._failing = False
        self._writer: threading.Thread | None = None
        if self._stream is not None:
            self._writer = threading.Thread(
                target=self._write, args=(self._stream,), name="guard-audit", daemon=True
            )
            self._writer.start()

    def record(self, ctx: RequestContext) -> None:
        if self._writer is None or not ctx.findings:
            return
        now = time.time()
        lines = b"".join(
            orjson.dumps(
                {
                    "ts": now,
                    "request_id": ctx.request_id,
                    "model": ctx.model,
                    "client": ctx.client.name,
                    "stage": f.stage,
                    "action": f.action.value,
                    "intended": f.intended.value,
                    "score": f.score,
                    "threshold": f.threshold,
                    "technique": f.technique,
                    "message": f.message,
                }
            )
            + b"\n"
            for f in ctx.findings
        )
        try:
            self._queue.put_nowait(lines)
            self._queued += 1
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()

    def _write(self, stream: IO[bytes]) -> None:
        stop = False
        while not stop:
            lines = self._queue.get()
            if lines is None:
                return
            batch = [lines]
            while len(batch) < 256:  # what else is waiting, in one write
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                stream.write(b"".join(batch))
                stream.flush()
            except (OSError, ValueError) as exc:  # a full disk, a closed pipe: drop, say so
                self.dropped += len(batch)
                if not self._failing:
                    log.error("audit log %s cannot be written: %s", self.target, exc)
                self._failing = True
            else:
                self._failing = False
            self._written += len(batch)

    def flush(self, timeout: float = CLOSE_WAIT) -> bool:
        """Wait until everything queued so far is written; False when ``timeout`` passed."""
        target = self._queued
        deadline = time.monotonic() + timeout
        while self._writer is not None and self._written < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(CLOSE_WAIT)
            self._writer = None
        if self._stream is not None and self._stream is not sys.stderr.buffer:
            with contextlib.suppress(OSError):  # what it could not write was counted
                self._stream.close()
        self._stream = None
