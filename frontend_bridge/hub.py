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

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client.core import CollectorRegistry

from operators import point_row
from operators.messages import ClusterNew, ClusterUpdate, Point, RunStarted, RunStopped

from . import wire
from .clients import WS_CLOSE_GOING_AWAY, Client, ClientState, Payload, SlowClientPolicy
from .hub_metrics import HubCollector
from .point_store import PointStore
from .run_state import RunState
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
        row = point_row.values(point)
        assert run.store is not None
        if run.store.append(row):
            self.count_drop("store_full")
        run.points += 1
        self.points_total += 1
        self._recent_arrivals.append(time.monotonic())
        self._recent_timings.append((t.queue, t.preprocess, t.encode, t.project, t.cluster, t.total))
        if not self._clients:
            return
        message = wire.point_message(run.ctx, row)
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

    def encode_point_row(self, ctx: RunContext, row: dict[str, Any], fmt: WireFormat) -> Payload:
        message = wire.point_message(ctx, row)
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
        return [point_row.rest_row(row) for row in run.store.rows(run.store.first_seq, run.store.end_seq)]

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
