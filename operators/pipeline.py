"""The live per-frame pipeline: preprocess -> encode -> project -> cluster -> publish.

Frames arrive already decoded and validated (stream.ingest) in a bounded inbox. When frames queue up,
the pipeline takes what is waiting, up to ``max_batch``, and runs the compute stages on the batch in
one worker thread (onnxruntime and cv2 release the GIL), so the event loop keeps serving websockets.
Each stage is isolated per frame: a batch that fails is retried one frame at a time, and only the
frame that fails is rejected (counted under the stage's reason). Results fan out to every publisher
concurrently (`QueuedOperator.publish`).

Run control messages (`RunStarted`, `RunStopped`) are never dropped by the overload policy and are
handled in arrival order between batches: a start gives the run a fresh online clusterer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from operators.base import BatchStage, QueuedOperator, QueuePolicy, describe, run_isolated
from operators.messages import ClusterNew, Frame, Point, RunStarted, RunStopped, StageTimings
from operators.metrics import PipelineMetrics
from operators.persist.uris import frame_uri

log = logging.getLogger(__name__)

InMessage = RunStarted | Frame | RunStopped


class NonFiniteOutput(ValueError):
    """A model stage produced NaN/inf for a frame."""


@dataclass(slots=True)
class Work:
    """One frame on its way through the compute stages; each stage fills its own field."""

    frame: Frame
    slot: int  # row of the batch buffer this frame's tensor lives in
    tensor: np.ndarray | None = None  # (1, S, S) float32, a view on that row
    latent: np.ndarray | None = None  # (latent_dim,) float32
    xy: np.ndarray | None = None  # (2,) float32
    assignment: Any = None  # the clusterer's Assignment(cluster, novelty, is_new)
    timings: StageTimings = field(default_factory=StageTimings)


class PreprocessStage(BatchStage[Work]):
    """Preprocesses each frame straight into its row of one reused (max_batch, 1, S, S) buffer."""

    name, reject_reason = "preprocess", "preprocess_error"

    def __init__(self, bundle: Any, batch_buffer: np.ndarray) -> None:
        self.bundle = bundle
        self.buffer = batch_buffer

    def process_many(self, items: Sequence[Work]) -> None:
        for work in items:
            work.tensor = self.bundle.preprocessor(work.frame.image, out=self.buffer[work.slot])


class EncodeStage(BatchStage[Work]):
    name, reject_reason = "encode", "encode_error"

    def __init__(self, bundle: Any, batch_buffer: np.ndarray) -> None:
        self.bundle = bundle
        self.buffer = batch_buffer

    def process_many(self, items: Sequence[Work]) -> None:
        n = len(items)
        if all(work.slot == i for i, work in enumerate(items)):
            batch = self.buffer[:n]  # the usual case: the batch is already contiguous, no copy
        else:  # some frames were rejected earlier in this batch
            batch = np.stack([w.tensor for w in items])
        latents = np.asarray(self.bundle.encoder.encode(batch), dtype=np.float32)
        if latents.shape != (len(items), self.bundle.latent_dim):
            raise ValueError(f"encoder returned {latents.shape} for a batch of {len(items)}")
        if not np.isfinite(latents).all():
            raise NonFiniteOutput("latent contains NaN or inf")
        for work, latent in zip(items, latents, strict=True):
            work.latent = latent


class ProjectStage(BatchStage[Work]):
    name, reject_reason = "project", "project_error"

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle

    def process_many(self, items: Sequence[Work]) -> None:
        xy = np.asarray(self.bundle.projector.project(np.stack([w.latent for w in items])), dtype=np.float32)
        if xy.shape != (len(items), 2):
            raise ValueError(f"projector returned {xy.shape} for a batch of {len(items)}")
        if not np.isfinite(xy).all():
            raise NonFiniteOutput("2-D point contains NaN or inf")
        for work, point in zip(items, xy, strict=True):
            work.xy = point


class ClusterStage(BatchStage[Work]):
    """Online clustering in the latent; one clusterer per run. Learning is sequential by nature."""

    name, reject_reason = "cluster", "cluster_error"
    batchable = False  # a retry would learn the same frames twice

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle
        self.clusterer: Any = None

    def reset(self) -> None:
        self.clusterer = self.bundle.new_clusterer()

    def process_many(self, items: Sequence[Work]) -> None:
        if self.clusterer is None:
            self.reset()
        for work in items:
            work.assignment = self.clusterer.learn_predict_one(work.latent)


@dataclass(slots=True)
class _Run:
    run_id: str
    run_key: str
    processed: int = 0


@dataclass(slots=True)
class _BatchResult:
    points: list[Point]
    new_clusters: dict[int, ClusterNew]  # keyed by the founding frame's index


class LivePipeline(QueuedOperator[InMessage]):
    """The composed per-frame pipeline, as one arroyopy operator.

    ``tiled_base_url`` builds the URI of frames that came without one (this service stores them).
    """

    def __init__(
        self,
        bundle: Any,
        metrics: PipelineMetrics,
        *,
        tiled_base_url: str,
        max_batch: int = 4,
        queue_size: int = 32,
        policy: QueuePolicy = QueuePolicy.BLOCK,
        publish_timeout: float = 1.0,
    ) -> None:
        super().__init__(metrics, queue_size=queue_size, policy=policy, publish_timeout=publish_timeout)
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.bundle = bundle
        self.tiled_base_url = tiled_base_url
        self.max_batch = max_batch
        self.cluster_stage = ClusterStage(bundle)
        size = bundle.preprocessor.spec.size
        batch_buffer = np.zeros((max_batch, 1, size, size), np.float32)
        self.stages: tuple[BatchStage[Work], ...] = (
            PreprocessStage(bundle, batch_buffer),
            EncodeStage(bundle, batch_buffer),
            ProjectStage(bundle),
            self.cluster_stage,
        )
        self._run: _Run | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # One compute thread: stages and the clusterer's state are touched by it alone.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pipeline-compute")

    @property
    def run_id(self) -> str | None:
        return self._run.run_id if self._run else None

    def droppable(self, message: InMessage) -> bool:
        return isinstance(message, Frame)

    async def run(self) -> None:
        """Consume the inbox, micro-batching frames that are already waiting. Runs until cancelled."""
        try:
            while True:
                first = await self.inbox.get()
                self._idle.clear()
                held: InMessage | None = None
                try:
                    if isinstance(first, Frame):
                        batch = [first]
                        while len(batch) < self.max_batch and not self.inbox.empty():
                            nxt = self.inbox.get_nowait()
                            if not isinstance(nxt, Frame):
                                held = nxt  # handled after this batch, preserving order
                                break
                            batch.append(nxt)
                        self.metrics.queue_depth.set(self.inbox.qsize())
                        await self._process_frames(batch)
                        if held is not None:
                            message, held = held, None
                            await self._process_control(message)
                    else:
                        await self._process_control(first)
                except asyncio.CancelledError:
                    if held is not None and _was_received(held):
                        self.metrics.dropped.labels("shutdown").inc()
                    raise
                finally:
                    if self.inbox.empty():
                        self._idle.set()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def process(self, message: InMessage) -> None:
        """arroyopy's one-message verb: the same path as `run`, for a batch of one."""
        if isinstance(message, Frame):
            await self._process_frames([message])
        else:
            await self._process_control(message)

    async def wait_idle(self, timeout: float) -> bool:
        """True when the inbox is empty and nothing is being computed, within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                # The event alone can lag a put that has not woken the consumer yet: check the inbox too.
                while not (self._idle.is_set() and self.inbox.empty()):
                    await asyncio.sleep(0.01)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Account for what is still queued (dropped: shutdown) and close the open run, if any."""
        for message in self.inbox.drain_nowait():
            if _was_received(message):
                self.metrics.dropped.labels("shutdown").inc()
        if self._run is not None:
            run, self._run = self._run, None
            await self.publish(
                RunStopped(run.run_id, time.time(), None, run.processed, reason="shutdown", run_key=run.run_key)
            )
            log.info("run %s closed at shutdown after %d point(s)", run.run_id, run.processed)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _process_control(self, message: InMessage) -> None:
        try:
            await self._apply_control(message)
        except Exception:
            log.exception("failed to handle %s", describe(message))
            if _was_received(message):
                self.metrics.rejected.labels("processing_error").inc()

    async def _apply_control(self, message: InMessage) -> None:
        if isinstance(message, RunStarted):
            # A fresh clusterer per run, built in the compute thread that owns the clusterer.
            await asyncio.get_running_loop().run_in_executor(self._executor, self.cluster_stage.reset)
            self._run = _Run(message.run_id, message.run_key)
            self.metrics.processed.labels("start").inc()
            await self.publish(message)
        elif isinstance(message, RunStopped):
            processed = self._run.processed if self._run and self._run.run_key == message.run_key else 0
            if self._run is not None and self._run.run_key == message.run_key:
                self._run = None
            if message.reason == "stop":
                self.metrics.processed.labels("stop").inc()
            await self.publish(replace(message, processed=processed))
        else:
            raise TypeError(f"not a pipeline message: {describe(message)}")

    async def _process_frames(self, frames: list[Frame]) -> None:
        self.metrics.batch_size.observe(len(frames))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._compute, frames)
        except asyncio.CancelledError:
            self.metrics.dropped.labels("shutdown").inc(len(frames))
            raise
        except Exception:  # a bug outside the isolated stages: lose this batch, keep the pipeline
            self.metrics.rejected.labels("processing_error").inc(len(frames))
            log.exception("run %s: batch of %d frame(s) failed", frames[0].run_id, len(frames))
            return
        for point in result.points:
            founded = result.new_clusters.get(point.index)
            if founded is not None:
                await self.publish(founded)
            t0 = time.perf_counter()
            await self.publish(point)
            self.metrics.observe("publish", time.perf_counter() - t0)

    def _compute(self, frames: list[Frame]) -> _BatchResult:
        """Runs in the compute thread: every stage on the batch, each frame isolated."""
        start = time.perf_counter()
        items = [Work(frame, slot) for slot, frame in enumerate(frames)]
        for work in items:
            work.timings.queue = start - work.frame.received_perf
            self.metrics.observe("queue", work.timings.queue)
        for stage in self.stages:
            t0 = time.perf_counter()
            items = run_isolated(stage, items, self._reject)
            elapsed = time.perf_counter() - t0
            for work in items:
                setattr(work.timings, stage.name, elapsed)
                self.metrics.observe(stage.name, elapsed)
        return self._finish(items)

    def _finish(self, items: list[Work]) -> _BatchResult:
        points: list[Point] = []
        new_clusters: dict[int, ClusterNew] = {}
        run = self._run
        for work in items:
            frame, assignment = work.frame, work.assignment
            now_perf, now = time.perf_counter(), time.time()
            work.timings.total = now_perf - frame.received_perf
            stored = not frame.tiled_url
            points.append(
                Point(
                    run_id=frame.run_id,
                    run_key=frame.run_key,
                    index=frame.index,
                    x=float(work.xy[0]),
                    y=float(work.xy[1]),
                    cluster=int(assignment.cluster),
                    novelty=float(assignment.novelty),
                    tiled_url=frame.tiled_url or frame_uri(self.tiled_base_url, frame.run_key, frame.index),
                    timestamp=now,
                    timings=work.timings,
                    latent=work.latent,
                    stored_by_service=stored,
                    image=frame.image if stored else None,
                )
            )
            if assignment.is_new:
                new_clusters[frame.index] = ClusterNew(frame.run_id, int(assignment.cluster), frame.index, now)
                log.info("run %s: new cluster %d founded by frame %d", frame.run_id, assignment.cluster, frame.index)
            self.metrics.observe("total", work.timings.total)
            self.metrics.processed.labels("event").inc()
            if run is not None and run.run_key == frame.run_key:
                run.processed += 1
        return _BatchResult(points, new_clusters)

    def _reject(self, work: Work, stage: BatchStage[Work], exc: BaseException) -> None:
        reason = "non_finite_output" if isinstance(exc, NonFiniteOutput) else stage.reject_reason
        self.metrics.rejected.labels(reason).inc()
        self._warn.warning(
            reason, "run %s frame %d rejected at %s (%s): %s", work.frame.run_id, work.frame.index, stage.name,
            reason, exc,
        )  # fmt: skip


def _was_received(message: InMessage) -> bool:
    """Whether a message stands for a received ZeroMQ message (superseded/shutdown stops are synthetic)."""
    return not isinstance(message, RunStopped) or message.reason == "stop"
