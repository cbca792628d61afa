"""Escaping of untrusted text for every human-facing output: logs, tables, reports.

The one implementation: the CLI's tables, the audit report and the log formatter all
go through `escape_control`.

Guest mountpoints and agent error texts are chosen by the guest; domain names and image
paths by whoever defines the domain. Logged as they are, a newline in one of them lets a
guest append a line that reads like the daemon's own ("... CRITICAL ...") to the journal
or a log file, and an escape sequence can rewrite the terminal of whoever reads it.
`SafeFormatter` escapes every non-printable character in the message; a traceback, the
one legitimate multi-line part, is indented so that none of its lines passes for a record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from types import TracebackType

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def escape_control(text: str) -> str:
    """`text` with every non-printable character (except space) backslash-escaped.

    Newlines, carriage returns and tabs become \\n, \\r, \\t; other control, format
    (bidi overrides) and separator characters become \\xNN, \\uNNNN or \\UNNNNNNNN.
    Printable text, non-ASCII letters included, is returned unchanged.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _indent(block: str) -> str:
    return "\n".join("  " + escape_control(line) for line in block.splitlines())


class SafeFormatter(logging.Formatter):
    """A logging.Formatter whose output has one line per record, plus indented tracebacks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Format with the record's message escaped; the record itself is left alone."""
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape_control(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei: _ExcInfo) -> str:
        """The traceback, each line indented and escaped."""
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """The stack, each line indented and escaped."""
        return _indent(super().formatStack(stack_info))


def escape_cell(text: str, limit: int | None = None) -> str:
    """`text` escaped for a terminal and, past `limit` characters, cut with an ellipsis.

    The cut is made after escaping, so an escape sequence cannot be split into a raw
    control character, and the cell's width is what the terminal shows.
    """
    cleaned = escape_control(text)
    if limit is None or len(cleaned) <= limit:
        return cleaned
    return cleaned[: limit - 1] + "…"


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, every cell escaped; trailing blanks removed.

    Returns the lines without newlines, header first. Cells are escaped here whatever
    the caller did, so no table in any output can carry a raw control character.
    """
    table = [[escape_control(c) for c in header]] + [[escape_control(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
