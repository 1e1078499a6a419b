"""The per-frame pipeline on the shipped default bundle: points out, isolation, batching, fan-out."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from operators.base import Publisher
from operators.bundle import ModelBundle
from operators.messages import ClusterNew, Frame, Point, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.pipeline import LivePipeline
from operators.tiled_layout import frame_uri
from stream.synthetic import generate_scan

TILED = "http://127.0.0.1:8000"


class Recorder(Publisher):
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[object] = []

    async def publish(self, message: object) -> None:
        self.messages.append(message)

    def points(self) -> list[Point]:
        return [m for m in self.messages if isinstance(m, Point)]


class Failing(Publisher):
    async def publish(self, message: object) -> None:
        raise RuntimeError("this publisher is broken")


class Hanging(Publisher):
    async def publish(self, message: object) -> None:
        await asyncio.sleep(3600)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    # The bundle the service would serve: LATENT_STREAM_BUNDLE when set, else the shipped default.
    loaded = ModelBundle.load(os.environ.get("LATENT_STREAM_BUNDLE") or None)
    loaded.warmup()
    return loaded


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [f.image for f in generate_scan("film_formation", 6, seed=3)]


def _frame(run_id: str, index: int, image: np.ndarray, tiled_url: str = "") -> Frame:
    return Frame(run_id, index, image, tiled_url, time.time(), time.perf_counter(), run_key=run_id)


async def _until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _run_pipeline(pipeline: LivePipeline, messages: list[object], *, expect_points: int) -> Recorder:
    recorder = Recorder()
    pipeline.add_publisher(recorder)
    for message in messages:  # all queued before the pipeline starts: they must be batched
        await pipeline.submit(message)  # type: ignore[arg-type]
    task = asyncio.create_task(pipeline.run())
    try:
        await _until(lambda: any(isinstance(m, RunStopped) for m in recorder.messages))
        assert await pipeline.wait_idle(10)  # every publisher has had its turn (or timed out)
        assert len(recorder.points()) == expect_points
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return recorder


async def test_every_frame_becomes_a_finite_point_with_cluster_timings_and_frame_uri(
    bundle: ModelBundle, images: list[np.ndarray]
) -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    handed: list[object] = []
    pipeline = LivePipeline(bundle, metrics, tiled_base_url=TILED, max_batch=4, queue_size=16,
                            frame_sink=handed.append)  # fmt: skip
    frames = [_frame("run-a", i, img) for i, img in enumerate(images)]
    messages = [RunStarted("run-a", "scan", time.time(), run_key="run-a"), *frames, RunStopped("run-a", time.time(), 6, 0, run_key="run-a")]
    recorder = await _run_pipeline(pipeline, messages, expect_points=6)
    # each frame to store leaves by the frame sink, before its point (the writer gives it the point's row)
    assert handed == frames

    assert isinstance(recorder.messages[0], RunStarted)
    points = recorder.points()
    assert [p.index for p in points] == list(range(6))
    for p in points:
        assert math.isfinite(p.x) and math.isfinite(p.y) and isinstance(p.cluster, int)
        assert p.tiled_url == frame_uri(TILED, "run-a", p.index)
        assert p.stored_by_service
        assert p.latent.shape == (bundle.latent_dim,)
        assert p.timings.total >= p.timings.encode > 0 and p.timings.project > 0
    stop = recorder.messages[-1]
    assert isinstance(stop, RunStopped) and stop.processed == 6
    # Queued frames are computed in micro-batches of up to max_batch.
    batches = metrics.registry.get_sample_value("latent_stream_batch_size_count")
    assert metrics.registry.get_sample_value("latent_stream_batch_size_sum") == 6
    assert batches is not None and 2 <= batches < 6
    assert metrics.accounted() == (0, 8)  # nothing came off a socket here; 6 events + start + stop processed


async def test_cluster_new_is_published_before_the_first_point_of_that_cluster(
    bundle: ModelBundle, images: list[np.ndarray]
) -> None:
    pipeline = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED)
    frames = [_frame("run-c", i, img) for i, img in enumerate(images)]
    messages = [RunStarted("run-c", "scan", time.time(), run_key="run-c"), *frames, RunStopped("run-c", time.time(), 6, 0, run_key="run-c")]
    recorder = await _run_pipeline(pipeline, messages, expect_points=6)
    announced: set[int] = set()
    for message in recorder.messages:
        if isinstance(message, ClusterNew):
            assert message.cluster not in announced  # an id is founded once, never renumbered
            announced.add(message.cluster)
        elif isinstance(message, Point) and message.cluster not in announced:
            # Not announced: it must be one of the bundle's fitted clusters, not a new one.
            assert -1 <= message.cluster < bundle.clustering_state.centers.shape[0]


async def test_a_frame_that_breaks_a_stage_is_rejected_alone(bundle: ModelBundle, images: list[np.ndarray]) -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    pipeline = LivePipeline(bundle, metrics, tiled_base_url=TILED, max_batch=8)
    broken = np.zeros(10, dtype=np.int32)  # 1-D: the preprocessor cannot make a square image of it
    frames = [_frame("r", 0, images[0]), _frame("r", 1, broken), _frame("r", 2, images[1])]
    messages = [RunStarted("r", "scan", time.time(), run_key="r"), *frames, RunStopped("r", time.time(), 3, 0, run_key="r")]
    recorder = await _run_pipeline(pipeline, messages, expect_points=2)
    assert [p.index for p in recorder.points()] == [0, 2]
    assert metrics.snapshot()["rejected"] == {"preprocess_error": 1}
    # The survivors' points are exactly what each frame gives on its own (no row of the batch mixed up).
    for point, image in zip(recorder.points(), images[:2], strict=True):
        alone = bundle.projector.project(bundle.encoder.encode(bundle.preprocessor(image)[None]))[0]
        np.testing.assert_allclose([point.x, point.y], alone, rtol=1e-4, atol=1e-4)


async def test_frames_that_arrive_with_a_tiled_url_keep_it_and_are_not_stored_again(
    bundle: ModelBundle, images: list[np.ndarray]
) -> None:
    handed: list[Frame] = []
    pipeline = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED,
                            frame_sink=handed.append)  # fmt: skip
    url = "https://facility/api/v1/array/full/scan9/primary/data?slice=41"
    messages = [RunStarted("r", "scan", time.time(), run_key="r"), _frame("r", 41, images[0], url),
                RunStopped("r", time.time(), 1, 0, run_key="r")]
    point = (await _run_pipeline(pipeline, messages, expect_points=1)).points()[0]
    assert point.tiled_url == url and not point.stored_by_service and handed == []


async def test_a_failing_or_hanging_publisher_never_stops_the_others(
    bundle: ModelBundle, images: list[np.ndarray]
) -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    pipeline = LivePipeline(bundle, metrics, tiled_base_url=TILED, publish_timeout=0.2)
    pipeline.add_publisher(Failing())
    pipeline.add_publisher(Hanging())
    frames = [_frame("r", i, img) for i, img in enumerate(images[:3])]
    messages = [RunStarted("r", "scan", time.time(), run_key="r"), *frames, RunStopped("r", time.time(), 3, 0, run_key="r")]
    recorder = await _run_pipeline(pipeline, messages, expect_points=3)
    assert len(recorder.messages) == 5
    errors = metrics.snapshot()["publisher_errors"]
    assert errors == {"Failing": 5, "Hanging": 5}


async def test_publishers_are_per_instance_unlike_arroyopy_0_2_2(bundle: ModelBundle) -> None:
    a = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED)
    b = LivePipeline(bundle, PipelineMetrics(CollectorRegistry()), tiled_base_url=TILED)
    a.add_publisher(Recorder())
    assert b.publishers == []


async def test_close_counts_queued_frames_as_dropped_and_closes_the_open_run(
    bundle: ModelBundle, images: list[np.ndarray]
) -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    pipeline = LivePipeline(bundle, metrics, tiled_base_url=TILED)
    recorder = Recorder()
    pipeline.add_publisher(recorder)
    await pipeline.process(RunStarted("r", "scan", time.time(), run_key="r"))
    for i, img in enumerate(images[:2]):
        await pipeline.submit(_frame("r", i, img))
    await pipeline.close()
    assert metrics.snapshot()["dropped"] == {"shutdown": 2}
    stop = recorder.messages[-1]
    assert isinstance(stop, RunStopped) and stop.reason == "shutdown" and stop.processed == 0
