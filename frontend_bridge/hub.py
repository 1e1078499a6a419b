"""The websocket hub: an arroyopy-shaped Publisher that fans results out to clients.

`Hub.publish(message)` is called by the pipeline on the event loop that serves the app. It never
awaits a client: each message is encoded once per wire format in use and appended to every
client's own bounded queue; each connection's sender task drains its queue at its own pace.

Slow-client policies (each drop is counted under `dropped{reason}`):
- /lse  : DROP_OLDEST  - the oldest queued points are discarded (`lse_slow_client`); the LSE plots a
          live cloud, so the newest points matter most.
- /ws   : DISCONNECT   - the client is closed with 1013 "try again later" (`ws_slow_client`); /ws
          carries typed events whose order matters, and a reconnecting client gets a full backfill.
The server's keepalive never closes a client for a late pong (stream/serve.py), so these policies
are all a slow client meets.

Late joiners on /ws get the current run's points from memory (backfill) and then live messages,
with no gap and no duplicate: while a client backfills, the run's new points are read from the
store (not queued), and every other message waits in the client's bounded queue.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from operators.messages import ClusterNew, ClusterUpdate, Point, RunStarted, RunStopped

from . import wire
from .wire import ModelInfo, RunContext, WireFormat

logger = logging.getLogger(__name__)

# Every drop reason, pre-declared so /metrics shows zeros before the first drop.
DROP_REASONS: tuple[str, ...] = (
    "lse_slow_client",  # a point discarded from a slow /lse client's queue (drop-oldest)
    "ws_slow_client",  # a /ws client disconnected with 1013 because its queue was full
    "store_full",  # a point evicted from the run's in-memory store (backfill lost its oldest point)
    "stale_run",  # a point or event for a run that is no longer current
    "non_finite_point",  # a point whose x or y is NaN or infinite (JSON cannot carry it, plots cannot place it)
    "unsupported_message",  # publish() got something that is not a pipeline message
    # A run's start metadata sent to clients as {} (its run_start says why in `metadata_omitted`):
    "metadata_too_deep",  # nested deeper than max_metadata_depth
    "metadata_too_large",  # more than max_metadata_bytes packed
    "metadata_unencodable",  # JSON or msgpack cannot carry it
)
EXPERIMENT_NAME_CHARS = 256  # experiment_name is repeated in every point message

WS_CLOSE_TRY_AGAIN_LATER = 1013
WS_CLOSE_GOING_AWAY = 1001

_ROW_DTYPE = np.dtype(
    [
        ("index", "<i8"),
        ("x", "<f8"),
        ("y", "<f8"),
        ("cluster", "<i8"),
        ("novelty", "<f8"),
        ("timestamp", "<f8"),
        ("total", "<f8"),
        ("autoencoder", "<f8"),
        ("dimred", "<f8"),
    ]
)


class PointStore:
    """A run's points in memory, columnar, keeping the newest `max_points` (a ring once full).

    Points are addressed by a sequence number (0 for the run's first point) so a backfilling
    client can resume where it was even while old points are being evicted.
    """

    def __init__(self, max_points: int, initial_capacity: int = 1024) -> None:
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.max_points = max_points
        self._capacity = min(initial_capacity, max_points)
        self._rows = np.zeros(self._capacity, dtype=_ROW_DTYPE)
        self._urls: list[str] = [""] * self._capacity
        self.first_seq = 0  # oldest sequence number still held
        self.end_seq = 0  # one past the newest

    def __len__(self) -> int:
        return self.end_seq - self.first_seq

    def append(self, row: tuple[Any, ...], url: str) -> bool:
        """Store one point; returns True when the oldest point had to be evicted to make room."""
        evicted = False
        if len(self) == self._capacity:
            if self._capacity < self.max_points:
                self._grow()
            else:
                self.first_seq += 1
                evicted = True
        # Positions are seq % capacity: before the first eviction every seq < capacity, and the
        # capacity stops changing once it reaches max_points, so growth never moves a row.
        pos = self.end_seq % self._capacity
        self._rows[pos] = row
        self._urls[pos] = url
        self.end_seq += 1
        return evicted

    def _grow(self) -> None:
        new_capacity = min(self._capacity * 2, self.max_points)
        rows = np.zeros(new_capacity, dtype=_ROW_DTYPE)
        rows[: self._capacity] = self._rows
        self._rows = rows
        self._urls.extend([""] * (new_capacity - self._capacity))
        self._capacity = new_capacity

    def rows(self, start: int, stop: int) -> list[tuple[tuple[Any, ...], str]]:
        """(row, url) pairs for sequence numbers in [start, stop) still held, as Python scalars."""
        start = max(start, self.first_seq)
        stop = min(stop, self.end_seq)
        if stop <= start:
            return []
        out: list[tuple[tuple[Any, ...], str]] = []
        for a, b in self._spans(start, stop):
            out.extend(zip(self._rows[a:b].tolist(), self._urls[a:b], strict=True))
        return out

    def set_clusters(self, indices: list[int], clusters: list[int]) -> int:
        """Give the held points with these frame numbers their corrected cluster ids; returns how many."""
        if not len(self) or not indices:
            return 0
        lookup = dict(zip(indices, clusters, strict=True))
        changed = 0
        for a, b in self._spans(self.first_seq, self.end_seq):
            held = self._rows["index"][a:b]
            hit = np.flatnonzero(np.isin(held, np.fromiter(lookup, np.int64, len(lookup))))
            for pos in hit:
                self._rows["cluster"][a + pos] = lookup[int(held[pos])]
            changed += len(hit)
        return changed

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        a, n = start % self._capacity, stop - start
        if a + n <= self._capacity:
            yield a, a + n
        else:
            yield a, self._capacity
            yield 0, a + n - self._capacity


def row_message(ctx: RunContext, row: tuple[Any, ...], url: str) -> dict[str, Any]:
    """The /lse point message for a stored row."""
    index, x, y, cluster, novelty, timestamp, total, ae, dr = row
    return wire.point_message(
        ctx,
        index=index,
        x=x,
        y=y,
        cluster=cluster,
        novelty=novelty,
        tiled_url=url,
        timestamp=timestamp,
        total_time=total,
        autoencoder_time=ae,
        dimred_time=dr,
    )


def row_dict(row: tuple[Any, ...], url: str) -> dict[str, Any]:
    """The compact REST form of a stored row (keys `wire.ROW_KEYS`)."""
    index, x, y, cluster, novelty, timestamp, *_ = row
    return {
        "index": index,
        "x": x,
        "y": y,
        "cluster": cluster,
        "novelty": novelty,
        "timestamp": timestamp,
        "tiled_url": url,
    }


@dataclass(slots=True)
class RunState:
    """One run as the hub knows it: its start/stop events, clusters and (while retained) its points."""

    ctx: RunContext
    run_key: str  # where the run is stored; also what /api/runs/{id} accepts for a past run
    run_name: str
    started_at: float
    start_event: dict[str, Any] | None  # only the current run's: new clients get no other run's start
    store: PointStore | None
    points: int = 0  # points published for the run (including evicted ones)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    stop_event: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    def summary(self, *, current: bool) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_key": self.run_key,
            "run_name": self.run_name,
            "experiment_name": self.ctx.experiment_name,
            "started_at": self.started_at,
            "stopped_at": self.stop_event["stopped_at"] if self.stop_event else None,
            "active": self.stop_event is None,
            "current": current,
            "num_points": self.points,
            "points_in_memory": len(self.store) if self.store is not None else 0,
            "new_clusters": len(self.clusters),  # founded during the run (cluster_new)
            "source": "memory",
        }


class SlowClientPolicy(enum.Enum):
    DROP_OLDEST = "drop_oldest"
    DISCONNECT = "disconnect"


class ClientState(enum.Enum):
    BACKFILL = "backfill"
    LIVE = "live"
    CLOSED = "closed"


class ClientClosed(Exception):
    """The hub closed this client (slow, or shutting down); the endpoint closes the socket with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


Payload = str | bytes


class Client:
    """One websocket connection's view of the hub: its bounded queue and, while joining, its backfill."""

    _ids = itertools.count(1)

    def __init__(
        self,
        hub: Hub,
        endpoint: str,
        fmt: WireFormat,
        policy: SlowClientPolicy,
        max_queue: int,
        backfill_chunk: int,
    ) -> None:
        self.id = next(self._ids)
        self.endpoint = endpoint
        self.fmt = fmt
        self.policy = policy
        self.max_queue = max_queue
        self.state = ClientState.LIVE
        self.queue: deque[Payload] = deque()
        self.sent = 0
        self._hub = hub
        self._wakeup = asyncio.Event()
        self._closed = asyncio.Event()
        self._close: ClientClosed | None = None
        self._backfill_chunk = backfill_chunk
        self._bf_run: RunState | None = None
        self._bf_cursor = 0
        self._bf_sent = 0
        self._bf_skipped = 0

    def __repr__(self) -> str:
        return f"Client(id={self.id}, endpoint={self.endpoint}, state={self.state.value})"

    # -- called by the hub (synchronously, on the loop) ---------------------------------------

    def start_backfill(self, run: RunState) -> None:
        self.state = ClientState.BACKFILL
        self._bf_run = run
        self._bf_cursor = run.store.first_seq if run.store is not None else 0

    def backfilling(self, run_id: str) -> bool:
        return (
            self.state is ClientState.BACKFILL and self._bf_run is not None and self._bf_run.run_id == run_id
        )

    def offer(self, payload: Payload) -> None:
        """Queue one payload without waiting; applies the slow-client policy when the queue is full."""
        if self.state is ClientState.CLOSED:
            return
        if len(self.queue) >= self.max_queue:
            if self.policy is SlowClientPolicy.DROP_OLDEST:
                self.queue.popleft()
                self._hub.count_drop("lse_slow_client")
            else:
                self._hub.count_drop("ws_slow_client")
                logger.warning("closing slow client %r: %d messages queued", self, len(self.queue))
                self.close(WS_CLOSE_TRY_AGAIN_LATER, "client too slow; reconnect")
                return
        self.queue.append(payload)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        self.queue.clear()
        self._bf_run = None
        self._close = ClientClosed(code, reason)
        self._wakeup.set()
        self._closed.set()

    @property
    def close_reason(self) -> ClientClosed | None:
        """Why the hub closed this client, or None while it is open."""
        return self._close

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- called by the connection's sender ----------------------------------------------------

    async def next_batch(self, max_items: int = 256) -> list[Payload]:
        """The next payloads to send, in order; waits while there is nothing.

        Raises `ClientClosed` once the hub closed this client.
        """
        while True:
            if self._close is not None:
                raise self._close
            if self.queue:
                n = min(len(self.queue), max_items)
                batch = [self.queue.popleft() for _ in range(n)]
                self.sent += n
                return batch
            if self.state is ClientState.BACKFILL:
                batch = self._backfill_batch()
                if batch:
                    self.sent += len(batch)
                    return batch
                continue  # caught up: the state is LIVE now and the queue holds the tail events
            self._wakeup.clear()
            await self._wakeup.wait()

    def _backfill_batch(self) -> list[Payload]:
        run = self._bf_run
        assert run is not None
        store = run.store
        if store is None:  # released while we were sending: the rest is only in the run catalog
            self._bf_skipped += max(run.points - self._bf_cursor, 0)
        else:
            if self._bf_cursor < store.first_seq:  # evicted while we were sending
                self._bf_skipped += store.first_seq - self._bf_cursor
                self._bf_cursor = store.first_seq
            rows = store.rows(self._bf_cursor, self._bf_cursor + self._backfill_chunk)
            if rows:
                self._bf_cursor += len(rows)
                self._bf_sent += len(rows)
                return [self._hub.encode_point_row(run.ctx, row, url, self.fmt) for row, url in rows]
        self._finish_backfill(run)
        return []

    def _finish_backfill(self, run: RunState) -> None:
        # Synchronous with the last store read, so no point published meanwhile is missed.
        tail: list[Payload] = []
        if self.fmt is not WireFormat.LSE_JSON:
            tail.append(
                wire.encode(wire.backfill_end_event(run.run_id, self._bf_sent, self._bf_skipped), self.fmt)
            )
            if run.stop_event is not None:
                tail.append(wire.encode(run.stop_event, self.fmt))
        self.queue.extendleft(reversed(tail))  # before anything queued while backfilling
        self.state = ClientState.LIVE
        self._bf_run = None
        logger.debug("client %r backfilled %d points of run %s", self, self._bf_sent, run.run_id)


class Hub:
    """Fans pipeline results out to websocket clients; keeps the current run for backfill.

    Must be used from the event loop that serves the app (publish is a coroutine that never awaits).
    """

    def __init__(
        self,
        model_info: ModelInfo,
        *,
        registry: CollectorRegistry | None = None,
        max_points: int = 200_000,
        max_past_points: int | None = None,
        max_runs: int = 32,
        lse_queue: int = 4096,
        ws_queue: int = 8192,
        backfill_chunk: int = 512,
        stats_window: int = 2048,
        max_metadata_depth: int = 32,
        max_metadata_bytes: int = 64 * 1024,
    ) -> None:
        """
        max_points: points kept in memory for the current run (oldest evicted beyond, counted).
        max_past_points: points kept in memory across finished runs (default: max_points); older
            runs' points are then only in the run catalog.
        max_runs: finished runs remembered in the in-memory run index.
        lse_queue / ws_queue: per-client queue bounds (messages).
        max_metadata_depth / max_metadata_bytes: a run's start metadata goes to every new /ws client;
            beyond these bounds (levels, bytes packed) clients get it as {} (counted by reason).
        """
        self.model_info = model_info
        self.max_points = max_points
        self.max_past_points = max_points if max_past_points is None else max_past_points
        self.max_runs = max_runs
        self.queue_bounds = {"lse": lse_queue, "ws": ws_queue}
        self.backfill_chunk = backfill_chunk
        self.max_metadata_depth = max_metadata_depth
        self.max_metadata_bytes = max_metadata_bytes
        self.current: RunState | None = None
        self._past: OrderedDict[str, RunState] = OrderedDict()  # newest last
        self._clients: dict[int, Client] = {}
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.points_total = 0
        self.clients_total = 0
        self._recent_arrivals: deque[float] = deque(maxlen=stats_window)
        self._recent_timings: deque[tuple[float, ...]] = deque(maxlen=stats_window)
        if registry is not None:
            registry.register(HubCollector(self))

    # -- the Publisher side ---------------------------------------------------------------------

    async def publish(self, message: RunStarted | Point | ClusterNew | ClusterUpdate | RunStopped) -> None:
        """Take one pipeline message; never waits for a client."""
        if isinstance(message, Point):
            self._on_point(message)
        elif isinstance(message, RunStarted):
            self._on_run_started(message)
        elif isinstance(message, ClusterNew):
            self._on_cluster_new(message)
        elif isinstance(message, ClusterUpdate):
            self._on_cluster_update(message)
        elif isinstance(message, RunStopped):
            self._on_run_stopped(message)
        else:
            self.count_drop("unsupported_message")
            logger.error("hub got an unsupported message type %s", type(message).__name__)

    def _on_run_started(self, msg: RunStarted) -> None:
        if self.current is not None and self.current.run_key == msg.run_key and self.current.stop_event is None:
            logger.warning("run %s started again while active; keeping its points", msg.run_id)
            return
        if self.current is not None:
            if self.current.stop_event is None:
                # The pipeline normally sends RunStopped(reason="superseded") first; close it here otherwise.
                self._on_run_stopped(
                    RunStopped(
                        self.current.run_id, msg.started_at, None, self.current.points, reason="superseded",
                        run_key=self.current.run_key,
                    )
                )
            self._retire(self.current)
        experiment = msg.metadata.get("experiment_name")
        if not isinstance(experiment, (str, int, float)) or experiment == "":
            experiment = msg.run_name or msg.run_id
        ctx = RunContext(
            run_id=msg.run_id, experiment_name=str(experiment)[:EXPERIMENT_NAME_CHARS], model=self.model_info
        )
        start_event = self._start_event(msg)
        self.current = RunState(
            ctx=ctx,
            run_key=msg.run_key,
            run_name=msg.run_name,
            started_at=float(msg.started_at),
            start_event=start_event,
            store=PointStore(self.max_points),
        )
        logger.info("run %s started (%s)", msg.run_id, msg.run_name)
        self._broadcast_event(start_event, run_id=None)

    def _start_event(self, msg: RunStarted) -> dict[str, Any]:
        """The run_start event, with the metadata only when every client can be sent it."""
        try:
            metadata = wire.client_metadata(
                msg.metadata, max_depth=self.max_metadata_depth, max_bytes=self.max_metadata_bytes
            )
        except wire.MetadataOmitted as exc:
            self.count_drop(exc.reason)
            logger.warning("run %r: start metadata not sent to clients (%s): %s", msg.run_id, exc.reason, exc)
            return wire.run_start_event(msg, self.model_info, {}, exc.reason)
        return wire.run_start_event(msg, self.model_info, metadata, None)

    def _on_point(self, point: Point) -> None:
        run = self.current
        if run is None or run.run_key != point.run_key:
            if point.run_key in self._past:
                self.count_drop("stale_run")
                logger.warning("dropping point %d of run %s: not the current run", point.index, point.run_id)
                return
            # A point for an unannounced run: open it implicitly rather than lose results.
            logger.warning(
                "point %d for unannounced run %s; starting it implicitly", point.index, point.run_id
            )
            self._on_run_started(RunStarted(point.run_id, point.run_id, float(point.timestamp), run_key=point.run_key))
            run = self.current
            assert run is not None
        if run.stop_event is not None:
            self.count_drop("stale_run")
            logger.warning("dropping point %d of run %s: the run already stopped", point.index, point.run_id)
            return
        if not (math.isfinite(point.x) and math.isfinite(point.y)):
            self.count_drop("non_finite_point")
            logger.warning("dropping point %d of run %s: non-finite position", point.index, point.run_id)
            return
        t = point.timings
        row = (
            int(point.index),
            float(point.x),
            float(point.y),
            int(point.cluster),
            float(point.novelty),
            float(point.timestamp),
            float(t.total),
            float(t.encode),
            float(t.project),
        )
        assert run.store is not None
        if run.store.append(row, point.tiled_url):
            self.count_drop("store_full")
        run.points += 1
        self.points_total += 1
        self._recent_arrivals.append(time.monotonic())
        self._recent_timings.append((t.queue, t.preprocess, t.encode, t.project, t.cluster, t.total))
        if not self._clients:
            return
        message = row_message(run.ctx, row, point.tiled_url)
        encoded: dict[WireFormat, Payload] = {}
        for client in self._clients.values():
            if client.state is ClientState.CLOSED or client.backfilling(run.run_id):
                continue  # a backfilling client reads this point from the store
            payload = encoded.get(client.fmt)
            if payload is None:
                body = message if client.fmt is WireFormat.LSE_JSON else wire.typed_point(message)
                payload = encoded[client.fmt] = wire.encode(body, client.fmt)
            client.offer(payload)

    def _on_cluster_new(self, msg: ClusterNew) -> None:
        run = self.current
        if run is None or run.run_id != msg.run_id:
            self.count_drop("stale_run")
            logger.warning("dropping cluster_new %d of run %s: not the current run", msg.cluster, msg.run_id)
            return
        event = wire.cluster_new_event(msg)
        run.clusters.append(event)
        self._broadcast_event(event, run_id=None)

    def _on_cluster_update(self, msg: ClusterUpdate) -> None:
        """Corrected ids of points already sent: the store takes them (backfill, REST), /ws clients get one
        cluster_update; /lse clients keep what they got. A client still backfilling gets it too: it applies it
        to the points it has, and reads the rest from the store, corrected."""
        run = self.current
        if run is None or run.run_key != msg.run_key:
            self.count_drop("stale_run")
            logger.warning("dropping cluster_update of run %s: not the current run", msg.run_id)
            return
        if run.store is not None:
            run.store.set_clusters(list(msg.indices), list(msg.clusters))
        self._broadcast_event(wire.cluster_update_event(msg), run_id=None)

    def _on_run_stopped(self, msg: RunStopped) -> None:
        run = self.current
        if run is None or run.run_key != msg.run_key or run.stop_event is not None:
            self.count_drop("stale_run")
            logger.warning("ignoring run_stop for run %s: not the current active run", msg.run_id)
            return
        run.stop_event = wire.run_stop_event(msg)
        logger.info("run %s stopped (%s): %d points", msg.run_id, msg.reason, run.points)
        # A client backfilling this run gets run_stop when its backfill ends.
        self._broadcast_event(run.stop_event, run_id=run.run_id)

    def _broadcast_event(self, event: dict[str, Any], *, run_id: str | None) -> None:
        """Typed events go to /ws clients only; skip clients backfilling `run_id`."""
        encoded: dict[WireFormat, Payload] = {}
        for client in self._clients.values():
            if client.fmt is WireFormat.LSE_JSON or client.state is ClientState.CLOSED:
                continue
            if run_id is not None and client.backfilling(run_id):
                continue
            payload = encoded.get(client.fmt)
            if payload is None:
                payload = encoded[client.fmt] = wire.encode(event, client.fmt)
            client.offer(payload)

    def _retire(self, run: RunState) -> None:
        """Move a finished run to the index; keep past points only within max_past_points."""
        run.start_event = None  # its summary stays; its metadata is in the run catalog
        self._past[run.run_key] = run
        self._past.move_to_end(run.run_key)
        while len(self._past) > self.max_runs:
            self._past.popitem(last=False)
        held = 0
        for past in reversed(self._past.values()):  # newest first keeps its points
            if past.store is None:
                continue
            if held + len(past.store) > self.max_past_points:
                past.store = None  # its points now live only in the run catalog
            else:
                held += len(past.store)

    # -- clients --------------------------------------------------------------------------------

    def connect(self, endpoint: str, fmt: WireFormat, *, backfill: bool) -> Client:
        """Register a client; with `backfill`, it first gets the current run's points so far.

        Synchronous on purpose: registration and the backfill snapshot happen at the same instant,
        so nothing published is missed or sent twice.
        """
        policy = SlowClientPolicy.DROP_OLDEST if endpoint == "lse" else SlowClientPolicy.DISCONNECT
        client = Client(self, endpoint, fmt, policy, self.queue_bounds[endpoint], self.backfill_chunk)
        run = self.current
        typed = fmt is not WireFormat.LSE_JSON
        if backfill and run is not None:
            if typed:
                held = len(run.store) if run.store is not None else 0
                assert run.start_event is not None  # the current run's is kept
                client.queue.append(wire.encode(run.start_event, fmt))
                client.queue.append(wire.encode(wire.backfill_start_event(run.run_id, held), fmt))
                client.queue.extend(wire.encode(event, fmt) for event in run.clusters)
            client.start_backfill(run)
        elif backfill and typed:
            client.queue.append(wire.encode(wire.backfill_start_event(None, 0), fmt))
            client.queue.append(wire.encode(wire.backfill_end_event(None, 0, 0), fmt))
        self._clients[client.id] = client
        self.clients_total += 1
        logger.info("client %d connected to /%s (%s, backfill=%s)", client.id, endpoint, fmt.value, backfill)
        return client

    def disconnect(self, client: Client) -> None:
        if self._clients.pop(client.id, None) is not None:
            client.close(1000, "disconnected")
            logger.info("client %d left /%s after %d messages", client.id, client.endpoint, client.sent)

    def close_all(self, code: int = WS_CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        for client in list(self._clients.values()):
            client.close(code, reason)

    def encode_point_row(self, ctx: RunContext, row: tuple[Any, ...], url: str, fmt: WireFormat) -> Payload:
        message = row_message(ctx, row, url)
        return wire.encode(message if fmt is WireFormat.LSE_JSON else wire.typed_point(message), fmt)

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # -- queries (REST, health, metrics) ---------------------------------------------------------

    def client_counts(self) -> dict[str, int]:
        counts = {"lse": 0, "ws": 0}
        for client in self._clients.values():
            counts[client.endpoint] = counts.get(client.endpoint, 0) + 1
        return counts

    def runs(self) -> list[dict[str, Any]]:
        """Current run first, then finished runs newest first."""
        return [run.summary(current=run is self.current) for run in self._newest_first()]

    def run_rows(self, run: str) -> list[dict[str, Any]] | None:
        """A run's points (by run key, else the latest run with that run id) from memory in the compact REST
        form, or None when memory does not hold them."""
        found = next((r for r in self._newest_first() if run in (r.run_key, r.run_id)), None)
        return None if found is None else self._rows_in_memory(found)

    def _newest_first(self) -> Iterator[RunState]:
        if self.current is not None:
            yield self.current
        yield from reversed(self._past.values())

    @staticmethod
    def _rows_in_memory(run: RunState) -> list[dict[str, Any]] | None:
        if run.store is None or len(run.store) < run.points:
            return None  # unknown, released, or partly evicted: the catalog has the full run
        return [row_dict(row, url) for row, url in run.store.rows(run.store.first_seq, run.store.end_seq)]

    def frames_per_second(self, window_s: float = 5.0) -> float:
        """Points published per second over the last `window_s` seconds."""
        now = time.monotonic()
        recent = [t for t in self._recent_arrivals if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-9)
        return len(recent) / span

    def stage_p50_ms(self) -> dict[str, float]:
        """Median per-stage milliseconds over the most recent points."""
        names = ("queue", "preprocess", "encode", "project", "cluster", "total")
        if not self._recent_timings:
            return dict.fromkeys(names, 0.0)
        medians = np.median(np.asarray(self._recent_timings, dtype=np.float64), axis=0) * 1e3
        return {name: round(float(v), 3) for name, v in zip(names, medians, strict=True)}


class HubCollector(Collector):
    """Exposes the hub's counters on a caller-owned prometheus registry (no global state)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = self._hub
        clients = GaugeMetricFamily(
            "latent_stream_bridge_clients", "Connected websocket clients", labels=["endpoint"]
        )
        for endpoint, n in hub.client_counts().items():
            clients.add_metric([endpoint], n)
        yield clients
        dropped = CounterMetricFamily(
            "latent_stream_bridge_dropped",
            "Messages, points or clients dropped, by reason",
            labels=["reason"],
        )
        for reason, n in hub.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(
            "latent_stream_bridge_points", "Points published to the hub", value=hub.points_total
        )
        yield CounterMetricFamily(
            "latent_stream_bridge_connections", "Websocket connections accepted", value=hub.clients_total
        )
        held = len(hub.current.store) if hub.current is not None and hub.current.store is not None else 0
        yield GaugeMetricFamily(
            "latent_stream_bridge_backfill_points", "Points of the current run held for backfill", value=held
        )
