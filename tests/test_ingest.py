"""ZeroMQ ingest over real sockets: runs, bad input, gaps, overload policies, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgpack
import numpy as np
import pytest
import zmq.asyncio
from prometheus_client import CollectorRegistry

from operators.base import BoundedQueue, QueuedOperator, QueuePolicy
from operators.messages import Frame, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from stream.config import load_settings
from stream.ingest import ZmqIngest
from stream.protocol import DEFAULT_LIMITS, Limits, encode_event
from stream.sender import FrameSender

Message = RunStarted | Frame | RunStopped


class Collector(QueuedOperator[Message]):
    """A real operator at the end of the ingest seam: it keeps what it processes (optionally slowly)."""

    def __init__(self, metrics: PipelineMetrics, delay: float = 0.0, **kwargs: object) -> None:
        super().__init__(metrics, **kwargs)  # type: ignore[arg-type]
        self.delay = delay
        self.seen: list[Message] = []

    def droppable(self, message: Message) -> bool:
        return isinstance(message, Frame)

    async def process(self, message: Message) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.seen.append(message)
        kind = {RunStarted: "start", Frame: "event", RunStopped: "stop"}[type(message)]
        if not (isinstance(message, RunStopped) and message.reason != "stop"):
            self.metrics.processed.labels(kind).inc()

    def frames(self) -> list[Frame]:
        return [m for m in self.seen if isinstance(m, Frame)]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def _live(
    pattern: str = "pull", *, delay: float = 0.0, run_operator: bool = True, limits: Limits = DEFAULT_LIMITS,
    **operator_kwargs: object,
) -> AsyncIterator[tuple[FrameSender, ZmqIngest, Collector, PipelineMetrics]]:
    metrics = PipelineMetrics(CollectorRegistry())
    ctx = zmq.asyncio.Context()
    collector = Collector(metrics, delay, **operator_kwargs)
    sender = FrameSender("tcp://127.0.0.1:*", "push" if pattern == "pull" else "pub", context=ctx)
    sender.open()
    ingest = ZmqIngest(collector, sender.endpoint, metrics, pattern=pattern, limits=limits, context=ctx, rcvhwm=2)
    tasks = [asyncio.create_task(ingest.start())]
    if run_operator:
        tasks.append(asyncio.create_task(collector.run()))
    await ingest.wait_connected()
    try:
        yield sender, ingest, collector, metrics
    finally:
        await ingest.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sender.close(linger_ms=0)
        ctx.term()


def _frame(i: int) -> np.ndarray:
    return np.full((8, 6), i, dtype=np.int32)


async def test_a_run_arrives_in_order_with_its_frames_tagged_by_run_id() -> None:
    async with _live() as (sender, _, collector, metrics):
        await sender.send_start("run-7", "scan")
        for i in range(5):
            await sender.send_event(i, _frame(i))
        await sender.send_stop(5)
        await _until(lambda: len(collector.seen) == 7)
    assert isinstance(collector.seen[0], RunStarted) and collector.seen[0].run_id == "run-7"
    assert [f.index for f in collector.frames()] == [0, 1, 2, 3, 4]
    assert all(f.run_id == "run-7" and int(f.image[0, 0]) == f.index for f in collector.frames())
    assert isinstance(collector.seen[-1], RunStopped) and collector.seen[-1].num_frames == 5
    assert metrics.snapshot()["lost_upstream"] == 0
    assert metrics.accounted() == (7, 7)


async def test_bad_messages_are_counted_by_reason_while_good_frames_keep_flowing() -> None:
    good = 0
    async with _live(limits=Limits(max_pixels=10_000, max_bytes=1_000_000)) as (sender, _, collector, metrics):
        await sender.send_event(0, _frame(0))  # no open run yet
        await sender.send_start("r", "scan")
        bad = [
            b"\x93\x01 definitely not msgpack",
            msgpack.packb({"msg_type": "calibrate"}),
            msgpack.packb({"msg_type": "event", "frame_number": 1,
                           "image": {"array": {"data": b"\x00" * 10, "dtype": "int32", "shape": [8, 6]}}}),
            encode_event(1, np.array([[np.nan, 1.0]], dtype=np.float32)),
            encode_event(1, np.zeros((200, 200), dtype=np.uint8)),  # 40,000 pixels > 10,000
        ]
        for i, payload in enumerate(bad):
            await sender.send_event(i, _frame(i))
            good += 1
            await sender.send_raw(payload)
        await sender.send_stop(good)
        await _until(lambda: any(isinstance(m, RunStopped) for m in collector.seen))
    snap = metrics.snapshot()
    assert snap["rejected"] == {
        "no_active_run": 1, "malformed": 1, "unknown_msg_type": 1, "size_mismatch": 1, "non_finite": 1,
        "oversized": 1,
    }
    assert [f.index for f in collector.frames()] == list(range(good))
    assert metrics.accounted() == (1 + 1 + 2 * len(bad) + 1, 1 + 1 + 2 * len(bad) + 1)


async def test_gaps_in_frame_numbers_and_missing_tail_frames_count_as_lost_upstream() -> None:
    async with _live() as (sender, _, collector, metrics):
        await sender.send_start("r", "scan")
        for i in (0, 1, 4, 5):
            await sender.send_event(i, _frame(i))
        await sender.send_stop(8)  # 2 and 3 missing in the middle, 6 and 7 at the tail
        await _until(lambda: len(collector.seen) == 6)
    assert metrics.snapshot()["lost_upstream"] == 4


async def test_a_start_during_an_open_run_supersedes_it() -> None:
    async with _live() as (sender, _, collector, _metrics):
        await sender.send_start("first", "a")
        await sender.send_event(0, _frame(0))
        await sender.send_start("second", "b")
        await sender.send_event(0, _frame(0))
        await _until(lambda: len(collector.seen) == 5)
    kinds = [(type(m).__name__, m.run_id) for m in collector.seen]
    assert kinds == [("RunStarted", "first"), ("Frame", "first"), ("RunStopped", "first"),
                     ("RunStarted", "second"), ("Frame", "second")]
    assert collector.seen[2].reason == "superseded"  # type: ignore[union-attr]


async def test_a_start_without_run_id_gets_a_generated_one() -> None:
    async with _live() as (sender, _, collector, _metrics):
        await sender.send_raw(msgpack.packb({"msg_type": "start", "run_name": "anonymous"}))
        await sender.send_event(0, _frame(0))
        await _until(lambda: len(collector.seen) == 2)
    assert collector.seen[0].run_id and collector.seen[1].run_id == collector.seen[0].run_id


async def test_sub_ingest_receives_from_a_pub_source_once_subscribed() -> None:
    async with _live("sub") as (sender, _, collector, _metrics):
        assert await sender.wait_for_subscriber(timeout=5)
        await sender.send_start("r", "pub scan")
        for i in range(3):
            await sender.send_event(i, _frame(i))
        await _until(lambda: len(collector.frames()) == 3)


async def test_pull_with_block_policy_loses_nothing_when_compute_falls_behind() -> None:
    async with _live(delay=0.005, queue_size=2, policy=QueuePolicy.BLOCK) as (sender, _, collector, metrics):
        await sender.send_start("r", "scan")
        for i in range(40):
            await sender.send_event(i, _frame(i))
        await sender.send_stop(40)
        await _until(lambda: len(collector.seen) == 42)
    assert [f.index for f in collector.frames()] == list(range(40))
    assert metrics.snapshot()["dropped"] == {}


async def test_drop_oldest_policy_counts_every_drop_and_never_drops_run_documents() -> None:
    # The operator does not consume until everything is sent: the queue must overflow.
    async with _live(run_operator=False, queue_size=3, policy=QueuePolicy.DROP_OLDEST) as (
        sender, _, collector, metrics,
    ):
        await sender.send_start("r", "scan")
        for i in range(10):
            await sender.send_event(i, _frame(i))
        await _until(lambda: metrics.snapshot()["received"] == 11)
        consumer = asyncio.create_task(collector.run())
        await sender.send_stop(10)
        await _until(lambda: any(isinstance(m, RunStopped) for m in collector.seen))
        consumer.cancel()
    assert isinstance(collector.seen[0], RunStarted)
    kept = [f.index for f in collector.frames()]
    assert kept == sorted(kept) and kept[-1] == 9  # the newest frames survive
    assert metrics.snapshot()["dropped"] == {"queue_full": 10 - len(kept)}
    assert metrics.accounted() == (12, 12)


async def test_stopping_the_ingest_closes_its_socket_promptly() -> None:
    async with _live() as (_sender, ingest, _collector, _metrics):
        async with asyncio.timeout(2):
            await ingest.stop()
        assert ingest._socket is None


async def test_bounded_queue_drop_newest_refuses_the_incoming_message() -> None:
    dropped: list[int] = []
    queue: BoundedQueue[int] = BoundedQueue(2, QueuePolicy.DROP_NEWEST, on_drop=dropped.append)
    assert await queue.offer(1) and await queue.offer(2)
    assert not await queue.offer(3)
    assert dropped == [3] and queue.drain_nowait() == [1, 2]


@pytest.mark.parametrize("policy", [QueuePolicy.DROP_OLDEST, QueuePolicy.DROP_NEWEST])
async def test_undroppable_messages_wait_for_room_under_drop_policies(policy: QueuePolicy) -> None:
    queue: BoundedQueue[int] = BoundedQueue(1, policy, on_drop=lambda _: None, droppable=lambda m: m > 0)
    await queue.offer(0)  # undroppable, fills the queue
    waiter = asyncio.create_task(queue.offer(-1))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert queue.get_nowait() == 0
    assert await asyncio.wait_for(waiter, 1)
    assert queue.drain_nowait() == [-1]


FRAME_BYTES = _frame(0).nbytes


async def test_the_inbox_holds_at_most_its_bytes_of_frames_and_block_then_loses_nothing() -> None:
    async with _live(run_operator=False, queue_size=100, queue_bytes=3 * FRAME_BYTES,
                     policy=QueuePolicy.BLOCK) as (sender, _, collector, metrics):  # fmt: skip
        await sender.send_start("r", "scan")
        for i in range(10):
            await sender.send_event(i, _frame(i))
        await _until(lambda: collector.inbox.qsize() == 4)  # the start and 3 frames' worth of bytes
        await asyncio.sleep(0.1)
        assert collector.inbox.qsize() == 4 and collector.inbox.nbytes == 3 * FRAME_BYTES
        consumer = asyncio.create_task(collector.run())
        await sender.send_stop(10)
        await _until(lambda: any(isinstance(m, RunStopped) for m in collector.seen))
        consumer.cancel()
    assert [f.index for f in collector.frames()] == list(range(10))
    assert metrics.snapshot()["dropped"] == {}


async def test_a_full_inbox_by_bytes_drops_the_oldest_frames_and_counts_them() -> None:
    async with _live(run_operator=False, queue_size=100, queue_bytes=3 * FRAME_BYTES,
                     policy=QueuePolicy.DROP_OLDEST) as (sender, _, collector, metrics):  # fmt: skip
        await sender.send_start("r", "scan")
        for i in range(10):
            await sender.send_event(i, _frame(i))
        await _until(lambda: metrics.snapshot()["received"] == 11)
        assert collector.inbox.nbytes <= 3 * FRAME_BYTES
        consumer = asyncio.create_task(collector.run())
        await sender.send_stop(10)
        await _until(lambda: any(isinstance(m, RunStopped) for m in collector.seen))
        consumer.cancel()
    assert [f.index for f in collector.frames()] == [7, 8, 9]
    assert metrics.snapshot()["dropped"] == {"queue_full": 7}
    assert metrics.accounted() == (12, 12)


async def test_bounded_queue_by_bytes_refuses_newest_and_lets_a_frame_larger_than_the_bound_through() -> None:
    dropped: list[bytes] = []
    queue: BoundedQueue[bytes] = BoundedQueue(10, QueuePolicy.DROP_NEWEST, on_drop=dropped.append, max_bytes=100,
                                              size_of=len)  # fmt: skip
    assert await queue.offer(b"a" * 500)  # alone in an empty queue: one message may overshoot the bound
    assert not await queue.offer(b"b")
    assert queue.get_nowait() == b"a" * 500 and queue.nbytes == 0
    assert await queue.offer(b"c" * 60) and await queue.offer(b"d" * 60) and not await queue.offer(b"e")
    assert dropped == [b"b", b"e"] and queue.nbytes == 120


async def test_a_message_over_the_size_limit_never_reaches_the_service_and_the_source_is_reconnected() -> None:
    limits = Limits(max_pixels=1024, max_bytes=4096, max_metadata_bytes=4096)
    # a slow operator: when ZeroMQ drops the connection, frames it received before are still waiting to be read
    async with _live(limits=limits, delay=0.8, queue_size=1) as (sender, _, collector, metrics):
        await sender.send_start("r", "scan")
        for i in range(4):
            await sender.send_event(i, _frame(i))
        # ZeroMQ refuses it (MAXMSGSIZE) and drops the connection, which it would never make again
        await sender.send_raw(encode_event(4, np.zeros((300, 300), np.int32)))
        await _until(lambda: metrics.snapshot()["source_reconnects"] == 1, timeout=10)
        for i in range(5, 7):  # the sender's socket waits for the connection to come back
            await sender.send_event(i, _frame(i))
        await sender.send_stop(7)
        await _until(lambda: any(isinstance(m, RunStopped) for m in collector.seen), timeout=30)
    assert [f.index for f in collector.frames()] == [0, 1, 2, 3, 5, 6]
    snap = metrics.snapshot()
    assert snap["source_reconnects"] == 1 and snap["received"] == 8 and snap["lost_upstream"] == 1
    assert snap["rejected"] == {} and metrics.accounted() == (8, 8)


async def test_a_dropped_source_connection_that_zeromq_retries_is_not_made_twice() -> None:
    async with _live() as (sender, _, collector, metrics):
        endpoint = sender.endpoint
        await sender.send_start("r", "scan")
        await _until(lambda: len(collector.seen) == 1)
        sender.close(linger_ms=0)  # the source restarts on the same address
        await asyncio.sleep(0.2)
        async with FrameSender(endpoint) as again:
            await again.send_event(0, _frame(0))
            await _until(lambda: len(collector.frames()) == 1, timeout=10)
            await asyncio.sleep(1.5)  # past the grace the ingest gives ZeroMQ to retry by itself
    assert metrics.snapshot()["source_reconnects"] == 0


async def test_a_message_of_more_than_two_parts_is_rejected_as_malformed() -> None:
    async with _live() as (sender, _, collector, metrics):
        await sender.send_start("r", "scan")
        await sender.socket.send_multipart([b"topic", b"x" * 1000, encode_event(0, _frame(0))])
        await sender.socket.send_multipart([b"topic", encode_event(1, _frame(1))])  # a PUB topic and a payload
        await _until(lambda: len(collector.frames()) == 1)
    assert [f.index for f in collector.frames()] == [1]
    assert metrics.snapshot()["rejected"] == {"malformed": 1}
    assert metrics.accounted() == (3, 3)


def test_serve_settings_carry_every_sender_limit_to_the_protocol_and_the_inbox() -> None:
    s = load_settings(max_frame_number=10, max_metadata_bytes=2048, max_metadata_depth=4, queue_bytes=1000)
    assert s.limits == Limits(max_frame_number=10, max_metadata_bytes=2048, max_metadata_depth=4)
    assert s.queue_bytes == 1000
    defaults = load_settings()
    assert defaults.limits == DEFAULT_LIMITS and defaults.queue_bytes == 512 * 2**20
