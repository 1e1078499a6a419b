"""The live per-frame pipeline: preprocess -> encode -> project -> cluster -> publish.

Frames arrive already decoded and validated (stream.ingest) in a bounded inbox. When frames queue up,
the pipeline takes what is waiting, up to ``max_batch``, and runs the compute stages on the batch in
one worker thread (onnxruntime and cv2 release the GIL), so the event loop keeps serving websockets.
Each stage is isolated per frame: a batch that fails is retried one frame at a time, and only the
frame that fails is rejected (counted under the stage's reason). Results fan out to every publisher
concurrently (`QueuedOperator.publish`). A frame this service must store (one without a tiled_url) leaves by
its own port: it is handed to the ``frame_sink`` right before its point is published, never inside the point.

Run control messages (`RunStarted`, `RunStopped`) are never dropped by the overload policy and are
handled in arrival order between batches: a start gives the run a fresh online clusterer.

Re-clustering (operators.clustering): the per-frame assignment stays in the compute thread; the run's
re-clustering (HDBSCAN, which holds the GIL for tens of ms) runs in one worker process (``recluster="process"``),
never delaying a point. Its labels are applied in the compute thread, between batches or as soon as the worker
answers, and what they change is published after the points it corrects: `ClusterNew` for each new id, then one
`ClusterUpdate`. ``recluster="sync"`` re-clusters inline (deterministic, for tests); ``"off"`` not at all. A
re-clustering still running when its run stops is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from operators.base import (
    DEFAULT_QUEUE_BYTES,
    BatchStage,
    QueuedOperator,
    QueuePolicy,
    describe,
    run_isolated,
)
from operators.cluster_stage import ClusterStage
from operators.clustering import Corrections
from operators.messages import (
    ClusterNew,
    ClusterUpdate,
    Frame,
    FrameSink,
    Point,
    RunStarted,
    RunStopped,
)
from operators.metrics import PipelineMetrics
from operators.stages import EncodeStage, NonFiniteOutput, PreprocessStage, ProjectStage, Work
from operators.tiled_layout import frame_uri

log = logging.getLogger(__name__)

InMessage = RunStarted | Frame | RunStopped


@dataclass(slots=True)
class _Run:
    run_id: str
    run_key: str
    processed: int = 0


@dataclass(slots=True)
class _BatchResult:
    points: list[Point]
    frames: list[Frame]  # the frame of each point, in the same order
    new_clusters: dict[int, ClusterNew]  # keyed by the founding frame's index
    corrections: Corrections = field(default_factory=Corrections)  # published after the points


class LivePipeline(QueuedOperator[InMessage]):
    """The composed per-frame pipeline, as one arroyopy operator.

    ``tiled_base_url`` builds the URI of frames that came without one (this service stores them);
    ``frame_sink`` receives those frames, each right before its point is published; ``storage_room``, when
    given, is awaited after each batch: where frames are stored can slow the pipeline (and, through the bounded
    inbox, the sender) rather than drop frames it cannot keep up with.
    """

    def __init__(
        self,
        bundle: Any,
        metrics: PipelineMetrics,
        *,
        tiled_base_url: str,
        max_batch: int = 4,
        queue_size: int = 32,
        queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
        policy: QueuePolicy = QueuePolicy.BLOCK,
        publish_timeout: float = 1.0,
        recluster: str = "process",
        frame_sink: FrameSink | None = None,
        storage_room: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(metrics, queue_size=queue_size, queue_bytes=queue_bytes, policy=policy,
                         publish_timeout=publish_timeout)  # fmt: skip
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.bundle = bundle
        self.tiled_base_url = tiled_base_url
        self.frame_sink = frame_sink
        self.storage_room = storage_room
        self.max_batch = max_batch
        self.cluster_stage = ClusterStage(bundle, recluster)
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
        # a batch's points and a late re-clustering's corrections are published one after the other, never mixed
        self._publishing = asyncio.Lock()
        self._late: asyncio.Task[None] | None = None

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
            self._shutdown_compute()

    def _shutdown_compute(self) -> None:
        if self._late is not None:
            self._late.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.cluster_stage.close()

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
        self._shutdown_compute()

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
            if self._run is not None and self._run.run_key == message.run_key:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.cluster_stage.drop_job)
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
        async with self._publishing:
            try:
                result = await loop.run_in_executor(self._executor, self._compute, frames)
            except asyncio.CancelledError:
                self.metrics.dropped.labels("shutdown").inc(len(frames))
                raise
            except Exception:  # a bug outside the isolated stages: lose this batch, keep the pipeline
                self.metrics.rejected.labels("processing_error").inc(len(frames))
                log.exception("run %s: batch of %d frame(s) failed", frames[0].run_id, len(frames))
                return
            for point, frame in zip(result.points, result.frames, strict=True):
                founded = result.new_clusters.get(point.index)
                if founded is not None:
                    await self.publish(founded)
                t0 = time.perf_counter()
                if point.stored_by_service and self.frame_sink is not None:
                    self._hand_frame(self.frame_sink, frame)
                await self.publish(point)
                self.metrics.observe("publish", time.perf_counter() - t0)
            await self._publish_corrections(result.corrections)
        self._watch_recluster()
        if self.storage_room is not None and any(p.stored_by_service for p in result.points):
            t0 = time.perf_counter()
            await self.storage_room()
            self.metrics.observe("storage_wait", time.perf_counter() - t0)

    def _hand_frame(self, sink: FrameSink, frame: Frame) -> None:
        try:
            sink(frame)
        except Exception:  # like a failing publisher: counted, and the point still goes out
            self.metrics.publisher_errors.labels("frame_sink").inc()
            log.exception("run %s frame %d: the frame sink failed", frame.run_id, frame.index)

    async def _publish_corrections(self, corr: Corrections) -> None:
        run = self._run
        if not corr or run is None:
            return
        now = time.time()
        for cluster, index in corr.new_clusters:
            await self.publish(ClusterNew(run.run_id, int(cluster), int(index), now))
            log.info("run %s: new cluster %d split off by re-clustering (from frame %d)", run.run_id, cluster, index)
        if corr.indices:
            await self.publish(ClusterUpdate(run.run_id, [int(i) for i in corr.indices],
                                             [int(c) for c in corr.clusters], now, run_key=run.run_key))

    def _watch_recluster(self) -> None:
        """When a re-clustering is running, apply it as soon as it answers; when one is due but waits for the
        worker's duty cycle, start it then: even if no frame comes meanwhile."""
        if self._late is not None and not self._late.done():
            return
        fut, wait = self.cluster_stage.job_running, self.cluster_stage.retry_in
        if fut is not None or wait is not None:
            self._late = asyncio.get_running_loop().create_task(self._apply_late(fut, wait or 0.0))

    async def _apply_late(self, fut: Future[Any] | None, wait: float) -> None:
        if fut is not None:
            with contextlib.suppress(Exception):  # a failed job is reported by ClusterStage.step
                await asyncio.wrap_future(fut)
        else:
            await asyncio.sleep(wait)
        loop = asyncio.get_running_loop()
        async with self._publishing:
            try:
                corr = await loop.run_in_executor(self._executor, self.cluster_stage.step)
            except RuntimeError:  # the compute thread is shut down
                return
            await self._publish_corrections(corr)
        self._late = None
        self._watch_recluster()

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
        result = self._finish(items)
        try:
            result.corrections = self.cluster_stage.step()  # after the points' timings: never delays them
        except Exception:
            log.exception("applying a re-clustering failed")
        return result

    def _finish(self, items: list[Work]) -> _BatchResult:
        points: list[Point] = []
        frames: list[Frame] = []
        new_clusters: dict[int, ClusterNew] = {}
        run = self._run
        for work in items:
            frame, assignment = work.frame, work.assignment
            now_perf, now = time.perf_counter(), time.time()
            work.timings.total = now_perf - frame.received_perf
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
                    stored_by_service=not frame.tiled_url,
                )
            )
            frames.append(frame)
            if assignment.is_new:
                new_clusters[frame.index] = ClusterNew(frame.run_id, int(assignment.cluster), frame.index, now)
                log.info("run %s: new cluster %d founded by frame %d", frame.run_id, assignment.cluster, frame.index)
            self.metrics.observe("total", work.timings.total)
            self.metrics.processed.labels("event").inc()
            if run is not None and run.run_key == frame.run_key:
                run.processed += 1
        return _BatchResult(points, frames, new_clusters)

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
