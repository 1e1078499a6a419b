"""ZeroMQ ingest: connect to the frame source, decode, track runs, feed the pipeline's bounded inbox.

`ZmqIngest` is an arroyopy ``Listener``: it CONNECTS to the source with PULL (default; lossless, the
sender blocks when we fall behind) or SUB (for PUB sources such as the ALS simulators; ZeroMQ drops
silently at the high-water mark, which the frame-number gap count exposes as ``lost_upstream``).

Its receive loop is its own (arroyopy 0.2.2's ``ZMQListener`` swallows cancellation and dies on the
first exception). Each message is counted as received, decoded off the event loop by `IngestDecoder`
(bad input raises `ProtocolError` and is counted under its reason), and handed to the operator's
``submit``, whose bounded queue applies the overload policy.

A message longer than the protocol's `Limits` never reaches the service: ZeroMQ refuses it (``MAXMSGSIZE``)
and drops that connection (with what the sender had queued on it), which the ingest makes again once it has
read what the connection delivered before (``source_reconnects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from operators.base import Listener
from operators.messages import Frame, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from operators.persist.keys import run_key
from operators.throttled_log import ThrottledLog
from stream.protocol import DEFAULT_LIMITS, Event, Limits, ProtocolError, Start, Stop, WireMessage, decode

log = logging.getLogger(__name__)

IngestMessage = RunStarted | Frame | RunStopped
Pattern = Literal["pull", "sub"]

# ZeroMQ reports a connection it will retry (its peer went away) within milliseconds of dropping it; one it
# dropped for a protocol error (a message over MAXMSGSIZE) it never retries.
_RETRY_GRACE_S = 1.0
# A message is one part, or a PUB topic and the payload.
_MAX_PARTS = 2


class Submitter(Protocol):
    """The operator side of the seam: a bounded, policy-driven inbox."""

    async def submit(self, message: IngestMessage) -> bool: ...


class WireDecoder(Protocol):
    """One source's wire format: bytes -> `Start | Event | Stop`, raising `ProtocolError` (a counted reason).

    The default is the arroyo msgpack format (`stream.protocol.decode`); DECTRIS stream v2 is
    `stream.sources.stream2_wire.Stream2Decoder`. Called from one thread at a time.
    """

    def decode(self, payload: bytes | memoryview) -> WireMessage: ...


@dataclass(frozen=True, slots=True)
class MsgpackWire:
    """The arroyo msgpack wire format (stream/protocol.py)."""

    limits: Limits = DEFAULT_LIMITS

    def decode(self, payload: bytes | memoryview) -> WireMessage:
        return decode(payload, self.limits)


@dataclass(slots=True)
class _RunState:
    run_id: str
    run_key: str
    last_index: int | None = None
    frames_seen: int = 0
    gaps_counted: int = 0


class IngestDecoder:
    """Wire bytes -> in-process messages, in arrival order, with run state and gap detection.

    Not thread-safe: one decoder per ingest, called from one thread at a time.
    A ``start`` while a run is open closes that run first (``RunStopped(reason="superseded")``);
    an event or stop with no open run is rejected (``no_active_run``).
    """

    def __init__(
        self, metrics: PipelineMetrics, limits: Limits = DEFAULT_LIMITS, wire: WireDecoder | None = None
    ) -> None:
        self.metrics = metrics
        self.limits = limits
        self.wire = wire or MsgpackWire(limits)
        self._run: _RunState | None = None
        self._warn = ThrottledLog(log)  # gaps and reordering can happen on every frame of a lossy link

    @property
    def run_id(self) -> str | None:
        return self._run.run_id if self._run else None

    def accept(self, payload: bytes | memoryview, received_at: float, received_perf: float) -> list[IngestMessage]:
        """Decode one message. Raises `ProtocolError`; the LAST returned message is the received one."""
        return self.handle(self.wire.decode(payload), received_at, received_perf)

    def handle(self, message: WireMessage, received_at: float, received_perf: float) -> list[IngestMessage]:
        """Run state for one decoded message (sources without a byte wire call this directly).

        Raises `ProtocolError` (``no_active_run``); the LAST returned message is the one handled.
        """
        if isinstance(message, Event):
            return [self._event(message, received_at, received_perf)]
        if isinstance(message, Start):
            return self._start(message, received_at)
        return [self._stop(message, received_at)]

    def _start(self, start: Start, now: float) -> list[IngestMessage]:
        out: list[IngestMessage] = []
        if self._run is not None:
            log.warning("run %s superseded by a new start before its stop", self._run.run_id)
            out.append(RunStopped(self._run.run_id, now, num_frames=None, processed=0, reason="superseded",
                                  run_key=self._run.run_key))  # fmt: skip
        run_id = start.run_id or uuid.uuid4().hex
        self._run = _RunState(run_id, run_key(run_id))
        metadata = {**start.metadata, "tiled_url": start.tiled_url} if start.tiled_url else dict(start.metadata)
        out.append(RunStarted(run_id=run_id, run_name=start.run_name or run_id, started_at=now, metadata=metadata,
                              run_key=self._run.run_key))  # fmt: skip
        log.info("run %s started (%s), stored as %s", run_id, start.run_name, self._run.run_key)
        return out

    def _event(self, event: Event, received_at: float, received_perf: float) -> Frame:
        run = self._run
        if run is None:
            raise ProtocolError("no_active_run", f"event {event.frame_number} arrived with no open run")
        index = event.frame_number
        if run.last_index is not None:
            if index > run.last_index + 1:
                missing = index - run.last_index - 1
                run.gaps_counted += missing
                self.metrics.lost_upstream.inc(missing)
                self._warn.warning("lost_upstream", "run %s: %d frame(s) lost upstream before frame %d",
                                   run.run_id, missing, index)  # fmt: skip
            elif index <= run.last_index:
                self._warn.warning("out_of_order", "run %s: frame %d arrived after frame %d",
                                   run.run_id, index, run.last_index)  # fmt: skip
        run.last_index = index if run.last_index is None else max(index, run.last_index)
        run.frames_seen += 1
        return Frame(
            run_id=run.run_id,
            run_key=run.run_key,
            index=index,
            image=event.image,
            tiled_url=event.tiled_url,
            received_at=received_at,
            received_perf=received_perf,
            metadata=event.metadata,
        )

    def _stop(self, stop: Stop, now: float) -> RunStopped:
        run = self._run
        if run is None:
            raise ProtocolError("no_active_run", "stop arrived with no open run")
        if stop.num_frames is not None:
            # Frames announced but neither received nor already counted in a gap: lost at the tail.
            tail = stop.num_frames - run.frames_seen - run.gaps_counted
            if tail > 0:
                self.metrics.lost_upstream.inc(tail)
                log.warning("run %s: %d frame(s) announced but never received", run.run_id, tail)
        self._run = None
        log.info("run %s stopped after %d frame(s) (announced %s)", run.run_id, run.frames_seen, stop.num_frames)
        return RunStopped(run.run_id, now, num_frames=stop.num_frames, processed=0, reason="stop", run_key=run.run_key)


class ZmqIngest(Listener):
    """Connects to ``address`` and feeds ``operator.submit`` until `stop`.

    ``wire`` is the message format (default: arroyo msgpack); the run state, limits and counters are the same
    for every format.

    ``rcvhwm`` bounds what ZeroMQ itself buffers (default 1000 messages would be ~10 GB of Pilatus frames),
    ``limits.max_message_bytes`` how long each may be.
    """

    def __init__(
        self,
        operator: Submitter,
        address: str,
        metrics: PipelineMetrics,
        *,
        pattern: Pattern = "pull",
        limits: Limits = DEFAULT_LIMITS,
        context: zmq.asyncio.Context | None = None,
        rcvhwm: int = 16,
        wire: WireDecoder | None = None,
    ) -> None:
        super().__init__(operator)
        if pattern not in ("pull", "sub"):
            raise ValueError(f"zmq pattern must be 'pull' or 'sub', got {pattern!r}")
        self.address = address
        self.pattern = pattern
        self.metrics = metrics
        self.limits = limits
        self.decoder = IngestDecoder(metrics, limits, wire)
        self.rcvhwm = rcvhwm
        self._warn = ThrottledLog(log)  # a misbehaving sender must not flood the log (counters stay exact)
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # Decoding (a ~10 MB copy out of msgpack, finiteness checks) stays off the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest-decode")

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def start(self) -> None:
        """Run the receive loop until cancelled or `stop` is called."""
        self._task = asyncio.current_task()
        sock = self._context.socket(zmq.PULL if self.pattern == "pull" else zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        if self.pattern == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket = sock
        watcher = asyncio.create_task(self._keep_connected(sock), name="ingest-reconnect")
        try:
            sock.connect(self.address)
            log.info("ingest connected to %s (%s)", self.address, self.pattern)
            self._connected.set()
            while True:
                await self._handle(*await self._receive(sock))
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])  # its monitor socket closes before this one
            sock.close(linger=0)
            self._socket = None
            self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def _receive(sock: zmq.asyncio.Socket) -> tuple[zmq.Frame, int]:
        """One message's last part (a PUB topic, if any, comes first) and its number of parts.

        Part by part: MAXMSGSIZE bounds each part, not their number, so earlier parts are let go as read.
        """
        frame = await sock.recv(copy=False)
        parts = 1
        while frame.more:
            frame = await sock.recv(copy=False)
            parts += 1
        return frame, parts

    async def _keep_connected(self, sock: zmq.asyncio.Socket) -> None:
        """Connect again when ZeroMQ drops the connection for good (one message over MAXMSGSIZE would
        otherwise stop the ingest until a restart); a connection it retries by itself is left to it."""
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            while True:
                if await _next_event(monitor) != zmq.EVENT_DISCONNECTED:
                    continue
                try:
                    async with asyncio.timeout(_RETRY_GRACE_S):
                        while await _next_event(monitor) != zmq.EVENT_CONNECT_RETRIED:
                            pass
                    continue
                except TimeoutError:
                    pass
                self.metrics.source_reconnects.inc()
                self._warn.warning("reconnect", "ZeroMQ dropped the connection to %s for a protocol error (a "
                                   "message over the %d-byte limit, or not ZMTP); connecting again",
                                   self.address, self.limits.max_message_bytes)  # fmt: skip
                # What the connection delivered before the error is still queued: disconnect would discard it.
                while sock.get(zmq.EVENTS) & zmq.POLLIN:
                    await asyncio.sleep(0.05)
                with contextlib.suppress(zmq.ZMQError):  # already forgotten by ZeroMQ
                    sock.disconnect(self.address)
                sock.connect(self.address)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    async def _handle(self, frame: zmq.Frame, parts: int) -> None:
        received_at, received_perf = time.time(), time.perf_counter()
        self.metrics.received.inc()
        if parts > _MAX_PARTS:
            self.metrics.rejected.labels("malformed").inc()
            self._warn.warning("malformed", "rejected message (malformed) in run %s: %d parts",
                               self.decoder.run_id, parts)  # fmt: skip
            return
        loop = asyncio.get_running_loop()
        try:
            messages = await loop.run_in_executor(
                self._executor, self.decoder.accept, frame.buffer, received_at, received_perf
            )
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self._warn.warning(exc.reason, "rejected message (%s) in run %s: %s",
                               exc.reason, self.decoder.run_id, exc.detail)  # fmt: skip
            return
        except asyncio.CancelledError:
            self.metrics.dropped.labels("shutdown").inc()
            raise
        except Exception:
            self.metrics.rejected.labels("decode_error").inc()
            log.exception("unexpected decode failure in run %s", self.decoder.run_id)
            return
        self.metrics.observe("decode", time.perf_counter() - received_perf)
        try:
            for message in messages:
                await self.operator.submit(message)
        except asyncio.CancelledError:
            # The received message (always the last one) never reached the queue.
            self.metrics.dropped.labels("shutdown").inc()
            raise

    async def stop(self) -> None:
        """Stop receiving and close the socket (never ``context.term()`` with sockets open)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])


async def _next_event(monitor: zmq.asyncio.Socket) -> int:
    event: int = parse_monitor_message(await monitor.recv_multipart())["event"]
    return event
