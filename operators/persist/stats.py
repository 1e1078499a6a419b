"""The writer's counters: what /metrics and the run reports say about persistence."""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

import numpy as np

# Bounds (s) of the frame lag histogram; 2 s is the embedded mode's "fetchable within" target.
LAG_BUCKETS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class WriterStats:
    """Counters for /metrics and for the run report."""

    frames_written: int = 0
    frame_requests: int = 0  # requests that wrote them (frames that queued up go together)
    rows_written: int = 0
    frames_not_written: dict[str, int] = field(default_factory=dict)
    rows_not_written: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    logs_set_aside: int = 0  # crash result logs that could not be replayed (results-log/unreplayable/)
    buffered_rows: int = 0
    buffered_bytes: int = 0
    lag_p50_s: float | None = None  # point sent -> its frame fetchable from Tiled (the last 10,000 frames)
    lag_p95_s: float | None = None
    lag_max_s: float | None = None
    # The same lag over every frame written, as a histogram: frames fetchable within each bound of
    # LAG_BUCKETS_S (cumulative, Prometheus style; keyed "0.1", "0.25", ... for JSON), their count and sum.
    lag_within: dict[str, int] = field(default_factory=dict)
    lag_count: int = 0
    lag_sum_s: float = 0.0


class FrameLag:
    """Point sent -> frame fetchable, for every frame written: recent values and a histogram of all."""

    def __init__(self, recent: int = 10_000) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=recent)
        self._within = [0] * len(LAG_BUCKETS_S)  # frames written within each bound, cumulative
        self._count = 0
        self._sum = 0.0

    def record(self, lag: float) -> None:
        self.recent.append(lag)
        self._count += 1
        self._sum += lag
        for i in range(bisect.bisect_left(LAG_BUCKETS_S, lag), len(LAG_BUCKETS_S)):
            self._within[i] += 1

    def fill(self, stats: WriterStats) -> None:
        """Put the lag figures into `stats`."""
        if self.recent:
            lags = np.array(self.recent)
            stats.lag_p50_s = float(np.percentile(lags, 50))
            stats.lag_p95_s = float(np.percentile(lags, 95))
            stats.lag_max_s = float(lags.max())
        stats.lag_within = {repr(le): n for le, n in zip(LAG_BUCKETS_S, self._within, strict=True)}
        stats.lag_count = self._count
        stats.lag_sum_s = self._sum
