"""arroyopy-shaped building blocks that fix what arroyopy 0.2.2 gets wrong.

arroyopy gives the shape (``Listener(operator)``, ``Operator.process``, ``Publisher.publish``), so ALS code can
plug in. 0.2.2 shares ``publishers`` between instances, has no queue bound, lets one exception kill the
listener, and awaits publishers one by one (see ../shared/notes/arroyopy.md). Here:

- `BoundedQueue`: the queue between receive and compute, bounded in messages and bytes, with a named
  overload policy and a drop counter;
- `QueuedOperator`: an arroyopy ``Operator`` with per-instance publishers, a bounded inbox fed by a
  listener's ``submit``, per-message error isolation, and concurrent, isolated, time-limited fan-out;
- `BatchStage` + `run_isolated`: a per-frame step with ``process_one`` / ``process_many``; when a batch
  fails, its items are retried one by one so a single bad frame fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, Generic, TypeVar

import arroyopy

from operators.messages import Frame
from operators.metrics import PipelineMetrics
from operators.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

T = TypeVar("T")
Listener = arroyopy.Listener
Publisher = arroyopy.Publisher

# Frames waiting for compute: ~50 PILATUS3 2M frames, yet only 4 of the largest frames the protocol admits.
DEFAULT_QUEUE_BYTES = 512 * 1024**2


class QueuePolicy(StrEnum):
    """What a full queue does with one more message."""

    BLOCK = "block"  # wait for room: backpressure to the sender (PUSH/PULL stays lossless)
    DROP_OLDEST = "drop_oldest"  # make room by dropping the oldest droppable message (stay live)
    DROP_NEWEST = "drop_newest"  # refuse the incoming message


class BoundedQueue(asyncio.Queue[T]):
    """An `asyncio.Queue` with an explicit overload policy, bounded in messages and in bytes.

    The queue is full at ``maxsize`` messages, or once the messages waiting weigh ``max_bytes`` (``size_of``
    each; one message may overshoot the bound: a frame larger than it still gets through an empty queue).
    Only messages for which ``droppable`` is true may be dropped (run start/stop documents never are;
    they wait for room instead). Every drop calls ``on_drop(message)``, which counts it.
    """

    def __init__(
        self,
        maxsize: int,
        policy: QueuePolicy,
        on_drop: Callable[[T], None],
        droppable: Callable[[T], bool] = lambda _: True,
        *,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = lambda _: 0,
    ) -> None:
        if maxsize < 1:
            raise ValueError("a bounded queue needs maxsize >= 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("a byte bound needs max_bytes >= 1")
        super().__init__(maxsize)
        self.policy = QueuePolicy(policy)
        self.max_bytes = max_bytes
        self._on_drop = on_drop
        self._droppable = droppable
        self._size_of = size_of
        self.nbytes = 0  # what the waiting messages weigh

    def full(self) -> bool:
        return super().full() or (self.max_bytes is not None and self.nbytes >= self.max_bytes)

    # asyncio.Queue's storage hooks: every message in or out passes here (the byte count stays exact)
    def _put(self, item: T) -> None:
        super()._put(item)  # type: ignore[misc]
        self.nbytes += self._size_of(item)

    def _get(self) -> T:
        item: T = super()._get()  # type: ignore[misc]
        self.nbytes -= self._size_of(item)
        return item

    async def offer(self, item: T) -> bool:
        """Enqueue under the policy. False when ``item`` itself was dropped."""
        if self.policy is QueuePolicy.BLOCK or not self._droppable(item):
            await self.put(item)
            return True
        if self.policy is QueuePolicy.DROP_NEWEST:
            if self.full():
                self._on_drop(item)
                return False
            self.put_nowait(item)
            return True
        while self.full():  # the byte bound may take more than one victim
            victim = self._pop_oldest_droppable()
            if victim is None:  # full of undroppable control messages: wait like BLOCK
                await self.put(item)
                return True
            self._on_drop(victim)
        self.put_nowait(item)
        return True

    def _pop_oldest_droppable(self) -> T | None:
        items = self._queue  # type: ignore[attr-defined]  # the deque asyncio.Queue subclasses use
        for i, candidate in enumerate(items):
            if self._droppable(candidate):
                del items[i]
                self.nbytes -= self._size_of(candidate)
                return candidate
        return None

    def drain_nowait(self) -> list[T]:
        """Everything queued right now, removed (used at shutdown to account for it)."""
        out: list[T] = []
        while True:
            try:
                out.append(self.get_nowait())
            except asyncio.QueueEmpty:
                return out


class QueuedOperator(arroyopy.Operator, Generic[T]):
    """An arroyopy ``Operator`` with a bounded inbox and robust fan-out.

    A listener calls ``await operator.submit(message)``; `run` consumes the inbox, which holds at most
    ``queue_size`` messages and ``queue_bytes`` of frames (see `message_bytes`). ``process`` failures are
    isolated per message (logged, counted by the subclass, never fatal). ``publish`` sends one message to
    every publisher concurrently; a publisher that raises or exceeds ``publish_timeout`` is counted in
    ``publisher_errors`` and the others are unaffected.
    """

    def __init__(
        self,
        metrics: PipelineMetrics,
        *,
        queue_size: int = 64,
        policy: QueuePolicy = QueuePolicy.BLOCK,
        publish_timeout: float = 1.0,
        queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
    ) -> None:
        # Not arroyopy's __init__: it creates an unbounded queue, and its list attributes are class-level.
        self.listeners: list[Any] = []
        self.publishers: list[Publisher] = []
        self.stop_requested = False
        self.metrics = metrics
        self.publish_timeout = publish_timeout
        # per-frame warnings (drops, rejections), under the subclass's logger; the counters stay exact
        self._warn = ThrottledLog(logging.getLogger(type(self).__module__))
        self.inbox: BoundedQueue[T] = BoundedQueue(
            queue_size, policy, on_drop=self._count_queue_drop, droppable=self.droppable,
            max_bytes=queue_bytes, size_of=self.message_bytes,
        )  # fmt: skip

    def droppable(self, message: T) -> bool:
        """Whether the overload policy may drop ``message``. Subclasses protect control messages."""
        return True

    def message_bytes(self, message: T) -> int:
        """What ``message`` weighs against ``queue_bytes``: a frame's pixels; the rest is small."""
        return message.image.nbytes if isinstance(message, Frame) else 0

    def _count_queue_drop(self, message: T) -> None:
        self.metrics.dropped.labels("queue_full").inc()
        self._warn.warning("queue_full", "queue full (policy %s): dropped %s", self.inbox.policy, describe(message))

    async def submit(self, message: T) -> bool:
        """Called by listeners. Returns False when the message was dropped by the overload policy."""
        accepted = await self.inbox.offer(message)
        self.metrics.queue_depth.set(self.inbox.qsize())
        return accepted

    async def publish(self, message: Any) -> None:
        if not self.publishers:
            return
        await asyncio.gather(*(self._publish_to(p, message) for p in self.publishers))

    async def _publish_to(self, publisher: Publisher, message: Any) -> None:
        try:
            await asyncio.wait_for(publisher.publish(message), self.publish_timeout)
        except TimeoutError:
            self.metrics.publisher_errors.labels(type(publisher).__name__).inc()
            log.error("publisher %s took over %.1fs on %s", type(publisher).__name__, self.publish_timeout,
                      describe(message))
        except Exception:
            self.metrics.publisher_errors.labels(type(publisher).__name__).inc()
            log.exception("publisher %s failed on %s", type(publisher).__name__, describe(message))

    async def run(self) -> None:
        """Consume the inbox until cancelled; one failing message never stops the loop."""
        while True:
            message = await self.inbox.get()
            self.metrics.queue_depth.set(self.inbox.qsize())
            try:
                await self.process(message)
            except Exception:
                log.exception("processing failed for %s", describe(message))
                self.on_process_error(message)

    def on_process_error(self, message: T) -> None:
        """Account for a message whose processing raised (the subclass knows the right counter)."""
        self.metrics.rejected.labels("processing_error").inc()

    async def start(self) -> None:  # arroyopy's start() reads a non-existent queue
        await self.run()


S = TypeVar("S")


class BatchStage(ABC, Generic[S]):
    """One per-frame step. ``process_many`` works on a batch in place; ``process_one`` is its batch of one.

    Items carry their own results (the stage sets fields on them), so a batch can shrink when one item
    fails without re-plumbing outputs. ``reject_reason`` labels the failures this stage causes.
    """

    name: str = "stage"
    reject_reason: str = "stage_error"
    batchable: bool = True  # False: items are processed (and isolated) one at a time, never retried

    @abstractmethod
    def process_many(self, items: Sequence[S]) -> None: ...

    def process_one(self, item: S) -> None:
        self.process_many([item])


def run_isolated(
    stage: BatchStage[S], items: Sequence[S], on_failure: Callable[[S, BatchStage[S], BaseException], None]
) -> list[S]:
    """Run ``stage`` on ``items``; when the batch raises, retry one by one. Returns the items that passed."""
    if not items:
        return []
    if not stage.batchable:
        return [item for one in items for item in run_isolated_one(stage, one, on_failure)]
    try:
        stage.process_many(items)
        return list(items)
    except Exception as exc:  # noqa: BLE001 - isolation: any failure of a batch is retried per item
        if len(items) == 1:
            on_failure(items[0], stage, exc)
            return []
    return [item for one in items for item in run_isolated_one(stage, one, on_failure)]


def run_isolated_one(
    stage: BatchStage[S], item: S, on_failure: Callable[[S, BatchStage[S], BaseException], None]
) -> list[S]:
    try:
        stage.process_one(item)
        return [item]
    except Exception as exc:  # noqa: BLE001 - isolation: the item is rejected and counted by on_failure
        on_failure(item, stage, exc)
        return []


def describe(message: Any) -> str:
    """A short log context for a message: its type, run id and frame index when it has them."""
    parts = [type(message).__name__]
    for attr in ("run_id", "index"):
        value = getattr(message, attr, None)
        if value is not None:
            parts.append(f"{attr}={value}")
    return " ".join(parts)
