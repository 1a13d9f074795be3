"""The progress bar: drawn in place on a terminal, nothing at all elsewhere."""

from __future__ import annotations

import io

from guard.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_written_when_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("certify", 10, stream=stream) as bar:
        for _ in range(10):
            bar.advance(note="sigma 0.5")
    assert not bar.enabled and stream.getvalue() == ""


def test_a_bar_with_a_total_redraws_one_line_in_place() -> None:
    stream, clock = Terminal(), Clock()
    with Progress("certify", 4, stream=stream, clock=clock, tick=None) as bar:
        clock.now = 2.0
        bar.advance(note="sigma 0.5")
        assert (
            bar.line(clock.now)
            == "certify [" + "#" * 6 + "." * 18 + "] 1/4  25% 0:02 eta 0:06 sigma 0.5"
        )
        clock.now = 8.0
        bar.update(4)
    text = stream.getvalue()
    assert text.endswith("] 4/4 100% 0:08 sigma 0.5\n")
    assert text.count("\n") == 1 and text.count("\r") >= 2  # one line, redrawn


def test_redraws_are_rate_limited() -> None:
    stream, clock = Terminal(), Clock()
    bar = Progress("load", 10.0, unit=" s", stream=stream, clock=clock, tick=None)
    for step in range(100):  # all at the same instant: drawn once
        bar.update(step / 10)
    assert stream.getvalue().count("\r") == 1
    clock.now = 1.0
    bar.update(5.0)
    assert stream.getvalue().count("\r") == 2 and "5/10 s" in stream.getvalue()


def test_without_a_total_it_counts_and_lines_go_above_it() -> None:
    stream, clock = Terminal(), Clock()
    with Progress("tune", unit=" steps", stream=stream, clock=clock, tick=None) as bar:
        clock.now = 61.0
        bar.write("  #1 base: ok")
        bar.advance()
    lines = stream.getvalue().split("\n")
    assert lines[0].endswith("  #1 base: ok")
    assert lines[1].endswith("tune 1 steps 1:01") and lines[2] == ""


def test_lines_without_a_terminal_are_plain_lines() -> None:
    stream = io.StringIO()
    with Progress("tune", stream=stream) as bar:
        bar.write("  #1 base: ok")
        bar.advance()
    assert stream.getvalue() == "  #1 base: ok\n"


def test_each_advances_over_several_passes_and_closes_at_the_total() -> None:
    stream, clock = Terminal(), Clock()
    bar = Progress("certify", 6, stream=stream, clock=clock, tick=None)
    items = bar.each([10, 20, 30])
    assert len(items) == 3 and items[1] == 20
    seen = []
    for _ in range(2):  # one pass per sigma
        for item in items:
            clock.now += 1
            seen.append(item)
    assert seen == [10, 20, 30, 10, 20, 30]
    assert bar.done == 6 and stream.getvalue().endswith("6/6 100% 0:06\n")


def test_each_in_a_pipe_is_only_the_items() -> None:
    stream = io.StringIO()
    assert list(Progress("certify", 3, stream=stream).each([1, 2, 3])) == [1, 2, 3]
    assert stream.getvalue() == ""


def test_the_clock_keeps_moving_while_a_long_step_runs() -> None:
    import threading
    import time

    stream, clock = Terminal(), Clock()
    bar = Progress("attack", 2, stream=stream, clock=clock, tick=0.01)
    bar.update(0, "hopskipjump")  # then nothing moves for a while
    clock.now = 75.0
    deadline = time.monotonic() + 10
    while "1:15" not in stream.getvalue() and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    bar.close()
    assert "attack [........................] 0/2   0% 1:15 hopskipjump" in stream.getvalue()
    assert stream.getvalue().endswith("\n") and bar._ticker is not None
    assert not bar._ticker.is_alive()
