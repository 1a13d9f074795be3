"""The audit log: one JSON line per finding.

Security teams read it beside the rest of their threat data, so each record
names the MITRE ATLAS technique the finding evidences where a stage knows it.
Records carry the client's *name* (from the keys file or its address), never
its key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

import orjson

from guard.pipeline import RequestContext


class AuditLog:
    """Appends findings to a file (or stderr with ``-``); nothing at all when unset."""

    def __init__(self, target: str | None) -> None:
        self.target = target
        self._stream: IO[bytes] | None = None
        if target == "-":
            self._stream = sys.stderr.buffer
        elif target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(target, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def record(self, ctx: RequestContext) -> None:
        if self._stream is None or not ctx.findings:
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
        self._stream.write(lines)

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stderr.buffer:
            self._stream.close()
        self._stream = None
