"""The Ray worker pool against in-process: per-frame overhead, and throughput / latency by number of workers.

    python -m benchmarks.workers --frames 120 --json benchmarks/results/workers.json

1. overhead: one full-size frame at a time (batch 1), the pool's round trip (frame into Ray's object store,
   the actor's compute, the result back) against the same compute in this process: the difference is what
   the pool costs per frame.
2. throughput: ``--frames`` full-size frames submitted as fast as the pipeline takes them (block policy),
   in-process (LivePipeline) and on a local Ray pool of 1..``--max-workers`` workers (PooledPipeline): frames/s
   and the arrival -> point latency. No ZeroMQ, no Tiled: the compute path alone.

On a 2-core machine the workers compete with each other and with the service's own threads (sequencer,
clusterer, Ray's raylet and GCS): more workers than cores cannot go faster; the load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks.frames import synthetic_frames
from benchmarks.machine import machine_info
from benchmarks.stats import LatencyStats
from operators.base import Publisher
from operators.bundle import ModelBundle
from operators.messages import Frame, Point, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.pipeline import LivePipeline

TILED = "http://127.0.0.1:8000"


class _Points(Publisher):
    def __init__(self) -> None:
        self.points: list[Point] = []
        self.stopped = asyncio.Event()

    async def publish(self, message: object) -> None:
        if isinstance(message, Point):
            self.points.append(message)
        elif isinstance(message, RunStopped):
            self.stopped.set()


async def _throughput(pipeline: LivePipeline, images: list[np.ndarray]) -> dict[str, Any]:
    sink = _Points()
    pipeline.add_publisher(sink)
    task = asyncio.create_task(pipeline.run())
    t0 = time.perf_counter()
    await pipeline.submit(RunStarted("bench", run_key="bench", run_name="bench", started_at=time.time()))
    for i, image in enumerate(images):
        await pipeline.submit(Frame("bench", i, image, "tiled://elsewhere", time.time(), time.perf_counter(),
                                    run_key="bench"))
    await pipeline.submit(RunStopped("bench", time.time(), len(images), 0, run_key="bench"))
    await asyncio.wait_for(sink.stopped.wait(), 600)
    elapsed = time.perf_counter() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await pipeline.close()
    assert [p.index for p in sink.points] == list(range(len(images)))
    return {"frames": len(images), "frames_per_s": len(images) / elapsed,
            "latency": LatencyStats.from_seconds([p.timings.total for p in sink.points]).to_dict()}


async def _overhead(pool: Any, compute: Any, images: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """``compute`` has the worker's own settings (1 thread, batch 1): the difference is the pool's cost."""
    local, pooled = [], []
    for k in range(repeats):
        image = images[k % len(images)]
        t0 = time.perf_counter()
        compute.compute([k], [image])
        local.append(time.perf_counter() - t0)
        frame = Frame("bench", k, image, "x", time.time(), time.perf_counter(), run_key="bench")
        t0 = time.perf_counter()
        await pool.compute([frame])
        pooled.append(time.perf_counter() - t0)
    a, b = LatencyStats.from_seconds(local), LatencyStats.from_seconds(pooled)
    return {"in_process": a.to_dict(), "pool": b.to_dict(), "overhead_p50_ms": b.p50_ms - a.p50_ms,
            "frame_mb": images[0].nbytes / 1e6}


async def main(frames: int, max_workers: int, repeats: int) -> dict[str, Any]:
    from operators.workers.compute import FrameCompute
    from operators.workers.pool import PoolSettings, RayWorkerPool, WorkerLost
    from operators.workers.sequencer import PooledPipeline

    images = synthetic_frames(frames, seed=1)
    bundle = ModelBundle.load(device="cpu")
    bundle.warmup()
    out: dict[str, Any] = {"load_before": os.getloadavg(), "machine": machine_info().to_dict(), "cores": os.cpu_count()}

    def pipeline(cls: Any, *args: Any, **kw: Any) -> LivePipeline:
        return cls(bundle, PipelineMetrics(CollectorRegistry()), *args, tiled_base_url=TILED, recluster="off",
                   **kw)

    out["in_process"] = await _throughput(pipeline(LivePipeline), images)
    print("in-process", json.dumps(out["in_process"]), flush=True)
    compute = FrameCompute(None, device="cpu", max_batch=1, threads=1)  # as a worker of 1 CPU computes
    for n in range(1, max_workers + 1):
        pool = RayWorkerPool(PoolSettings(n, device="cpu"))
        await pool.start()
        try:
            if n == 1:
                out["overhead"] = await _overhead(pool, compute, images, repeats)
                print("overhead", json.dumps(out["overhead"]), flush=True)
                small = [img[:256, :256].copy() for img in images[:repeats]]  # transport cost ~ frame size?
                out["overhead_small_frames"] = await _overhead(pool, compute, small, repeats)
                print("overhead (256 x 256)", json.dumps(out["overhead_small_frames"]), flush=True)
            out[f"pool_{n}"] = await _throughput(pipeline(PooledPipeline, pool, lost=WorkerLost), images)
            print(f"pool {n}", json.dumps(out[f"pool_{n}"]), flush=True)
        finally:
            await pool.close()
    out["load_after"] = os.getloadavg()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(main(args.frames, args.max_workers, args.repeats))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
