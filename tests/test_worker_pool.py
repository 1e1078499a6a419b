"""The Ray worker pool on a real two-node Ray cluster: the pool's points are the in-process points.

The cluster (tests/ray_support.py) is started once for the module; the pool joins it as ``--ray-address``
does. Each node has one CPU, so the two workers land one per node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from ray_support import RayCluster, start_cluster

from operators.base import Publisher
from operators.bundle import ModelBundle
from operators.messages import ClusterNew, Frame, Point, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.pipeline import LivePipeline
from stream.synthetic import generate_scan

pytestmark = pytest.mark.e2e
TILED = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    live = start_cluster(tmp_path_factory.mktemp("ray"))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({k: live.env[k] for k in saved})  # this process joins the cluster as a driver
    yield live
    import ray

    ray.shutdown()
    live.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Recorder(Publisher):
    def __init__(self) -> None:
        self.messages: list[object] = []

    async def publish(self, message: object) -> None:
        self.messages.append(message)


def _messages(run_id: str, images: list[np.ndarray]) -> list[object]:
    start = RunStarted(run_id, run_key=run_id, run_name=run_id, started_at=time.time())
    frames = [Frame(run_id, i, img, "", time.time(), time.perf_counter(), run_key=run_id)
              for i, img in enumerate(images)]
    return [start, *frames, RunStopped(run_id, time.time(), len(frames), 0, run_key=run_id)]


async def _run(pipeline: LivePipeline, messages: list[object]) -> Recorder:
    recorder = Recorder()
    pipeline.add_publisher(recorder)
    task = asyncio.create_task(pipeline.run())
    try:
        for message in messages:
            await pipeline.submit(message)  # type: ignore[arg-type]
        async with asyncio.timeout(120):
            while not any(isinstance(m, RunStopped) for m in recorder.messages):
                await asyncio.sleep(0.02)
        assert await pipeline.wait_idle(10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pipeline.close()
    return recorder


async def test_the_pool_gives_the_in_process_points_in_frame_order_with_a_worker_on_the_second_node(
    cluster: RayCluster, default_bundle: ModelBundle
) -> None:
    from operators.workers.pool import PoolSettings, RayWorkerPool, WorkerLost
    from operators.workers.sequencer import PooledPipeline

    images = [f.image for f in generate_scan("crystallization", 24, seed=5)]
    in_process = await _run(LivePipeline(default_bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED,
                                         recluster="off"), _messages("same", images))

    pool = RayWorkerPool(PoolSettings(2, ray_address=cluster.address, device="cpu"))
    await pool.start()
    import ray

    second_node = next(n["NodeID"] for n in ray.nodes() if "second_node" in n["Resources"])
    try:
        metrics = PipelineMetrics(CollectorRegistry())
        pooled = await _run(PooledPipeline(default_bundle, metrics, pool, lost=WorkerLost, tiled_base_url=TILED,
                                           recluster="off"), _messages("same", images))
        workers = pool.describe()
    finally:
        await pool.close()

    want = [m for m in in_process.messages if isinstance(m, Point)]
    got = [m for m in pooled.messages if isinstance(m, Point)]
    assert [p.index for p in got] == list(range(len(images)))
    for a, b in zip(want, got, strict=True):
        assert (b.x, b.y) == pytest.approx((a.x, a.y), abs=1e-4)
        np.testing.assert_allclose(b.latent, a.latent, atol=1e-4)
        assert (b.cluster, b.tiled_url, b.stored_by_service) == (a.cluster, a.tiled_url, a.stored_by_service)
    assert [(c.cluster, c.index) for c in pooled.messages if isinstance(c, ClusterNew)] == \
        [(c.cluster, c.index) for c in in_process.messages if isinstance(c, ClusterNew)]
    assert [type(m).__name__ for m in pooled.messages if not isinstance(m, Point | ClusterNew)] == \
        ["RunStarted", "RunStopped"]

    assert len({w["node"] for w in workers}) == 2, workers  # one worker on each Ray node
    assert any(w["node"] == second_node and w["frames"] > 0 for w in workers), workers
    assert all(w["state"] == "alive" and w["frames"] > 0 and w["device"] == "cpu" for w in workers), workers
    assert sum(w["frames"] for w in workers) == len(images)
    received = len(images) + 2
    metrics.received.inc(received)  # the ingest's count, which this test stands in for
    assert metrics.accounted() == (received, received)


async def test_workers_that_stay_dead_leave_their_frames_counted_as_worker_lost_and_the_run_goes_on(
    cluster: RayCluster, default_bundle: ModelBundle
) -> None:
    from operators.workers.pool import PoolSettings, RayWorkerPool, WorkerLost
    from operators.workers.sequencer import PooledPipeline

    images = [f.image for f in generate_scan("crystallization", 6, seed=6)]
    pool = RayWorkerPool(PoolSettings(2, ray_address=cluster.address, device="cpu", max_restarts=0))
    await pool.start()
    try:
        metrics = PipelineMetrics(CollectorRegistry())
        os.kill(pool.describe()[0]["pid"], signal.SIGKILL)  # no restarts allowed: its batches go to the other
        first = await _run(PooledPipeline(default_bundle, metrics, pool, lost=WorkerLost, tiled_base_url=TILED,
                                          recluster="off"), _messages("one-left", images))
        assert [m.index for m in first.messages if isinstance(m, Point)] == list(range(len(images)))
        assert [w["state"] for w in pool.describe()] == ["dead", "alive"]

        os.kill(pool.describe()[1]["pid"], signal.SIGKILL)
        second = await _run(PooledPipeline(default_bundle, metrics, pool, lost=WorkerLost, tiled_base_url=TILED,
                                           recluster="off"), _messages("none-left", images))
        assert not any(isinstance(m, Point) for m in second.messages)
        assert isinstance(second.messages[-1], RunStopped)  # the run still ends, its frames accounted
        assert [w["state"] for w in pool.describe()] == ["dead", "dead"]
    finally:
        await pool.close()
    assert metrics.snapshot()["dropped"] == {"worker_lost": len(images)}
    received = 2 * (len(images) + 2)
    metrics.received.inc(received)
    assert metrics.accounted() == (received, received)
