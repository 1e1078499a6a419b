"""Does re-clustering the run ever delay a point? The live pipeline on the shipped bundle, frames at a fixed
rate, with the run's re-clustering in its worker process and without it.

    python -m benchmarks.recluster [--bundle PATH] [--frames 600] [--hz 10] [--json out.json]

Per mode: the per-frame cluster stage (the fast assignment, in the compute thread) and the arrival -> point
ready total, p50/p99/max over the run; the re-clusterings applied and the corrections published. The run cycles
through the four synthetic scenarios' frames so that it holds several phases. Also the cost of one HDBSCAN
re-clustering (`density_labels`) of a run of 120/500/2000 frames, in this process, and, for the record, how long
HDBSCAN in a *thread* stalls the others (why it runs in a process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from operators.bundle import ModelBundle
from operators.clustering import density_labels
from operators.messages import ClusterNew, ClusterUpdate, Frame, Point, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.pipeline import LivePipeline


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[object] = []

    async def publish(self, message: object) -> None:
        self.messages.append(message)


def _images(frames: int) -> list[np.ndarray]:
    from operators.model.evaluate import SCENARIOS
    from stream.synthetic import generate_scan

    per = max(1, frames // len(SCENARIOS))
    out = []
    for scenario in SCENARIOS:
        out += [f.image for f in generate_scan(scenario, per, seed=7003)]
    return out[:frames]


async def run_mode(bundle: ModelBundle, images: list[np.ndarray], hz: float, recluster: str) -> dict[str, Any]:
    pipeline = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url="http://127.0.0.1:1",
                            recluster=recluster)
    rec = _Recorder()
    pipeline.add_publisher(rec)  # type: ignore[arg-type]
    task = asyncio.create_task(pipeline.run())
    try:
        await pipeline.submit(RunStarted("bench", "bench", time.time(), run_key="bench"))
        t0 = time.perf_counter()
        for i, image in enumerate(images):
            delay = t0 + i / hz - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await pipeline.submit(Frame("bench", i, image, "", time.time(), time.perf_counter(), run_key="bench"))
        while sum(isinstance(m, Point) for m in rec.messages) < len(images):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a last re-clustering may answer
        await pipeline.submit(RunStopped("bench", time.time(), len(images), 0, run_key="bench"))
        await pipeline.wait_idle(10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pipeline.close()
    points = [m for m in rec.messages if isinstance(m, Point)]
    updates = [m for m in rec.messages if isinstance(m, ClusterUpdate)]
    return {
        "recluster": recluster,
        "frames": len(points),
        "cluster_stage": _pct([p.timings.cluster for p in points]),
        "queue": _pct([p.timings.queue for p in points]),
        "encode": _pct([p.timings.encode for p in points]),
        "total": _pct([p.timings.total for p in points]),
        "cluster_new": sum(isinstance(m, ClusterNew) for m in rec.messages),
        "cluster_updates": len(updates),
        "points_corrected": sum(len(u.indices) for u in updates),
    }


def density_cost(bundle: ModelBundle) -> dict[str, float]:
    """One re-clustering with the bundle's settings (still frames only, where it says so) of a two-phase run."""
    rng = np.random.default_rng(0)
    s = bundle.clustering_settings
    d = bundle.clustering_state.components.shape[0]
    density_labels(rng.standard_normal((20, d)), 5, 3, 0.0)  # imports
    out = {}
    for n in (120, 500, 2000):
        z = rng.standard_normal((n, d)).astype(np.float32) * 0.1
        z[n // 2 :] += 1.0
        t0 = time.perf_counter()
        density_labels(z, s.run_min_cluster_size, s.run_min_samples, 0.05, s.run_selection, s.still_window,
                       s.still_factor)
        out[f"density_labels_{n}_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def thread_stall(bundle: ModelBundle) -> dict[str, float]:
    """How late a 5 ms tick (sleep, then a tiny numpy op) finishes while HDBSCAN on 2000 frames runs in another
    thread of this process: the GIL it holds is what a point would wait for."""
    z = np.random.default_rng(1).standard_normal((2000, bundle.clustering_state.components.shape[0]))
    z[1000:] += 3.0

    def late_ticks(seconds: float) -> list[float]:
        lat, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            time.sleep(0.005)
            np.sqrt(((z[:10] - z[0]) ** 2).sum(1)).argmin()
            lat.append(time.perf_counter() - t0 - 0.005)
        return lat

    alone = late_ticks(1.0)
    worker = threading.Thread(target=lambda: [density_labels(z, 10, 3, 0.0) for _ in range(3)])
    worker.start()
    busy = late_ticks(0.2)
    while worker.is_alive():
        busy += late_ticks(0.1)
    worker.join()
    return {**{"tick_late_alone_" + k: v for k, v in _pct(alone).items()},
            **{"tick_late_hdbscan_in_thread_" + k: v for k, v in _pct(busy).items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="default: the shipped one")
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--json", default=None)
    p.add_argument("--modes", nargs="+", default=["off", "process"], choices=["off", "process", "sync"])
    a = p.parse_args(argv)
    bundle = ModelBundle.load(a.bundle)
    bundle.warmup()
    if not bundle.clustering_settings.recluster_every:  # off by default: measure it as a bundle would turn it on
        bundle.clustering_settings = replace(bundle.clustering_settings, recluster_every=3)
    images = _images(a.frames)
    result: dict[str, Any] = {"bundle": bundle.autoencoder_model, "frames": len(images), "hz": a.hz,
                              "clustering_input": "cluster features" if bundle.feature_encoder else "latent",
                              "modes": []}
    for mode in a.modes:
        result["modes"].append(asyncio.run(run_mode(bundle, images, a.hz, mode)))
    result.update(density_cost(bundle))
    result.update(thread_stall(bundle))
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
