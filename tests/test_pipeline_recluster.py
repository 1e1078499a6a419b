"""The pipeline's re-clustering: corrections published after the points they correct, new ids announced
first, ids never renumbered; the worker process never delays a point."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from ramp_support import ScriptedBundle, ramp_run
from test_pipeline import Recorder, _until

from operators.bundle import ModelBundle
from operators.messages import ClusterNew, ClusterUpdate, Frame, Point, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.pipeline import LivePipeline
from stream.synthetic import generate_scan

TILED = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [f.image for f in generate_scan("film_formation", 4, seed=3)]


def _frame(run: str, index: int, image: np.ndarray) -> Frame:
    return Frame(run, index, image, "", time.time(), time.perf_counter(), run_key=run + "-key")


def check_protocol(messages: list[object], reference: int) -> dict[int, int]:
    """Every correction names points already sent and ids already announced; returns index -> final id."""
    announced = set(range(reference))
    ids: dict[int, int] = {}
    for m in messages:
        if isinstance(m, ClusterNew):
            assert m.cluster not in announced
            announced.add(m.cluster)
        elif isinstance(m, Point):
            assert m.cluster == -1 or m.cluster in announced
            ids[m.index] = m.cluster
        elif isinstance(m, ClusterUpdate):
            assert len(m.indices) == len(m.clusters) > 0
            for i, c in zip(m.indices, m.clusters, strict=True):
                assert i in ids and c in announced and c != ids[i]
                ids[i] = c
    return ids


async def _drive(pipeline: LivePipeline, images: list[np.ndarray], n: int, *, until_update: bool) -> Recorder:
    recorder = Recorder()
    pipeline.add_publisher(recorder)
    task = asyncio.create_task(pipeline.run())
    try:
        await pipeline.submit(RunStarted("run-r", "ramp", time.time(), run_key="run-r-key"))
        for i in range(n):
            await pipeline.submit(_frame("run-r", i, images[i % len(images)]))
        await _until(lambda: len(recorder.points()) == n)
        if until_update:
            await _until(lambda: any(isinstance(m, ClusterUpdate) for m in recorder.messages), 60)
        await pipeline.submit(RunStopped("run-r", time.time(), n, 0, run_key="run-r-key"))
        await _until(lambda: isinstance(recorder.messages[-1], RunStopped))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pipeline.close()
    return recorder


async def test_sync_re_clustering_splits_the_ramp_and_corrects_sent_points(default_bundle: ModelBundle, images) -> None:
    state, script, _ = ramp_run()
    bundle = ScriptedBundle(default_bundle, state, script)
    pipeline = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED, recluster="sync")
    recorder = await _drive(pipeline, images, len(script), until_update=False)
    ids = check_protocol(recorder.messages, len(state.centers))
    updates = [m for m in recorder.messages if isinstance(m, ClusterUpdate)]
    assert updates and all(u.run_id == "run-r" and u.run_key == "run-r-key" for u in updates)
    # what a client ends with is what the clusterer ends with
    assert [ids[i] for i in range(len(script))] == bundle.clusterers[-1].labels().tolist()
    assert ids[0] != ids[len(script) - 1]  # the two phases carry two ids


async def test_a_worker_process_re_clusters_and_its_update_arrives_without_further_frames(
    default_bundle: ModelBundle, images
) -> None:
    state, script, _ = ramp_run()
    bundle = ScriptedBundle(default_bundle, state, script)
    pipeline = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED, recluster="process")
    recorder = await _drive(pipeline, images, len(script), until_update=True)
    ids = check_protocol(recorder.messages, len(state.centers))
    assert ids[0] != ids[len(script) - 1]
    assert isinstance(recorder.messages[-1], RunStopped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_re_clustering_worker_starts_deaf_to_the_terminals_ctrl_c(default_bundle: ModelBundle) -> None:
    """A Ctrl-C reaches the service's whole process group: the service stops its worker, the signal must not
    kill it mid-import with a traceback (tests/test_serve_e2e.py sends one)."""
    from concurrent.futures import ThreadPoolExecutor

    from operators.cluster_stage import ClusterStage

    stage = ClusterStage(default_bundle, "process")
    try:
        with ThreadPoolExecutor(1) as compute_thread:  # where the pipeline resets it
            compute_thread.submit(stage.reset).result()
        assert stage._pool is not None
        (pid,) = stage._pool._processes
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        blocked = next(line for line in status if line.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) & (1 << (signal.SIGINT - 1))
    finally:
        stage.close()
