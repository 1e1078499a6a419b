"""Measure synthetic frame throughput: `python -m stream.synthetic [--frames N] [--scenario NAME]`.

Prints one JSON line per scenario with frames/s by wall clock and by this process's CPU time
(the latter is what one core can do, independent of other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import time

from stream.synthetic import SCENARIOS, generate_scan


def measure(scenario: str, n_frames: int, seed: int = 0) -> dict[str, float | str | int]:
    """Frames/s of generate_scan for full-size frames, after a warm-up frame (JIT, canvas)."""
    next(generate_scan(scenario, 1, seed=seed))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in generate_scan(scenario, n_frames, seed=seed):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "scenario": scenario,
        "frames": n_frames,
        "fps_wall": round(n_frames / wall, 1),
        "fps_cpu": round(n_frames / cpu, 1),
        "ms_per_frame_cpu": round(1e3 * cpu / n_frames, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    for name in args.scenario or list(SCENARIOS):
        print(json.dumps(measure(name, args.frames)))


if __name__ == "__main__":
    main()
