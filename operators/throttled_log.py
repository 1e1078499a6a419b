"""Warnings that can repeat once per frame, logged at most once per interval per kind.

A detector sending malformed frames at 250 Hz would otherwise write 250 log lines a second: the
counters (/metrics) stay exact, the log says what happened and how often.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class ThrottledLog:
    """``warning(kind, msg, *args)``: logs the first of each kind, then at most one per `interval_s`,
    each saying how many of that kind were left out since the last one. Safe from any thread."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            left_out = self._suppressed.pop(kind, 0)
        if left_out:
            msg += " (and %d more like this in the last %.0f s, not logged)"
            args = (*args, left_out, now - last)
        self.logger.warning(msg, *args)
