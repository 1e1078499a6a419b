"""One log record, one line: control characters in log messages are escaped.

Run ids, run names, URLs and error details come from senders and clients; a ``\\n`` in one of them would
otherwise start a line that reads like a record of its own (a forged log line), and an ANSI escape could
rewrite the terminal. `LineSafeFormatter` escapes them in the formatted message, whatever argument carried
them; the traceback of ``log.exception`` is appended afterwards by `logging.Formatter.format`, untouched.
Installed by every place that configures logging (``stream.cli``, the embedded Tiled server's process).
"""

from __future__ import annotations

import itertools
import logging
import sys
from types import MappingProxyType
from typing import TextIO


def _escape(char: str) -> str:
    return repr(char)[1:-1] if char.isascii() else f"\\u{ord(char):04x}"


# The C0 controls, DEL and the C1 controls (Unicode category Cc, NEL included), plus the line and paragraph
# separators that some viewers break lines at.
_ESCAPES = MappingProxyType(
    {code: _escape(chr(code)) for code in itertools.chain(range(0x20), range(0x7F, 0xA0), (0x2028, 0x2029))}
)


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return text.translate(_ESCAPES)


class LineSafeFormatter(logging.Formatter):
    """A `logging.Formatter` whose message part is always one line; tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


def line_safe_handler(fmt: str | None = None, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) formatting with `LineSafeFormatter`, for `logging.basicConfig`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineSafeFormatter(fmt))
    return handler
