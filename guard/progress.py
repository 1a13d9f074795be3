"""A one-line progress bar on stderr for long offline commands, drawn on a terminal only.

``guard attack``, ``tune``, ``certify`` and ``load`` wrap their loops in a
:class:`Progress`. When stderr is a terminal it redraws one line in place
(``certify [######......] 12/40 30% 0:08 eta 0:19 sigma 0.5``) at most ten times
a second; when stderr is a file or a pipe it writes nothing, so logs and captured
output stay free of carriage returns. Hand-written rather than tqdm: one class,
no dependency for the serving install, and stdout (a command's results) is
never touched.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TextIO, TypeVar, overload

T = TypeVar("T")

WIDTH = 24  # characters of the bar itself
INTERVAL = 0.1  # seconds between redraws
TICK = 1.0  # seconds between redraws while nothing moves (the clock keeps going)


class Progress:
    """``total`` steps (``None``: unknown, a counter and the elapsed time instead of a bar).

    ``advance(n, note)`` / ``update(done, note)`` move it, ``write(line)`` prints a line
    above it, ``close()`` (or leaving the ``with`` block) draws the last state and ends
    the line. ``enabled`` defaults to whether ``stream`` (stderr) is a terminal. Once
    drawn, a daemon thread redraws it every ``tick`` seconds (``None``: never), so the
    elapsed time moves while one long step runs.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float | None = TICK,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.clock = clock
        self.done: float = 0
        self.note = ""
        self._started = clock()
        self._drawn_at: float | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._tick = tick
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def each(self, items: Sequence[T]) -> Each[T]:
        """``items``, as often as they are iterated, advancing the bar by one per item
        (when the next one is asked for) and closing it once ``total`` is reached."""
        return Each(self, items)

    def advance(self, n: float = 1, note: str | None = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: float, note: str | None = None) -> None:
        self.done = done
        if note is not None:
            self.note = note
        now = self.clock()
        if self._drawn_at is None or now - self._drawn_at >= INTERVAL:
            self._draw(now)

    def write(self, line: str) -> None:
        """A line of output above the bar (the bar is redrawn under it)."""
        if not self.enabled:
            print(line, file=self.stream, flush=True)
            return
        with self._lock:
            self.stream.write("\r\x1b[K" + line + "\n")
        self._draw(self.clock())

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.enabled and self._drawn_at is not None:
            self._draw(self.clock())
            with self._lock:
                self.stream.write("\n")
                self.stream.flush()
        self._closed = True

    def line(self, now: float) -> str:
        """The text of the bar at time ``now`` (without the carriage return)."""
        elapsed = now - self._started
        parts = [self.label]
        if self.total:
            share = min(max(self.done / self.total, 0.0), 1.0)
            filled = round(share * WIDTH)
            parts.append("[" + "#" * filled + "." * (WIDTH - filled) + "]")
            parts.append(f"{_number(self.done)}/{_number(self.total)}{self.unit}")
            parts.append(f"{share:4.0%}")
            parts.append(_clock(elapsed))
            if 0 < share < 1:
                parts.append("eta " + _clock(elapsed * (1 - share) / share))
        else:
            parts.append(f"{_number(self.done)}{self.unit}")
            parts.append(_clock(elapsed))
        if self.note:
            parts.append(self.note)
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        if not self.enabled or self._closed:
            return
        with self._lock:
            self._drawn_at = now
            self.stream.write("\r\x1b[K" + self.line(now))
            self.stream.flush()
        if self._ticker is None and self._tick is not None:
            self._ticker = threading.Thread(target=self._run_ticker, daemon=True)
            self._ticker.start()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self._tick):
            self._draw(self.clock())


class Each(Sequence[T]):
    """A sequence whose iterations move a :class:`Progress` (see :meth:`Progress.each`)."""

    def __init__(self, bar: Progress, items: Sequence[T]) -> None:
        self.bar = bar
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self.items[index]

    def __iter__(self) -> Iterator[T]:
        for item in self.items:
            yield item
            self.bar.advance()
            if self.bar.total is not None and self.bar.done >= self.bar.total:
                self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
