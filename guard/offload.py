"""Decoding large bodies off the event loop, in a worker process.

Parsing JSON holds the GIL: a thread would not free the loop. A body of at
least ``limits.offload_decode_bytes`` is decoded in a worker process instead,
and the loop only moves its bytes and the decoded arrays (pickled, a copy).
Smaller bodies decode on the loop, where a process hop would cost more than it
saves. The worker starts with the first large body (a ``spawn`` child: no
forked copy of the guard's threads and sessions) and lives as long as the app.
Errors raised in the worker are :class:`~guard.errors.GuardError` and cross
back intact (see ``GuardError.__reduce__``). A worker that dies (killed, out of
memory) fails the requests it held with 503 and is replaced at the next one.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from guard.errors import Overloaded

__all__ = ["Decoder"]

T = TypeVar("T")


class Decoder:
    """Runs a decode function on the loop or, for large bodies, in a worker process."""

    def __init__(self, threshold: int, *, workers: int = 1) -> None:
        self.threshold = threshold
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def offloads(self, size: int) -> bool:
        return 0 < self.threshold <= size

    async def __call__(self, decode: Callable[..., T], body: bytes, **kwargs: Any) -> T:
        if not self.offloads(len(body)):
            return decode(body, **kwargs)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, functools.partial(decode, body, **kwargs))
        except BrokenProcessPool:  # the worker died (killed, out of memory): a new one next
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            raise Overloaded("the guard's decoder restarted; try again") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
