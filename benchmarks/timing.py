"""Timing a callable over many frames after warm-up."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.stats import LatencyStats


@dataclass(slots=True, frozen=True)
class Budget:
    """How long each stage is timed: `iters` calls after `warmup`, cut short after `max_seconds`."""

    warmup: int = 5
    iters: int = 200
    max_seconds: float = 10.0
    min_iters: int = 5  # never report percentiles from fewer calls than this

    @classmethod
    def quick(cls) -> Budget:
        return cls(warmup=3, iters=40, max_seconds=3.0)


def time_calls(fn: Callable[[int], object], budget: Budget) -> tuple[LatencyStats, list[float]]:
    """Call ``fn(i)`` for i = 0, 1, ... and return the latency statistics and raw samples (seconds).

    ``i`` lets the caller rotate through different frames. The garbage collector is paused while timing
    so a collection triggered by the harness is not charged to the stage; it runs between stages.
    """
    for i in range(budget.warmup):
        fn(i)
    samples: list[float] = []
    gc.collect()
    gc.disable()
    try:
        deadline = time.perf_counter() + budget.max_seconds
        i = budget.warmup
        while len(samples) < budget.iters:
            t0 = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - t0)
            i += 1
            if len(samples) >= budget.min_iters and time.perf_counter() > deadline:
                break
    finally:
        gc.enable()
    return LatencyStats.from_seconds(samples), samples
