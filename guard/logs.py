"""Log lines a client cannot forge: escaping, quoting, and the text and JSON formats.

Every log record the guard writes goes through one :class:`GuardFormatter`
(``guard serve`` and ``guard demo`` install it with :func:`setup_logging`), so
a client-controlled string that reaches a message (a path, a version segment,
a header value, an upstream's error text, aiohttp's access-log request line)
cannot start a new line, move the cursor or colour a terminal:

- the formatted message has every control character (C0, DEL, C1), Unicode
  line and paragraph separators, bidirectional overrides, zero-width
  characters and lone surrogates written as ``\\n``, ``\\x1b``, ``\\u202e`` ...;
- a traceback (ours, but its last line may quote input) keeps its newlines
  and has every line indented, so no line of it can pass for a record of its
  own: in the text format, a line that does not start with whitespace starts
  a record;
- :func:`quote` wraps a client string in quotes with ``repr``-style escapes
  (backslashes included) and a length cap, so a log reader can tell where the
  client's text begins and ends. Log calls pass client strings through it.

``--log-format json`` writes one JSON object per line: ``ts`` (ISO 8601, UTC),
``level``, ``logger``, ``message``, ``exc`` when there is a traceback, and the
structured extras a call attaches (``request_id``, ``model``, ``client``,
``method``, ``path``, ``status``, ``remote``, ``stage``, ``upstream``; the access
log's ``remote_address``, ``first_request_line``, ``response_status``,
``response_size``).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone
from typing import TextIO

import orjson

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUOTE_LIMIT = 200  # characters of a client string kept in a log line
EXTRAS = (
    "request_id",
    "model",
    "client",
    "method",
    "path",
    "status",
    "remote",
    "stage",
    "upstream",
    # aiohttp's access log (--access-log) attaches these
    "remote_address",
    "first_request_line",
    "response_status",
    "response_size",
)

# C0 controls, DEL and C1 controls (\x9b is a one-byte CSI to some terminals), line and
# paragraph separators, zero-width and bidirectional formatting characters, BOM, surrogates.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_UNSAFE_IN_TRACEBACK = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line, with every character that could forge or hide a line escaped."""
    return _UNSAFE.sub(_escape_char, text)


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A client-controlled value for a log line: quoted, escaped, at most ``limit`` chars.

    ``repr`` escapes backslashes and quotes too, so the quoted text is unambiguous;
    the result is also safe for :func:`escape` (it leaves it unchanged).
    """
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    quoted = escape(repr(text[:limit]))
    return f"{quoted}...({len(text)} chars)" if cut else quoted


def _traceback(text: str) -> str:
    """A traceback under its record: every line indented, so none passes for a record."""
    lines = _UNSAFE_IN_TRACEBACK.sub(_escape_char, text).split("\n")
    return "\n".join("    " + line for line in lines)


class GuardFormatter(logging.Formatter):
    """``text``: the classic one-line format, escaped; ``json``: one object per line."""

    def __init__(self, fmt: str = "text") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        super().__init__(TEXT_FORMAT)
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if self.json:
            return self._json(record, message)
        record.message = message
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_text:
            line += "\n" + _traceback(record.exc_text)
        if record.stack_info:
            line += "\n" + _traceback(self.formatStack(record.stack_info))
        return line

    def _json(self, record: logging.LogRecord, message: str) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        doc: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key in EXTRAS:
            value = record.__dict__.get(key)
            if value is not None:
                doc[key] = value if isinstance(value, int | float | bool) else escape(str(value))
        if record.exc_text:
            doc["exc"] = _UNSAFE_IN_TRACEBACK.sub(_escape_char, record.exc_text)
        if record.stack_info:
            doc["stack"] = _UNSAFE_IN_TRACEBACK.sub(_escape_char, record.stack_info)
        # orjson refuses lone surrogates: every string above is escaped first.
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every logger (ours, aiohttp's access and server logs, ``warnings``) through
    one :class:`GuardFormatter` on ``stream`` (default: stderr).

    Like :func:`logging.basicConfig`, it leaves a root logger that something else
    already configured alone (a host application, pytest); a handler it installed
    itself before is replaced.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    if root.handlers:
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(GuardFormatter(fmt))
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)


_OURS = "_guard_handler"
