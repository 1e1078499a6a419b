"""Sender strings in log lines: one record is one line, whatever a run id holds; tracebacks stay readable."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from operators.log_safety import escape_controls, line_safe_handler

FORGED = "scan-1\n2026-12-01 12:00:00,000 ERROR   latent_stream: forged"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    logger = logging.getLogger("test_log_safety")
    handler = line_safe_handler("%(levelname)s %(name)s: %(message)s", out)
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def test_a_newline_in_a_logged_sender_string_cannot_start_a_line_of_its_own(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    logger.warning("run %s started (%s)", FORGED, "name\r\x1b[2Jcleared")
    logger.warning(f"an f-string with {FORGED}")  # what careless code does
    logger.warning("an object: %s", ValueError(FORGED))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("WARNING ") for line in lines)
    assert "scan-1\\n2026-12-01" in lines[0] and "name\\r\\x1b[2Jcleared" in lines[0]


def test_tracebacks_keep_their_lines_under_a_one_line_message(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed on run %s", FORGED)
    first, *traceback = out.getvalue().splitlines()
    assert first.startswith("ERROR ") and "scan-1\\n2026" in first
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "RuntimeError: boom"


def test_every_control_character_and_unicode_line_break_is_escaped() -> None:
    assert escape_controls("a\tb\x00c\x7fd\x85e\u2028f\u2029g") == "a\\tb\\x00c\\x7fd\\u0085e\\u2028f\\u2029g"
    assert escape_controls("Ångström, 2θ = 12.5°") == "Ångström, 2θ = 12.5°"


def test_the_command_line_logs_one_line_per_record() -> None:
    code = (
        "import logging\nfrom stream.cli import _setup_logging\n_setup_logging('INFO')\n"
        f"logging.getLogger('latent_stream').info('run %s started', {FORGED!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)  # fmt: skip
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("run scan-1\\n2026-12-01 12:00:00,000 ERROR   latent_stream: forged started")
