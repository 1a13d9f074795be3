"""A worker's metrics, counted in memory and written to prometheus_client's multiprocess
files in batches.

prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) writes every
``inc``/``observe``/``set`` through to the process's memory-mapped file: a process id
check, a lock and a write per value, two values per histogram observation, about 17
writes per guard request (``tests/benchmarks/bench_metrics.py`` measures what that
costs). :class:`WorkerFiles` keeps the request path as cheap as one process's (a lock
and an addition per value, as prometheus_client's own in-memory values) and writes
every value of the process to the same files, in the same format and under the same
keys, in :meth:`WorkerFiles.flush`: every :data:`FLUSH_S` seconds, before the serving
worker reads the files for a scrape, and when the worker stops. The files are then
read by prometheus_client's ``MultiProcessCollector`` and cleaned by its
``mark_process_dead`` exactly as the library's own.

What this costs: another worker's counts reach ``/metrics`` up to :data:`FLUSH_S` late,
and a worker killed without a chance to stop (SIGKILL, a crash) loses what it counted
since its last flush (at most :data:`FLUSH_S` seconds of its requests). A worker that
stops on SIGTERM/SIGINT, or is restarted after exiting, loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

FLUSH_S = 1.0


class WorkerFiles:
    """This process's metric files in ``directory`` (``<type>_<pid>.db``, as
    prometheus_client names them), and every value that :meth:`flush` writes there."""

    def __init__(self, directory: str | Path, pid: int | None = None) -> None:
        self.directory = Path(directory)
        self.pid = os.getpid() if pid is None else pid
        self._files: dict[str, MmapedDict] = {}
        self._values: list[Any] = []
        self._lock = threading.Lock()  # files: flushes and new series, from any thread
        self._closed = False

    def value_class(self) -> type:
        """The value class for prometheus_client's metrics (``values.ValueClass``)."""
        owner = self

        class FlushedValue:
            """A float behind a lock, written to its file by the owner's flush."""

            _multiprocess = True

            def __init__(
                self,
                typ: str,
                metric_name: str,
                name: str,
                labelnames: Any,
                labelvalues: Any,
                help_text: str,
                multiprocess_mode: str = "",
                **_kwargs: Any,
            ) -> None:
                self._value = 0.0
                self._timestamp = 0.0
                self._lock = threading.Lock()
                prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
                self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
                self._file = owner._register(self, prefix, self._key)

            def inc(self, amount: float) -> None:
                with self._lock:
                    self._value += amount

            def set(self, value: float, timestamp: float | None = None) -> None:
                with self._lock:
                    self._value = value
                    self._timestamp = timestamp or 0.0

            def set_exemplar(self, exemplar: Any) -> None:  # no exemplars in multiprocess mode
                return

            def get(self) -> float:
                with self._lock:
                    return self._value

            def get_exemplar(self) -> None:
                return None

        return FlushedValue

    def _register(self, value: Any, prefix: str, key: str) -> MmapedDict:
        with self._lock:
            if self._closed:
                raise RuntimeError("metric files closed: this worker is stopping")
            file = self._files.get(prefix)
            if file is None:
                path = self.directory / f"{prefix}_{self.pid}.db"
                file = self._files[prefix] = MmapedDict(str(path))
            file.write_value(key, 0.0, 0.0)  # the series exists from its creation on
            self._values.append(value)
        return file

    def flush(self) -> None:
        """Write every value to its file (a few hundred 16-byte writes)."""
        with self._lock:
            if self._closed:
                return
            for value in self._values:
                value._file.write_value(value._key, value._value, value._timestamp)

    async def flush_every(self, seconds: float) -> None:
        """Flush every ``seconds`` until cancelled (a task on the worker's loop)."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def close(self) -> None:
        """Flush, then close the files (they stay in the directory for the others)."""
        self.flush()
        with self._lock:
            self._closed = True
            for file in self._files.values():
                file.close()


def use_worker_files(directory: str | Path) -> WorkerFiles:
    """Make this process's metrics count in memory and flush to ``directory``; call it in
    a worker before it builds any metric (values built earlier are not written)."""
    files = WorkerFiles(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = files.value_class()
    return files
