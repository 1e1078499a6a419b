"""Benchmark input: full-size synthetic PILATUS3 2M frames (1679 x 1475 int32) from the simulated beamline."""

from __future__ import annotations

import numpy as np

BENCH_SCENARIO = "film_formation"


def synthetic_frames(n: int, seed: int = 0, scenario: str = BENCH_SCENARIO) -> list[np.ndarray]:
    """`n` distinct frames spread over a scan's phases, so every stage sees varied content."""
    from stream.synthetic import generate_scan

    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    return [f.image for f in generate_scan(scenario, n, seed=seed)]
