"""The log formatter: one line per record, whatever the message carries."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from guard.logs import GuardFormatter, escape, quote, setup_logging

HOSTILE = "v1\n2026-01-01 00:00:00,000 CRITICAL guard: forged\r\x1b[31mred\x9b\u202e\u2028\ud800"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain text, unchanged: é ü 中", "plain text, unchanged: é ü 中"),
        ("a\nb", "a\\nb"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("\x1b[31m", "\\x1b[31m"),
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
        ("\u2028\u2029\u202e\u200b\ufeff", "\\u2028\\u2029\\u202e\\u200b\\ufeff"),
        ("\ud800", "\\ud800"),
    ],
)
def test_escape(text: str, escaped: str) -> None:
    assert escape(text) == escaped


def test_quote_is_unambiguous_and_bounded() -> None:
    assert quote("a\\nb") == "'a\\\\nb'"  # a literal backslash-n is not a newline
    assert quote("a\nb") == "'a\\nb'"
    long = quote("x" * 500, limit=10)
    assert long == "'xxxxxxxxxx'...(500 chars)"
    assert escape(quote(HOSTILE)) == quote(HOSTILE)


def record(message: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    rec = logging.LogRecord("guard.test", logging.ERROR, __file__, 1, message, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_text_records_are_one_line_and_tracebacks_are_indented() -> None:
    out = GuardFormatter("text").format(record("serving %s", HOSTILE, exc=True))
    first, *rest = out.split("\n")
    assert "forged" in first and "\\n2026-01-01" in first and "\\x1b[31m" in first
    assert rest and all(line.startswith("    ") for line in rest)
    for char in ("\r", "\x1b", "\x9b", "\u202e", "\u2028", "\ud800"):
        assert char not in out


def test_json_records_carry_fields_and_extras() -> None:
    line = GuardFormatter("json").format(
        record("model %s failed", HOSTILE, exc=True, request_id="r1", model="m", status=503)
    )
    assert "\n" not in line
    doc = orjson.loads(line)
    assert doc["level"] == "ERROR" and doc["logger"] == "guard.test"
    assert doc["ts"].endswith("Z") and doc["message"].startswith("model v1\\n2026")
    assert (doc["request_id"], doc["model"], doc["status"]) == ("r1", "m", 503)
    assert "ValueError" in doc["exc"] and "\x1b" not in doc["exc"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        GuardFormatter("xml")


def test_setup_logging_routes_every_logger() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        root.handlers[:] = []  # pytest's capture handler: setup_logging leaves those alone
        setup_logging("info", "json", stream=stream)
        setup_logging("info", "json", stream=stream)  # replaces its own handler: one line
        logging.getLogger("aiohttp.access").info("GET /%s", "a\nb")
        (line,) = stream.getvalue().splitlines()
        assert orjson.loads(line)["message"] == "GET /a\\nb"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


def test_setup_logging_leaves_a_configured_root_alone() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    saved = list(root.handlers)
    try:
        root.handlers[:] = [other]
        setup_logging("info", "text", stream=io.StringIO())
        assert root.handlers == [other]
    finally:
        root.handlers[:] = saved
