"""The service's side of the worker pool: dispatch batches, restore frame order, then cluster and publish.

`PooledPipeline` is the in-process `LivePipeline` with its compute stages (preprocess, encode, project) moved
to a pool of workers. The dispatcher takes what is queued (micro-batches as in-process) and sends each batch to
the pool at once, with at most ``max_in_flight`` batches out; every message, run documents included, takes a
slot in one FIFO, and the sequencer finishes the slots strictly in that order. Finishing a batch is the
in-process path itself (`LivePipeline._process_frames`): the run's clusterer in the compute thread, frames the
service stores handed to the frame sink, points published, so clients see exactly what they see in-process.

Accounting: a frame a worker rejects is counted under its stage's reason; a batch whose worker died and whose
retry failed is counted ``dropped{worker_lost}``; frames in flight at shutdown ``dropped{shutdown}``. Once idle,
received = processed + rejected + dropped holds as in-process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from operators.base import run_isolated
from operators.messages import Frame
from operators.metrics import PipelineMetrics
from operators.pipeline import InMessage, LivePipeline, Work, _BatchResult, _was_received
from operators.workers.compute import Computed

log = logging.getLogger(__name__)


class FramePool(Protocol):
    size: int

    async def compute(self, frames: list[Frame]) -> list[Computed]: ...

    def describe(self) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class _Slot:
    """One message's place in the order: a batch of frames (with its result to come) or a run document."""

    frames: list[Frame] | None = None
    result: asyncio.Future[list[Computed]] | None = None
    dispatched: float = 0.0  # perf_counter when the batch went to the pool
    control: InMessage | None = None

    @property
    def size(self) -> int:
        return len(self.frames) if self.frames is not None else 1


class PooledPipeline(LivePipeline):
    """``LivePipeline(bundle, metrics, ...)`` plus ``pool`` and ``lost``: the exception type of a lost batch."""

    def __init__(self, bundle: Any, metrics: PipelineMetrics, pool: FramePool, *, lost: type[BaseException],
                 max_in_flight: int | None = None, **kwargs: Any) -> None:
        super().__init__(bundle, metrics, **kwargs)
        self.pool = pool
        self._lost = lost
        in_flight = max_in_flight or 2 * pool.size  # each worker has one batch queued behind the one it computes
        self._room = asyncio.Semaphore(in_flight)
        self._slots: asyncio.Queue[_Slot] = asyncio.Queue(4 * in_flight)
        self._pending = 0  # messages taken off the inbox and not finished yet
        self._computed: dict[int, tuple[Computed, float]] = {}  # id(frame) -> (result, dispatched), for _compute

    async def run(self) -> None:
        sequencer = asyncio.create_task(self._sequence(), name="sequencer")
        try:
            while True:
                first = await self.inbox.get()
                self._pending += 1
                self._idle.clear()
                if not isinstance(first, Frame):
                    try:
                        await self._slots.put(_Slot(control=first))
                    except asyncio.CancelledError:
                        if _was_received(first):
                            self.metrics.dropped.labels("shutdown").inc()
                        raise
                    continue
                batch, held = [first], None
                while len(batch) < self.max_batch and not self.inbox.empty():
                    nxt = self.inbox.get_nowait()
                    self._pending += 1
                    if not isinstance(nxt, Frame):
                        held = nxt  # after this batch, in order
                        break
                    batch.append(nxt)
                self.metrics.queue_depth.set(self.inbox.qsize())
                owned: list[Frame] = batch  # frames this loop holds until the sequencer has them
                try:
                    await self._room.acquire()
                    result = asyncio.ensure_future(self.pool.compute(batch))
                    try:
                        await self._slots.put(_Slot(batch, result, time.perf_counter()))
                    except asyncio.CancelledError:
                        result.cancel()
                        raise
                    owned = []
                    if held is not None:
                        await self._slots.put(_Slot(control=held))
                        held = None
                except asyncio.CancelledError:  # stopping: what this loop still holds is dropped{shutdown}
                    self.metrics.dropped.labels("shutdown").inc(len(owned))
                    if held is not None and _was_received(held):
                        self.metrics.dropped.labels("shutdown").inc()
                    raise
        finally:
            sequencer.cancel()
            await asyncio.gather(sequencer, return_exceptions=True)
            self._shutdown_compute()

    async def _sequence(self) -> None:
        while True:
            slot = await self._slots.get()
            try:
                if slot.frames is None:
                    assert slot.control is not None
                    await self._process_control(slot.control)
                else:
                    assert slot.result is not None
                    await self._finish_batch(slot.frames, slot.result, slot.dispatched)
            except Exception:  # a bug here must not stop the sequencer: the batch is counted, the next goes on
                log.exception("sequencing failed")
                if slot.frames is not None:
                    self.metrics.rejected.labels("processing_error").inc(len(slot.frames))
            finally:
                self._pending -= slot.size
                if slot.frames is not None:
                    self._room.release()

    async def _finish_batch(self, frames: list[Frame], result: Awaitable[list[Computed]], dispatched: float) -> None:
        try:
            computed = await result
        except asyncio.CancelledError:
            self.metrics.dropped.labels("shutdown").inc(len(frames))
            raise
        except Exception as exc:  # noqa: BLE001 - a lost worker or a bug: counted, the pipeline goes on
            if isinstance(exc, self._lost):
                self.metrics.dropped.labels("worker_lost").inc(len(frames))
                log.error("run %s: frames %d..%d lost with their worker (%s)", frames[0].run_id, frames[0].index,
                          frames[-1].index, exc)
            else:  # a bug outside the isolated stages: lose this batch, keep the pipeline (as in-process)
                self.metrics.rejected.labels("processing_error").inc(len(frames))
                log.error("run %s: batch of %d frame(s) failed in a worker: %s", frames[0].run_id, len(frames),
                          exc)
            return
        kept = []
        for frame, c in zip(frames, computed, strict=True):
            if c.reject_reason is not None:
                self.metrics.rejected.labels(c.reject_reason).inc()
                self._warn.warning(c.reject_reason, "run %s frame %d rejected in a worker (%s): %s",
                                   frame.run_id, frame.index, c.reject_reason, c.error)
            else:
                self._computed[id(frame)] = (c, dispatched)
                kept.append(frame)
        if kept:
            await self._process_frames(kept)

    async def process(self, message: InMessage) -> None:
        """arroyopy's one-message verb: the same path as `run`, for a batch of one."""
        if isinstance(message, Frame):
            await self._finish_batch([message], self.pool.compute([message]), time.perf_counter())
        else:
            await self._process_control(message)

    def _compute(self, frames: list[Frame]) -> _BatchResult:
        """In the compute thread: the workers' results, then the run's clusterer, in frame order."""
        items = []
        for slot, frame in enumerate(frames):
            c, dispatched = self._computed.pop(id(frame))
            work = Work(frame, slot, latent=c.latent, features=c.features, xy=c.xy)
            work.timings.queue = dispatched - frame.received_perf
            work.timings.preprocess, work.timings.encode, work.timings.project = (
                c.preprocess_s, c.encode_s, c.project_s)
            for stage in ("queue", "preprocess", "encode", "project"):
                self.metrics.observe(stage, getattr(work.timings, stage))
            items.append(work)
        t0 = time.perf_counter()
        items = run_isolated(self.cluster_stage, items, self._reject)
        elapsed = time.perf_counter() - t0
        for work in items:
            work.timings.cluster = elapsed
            self.metrics.observe("cluster", elapsed)
        result = self._finish(items)
        try:
            result.corrections = self.cluster_stage.step()
        except Exception:
            log.exception("applying a re-clustering failed")
        return result

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while self._pending or not self.inbox.empty():
                    await asyncio.sleep(0.01)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """What is still dispatched or waiting to be sequenced is dropped{shutdown}; then as in-process."""
        while not self._slots.empty():
            slot = self._slots.get_nowait()
            if slot.frames is not None:
                self.metrics.dropped.labels("shutdown").inc(len(slot.frames))
                if slot.result is not None:
                    slot.result.cancel()
            elif slot.control is not None and _was_received(slot.control):
                self.metrics.dropped.labels("shutdown").inc()
        self._computed.clear()
        await super().close()


def in_process_worker(bundle: Any, metrics: PipelineMetrics) -> list[dict[str, Any]]:
    """``/api/health``'s workers with ``--workers 1``: the service itself computes."""
    processed = metrics.snapshot()["processed"]
    frames = int(processed.get("event", 0)) if isinstance(processed, dict) else 0
    return [{"id": 0, "pid": os.getpid(), "node": "in-process", "device": getattr(bundle.encoder, "device", "cpu"),
             "state": "alive", "frames": frames}]
