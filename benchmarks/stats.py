"""Latency statistics over many samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(slots=True, frozen=True)
class LatencyStats:
    """Percentiles of a latency sample, in milliseconds."""

    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float] | np.ndarray) -> LatencyStats:
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no latency samples: the stage or run produced nothing to measure")
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            n=int(ms.size),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
