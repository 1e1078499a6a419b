"""Per-frame warnings are logged at most once per interval per kind, saying how many were left out."""

from __future__ import annotations

import logging

from operators.throttled_log import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_one_kind_logs_once_then_once_per_interval_with_the_count(caplog) -> None:
    clock = Clock()
    warn = ThrottledLog(logging.getLogger("test.throttle"), interval_s=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for i in range(1000):
            warn.warning("bad_dtype", "rejected frame %d", i)
        clock.now += 5.0
        warn.warning("bad_dtype", "rejected frame %d", 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "rejected frame 0",
        "rejected frame 1000 (and 999 more like this in the last 5 s, not logged)",
    ]


def test_kinds_are_throttled_separately(caplog) -> None:
    warn = ThrottledLog(logging.getLogger("test.throttle"), interval_s=5.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for _ in range(3):
            warn.warning("bad_dtype", "dtype")
            warn.warning("nan_frame", "nan")
    assert [r.getMessage() for r in caplog.records] == ["dtype", "nan"]
