"""``tiled://HOST:PORT/PATH[?field=NAME]``: follow the bluesky runs ``TiledWriter`` writes into a Tiled container.

Every new run in the container at PATH becomes a run here (run id: the start document's ``uid``; name and
metadata from it), every frame appended to its image array a `Frame` whose ``tiled_url`` is that frame's Tiled
URI (the service stores nothing twice), and the stop document closes it (``num_events`` of the image's stream
is the announced frame count: frames never written are ``lost_upstream``).

How it follows: websocket subscriptions (tiled_watch.py) on the container, and on the current run's nodes, wake
the source; it then reads the current state over HTTP (tiled_reader.py) and delivers frames from the last index
it delivered, a few at a time. So a service started mid-run catches up from frame 0, a dropped websocket
connects again and what was appended meanwhile is read, never twice; a slow pipeline slows the reads (frames
wait in Tiled, not here). A poll every ``poll_s`` seconds covers a lost message (Tiled's streams are
at-most-once).

Which runs: at start, the newest run if it is still open (no stop document); then every run that appears.
Run state, run keys, superseded runs and gap counts are `stream.ingest.IngestDecoder`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson

from operators.base import Listener
from operators.throttled_log import ThrottledLog
from operators.tiled_layout import auth_headers
from stream.ingest import IngestDecoder, IngestMessage
from stream.protocol import Event, ProtocolError, Start, Stop, WireMessage
from stream.sources import SourceContext
from stream.sources.tiled_reader import ImageArray, RunInfo, TiledRunReader
from stream.sources.tiled_watch import watch
from stream.sources.url import TiledSource

log = logging.getLogger(__name__)

RECENT_RUNS = 16  # runs listed per look: more new runs than this while the source was away are not seen
READ_BYTES = 32 * 1024 * 1024  # frames read per request, at most (at least one frame)
READ_FRAMES = 8
_START_KEYS = ("uid", "time", "scan_id", "plan_name", "plan_type", "detectors", "num_points", "sample")


@dataclass(slots=True)
class _Followed:
    """The run being delivered: how far, and where its frames are."""

    run: RunInfo
    next_index: int = 0  # every frame before it was handed on (or counted as rejected)
    array: ImageArray | None = None
    watched: set[str] = field(default_factory=set)  # node paths whose websocket ended (closed by the writer)
    ambiguous_logged: bool = False


class TiledLiveSource(Listener):
    """An arroyopy ``Listener`` that follows ``spec``'s container until `stop`."""

    def __init__(self, spec: TiledSource, ctx: SourceContext, *, poll_s: float = 5.0) -> None:
        super().__init__(ctx.operator)
        self.spec = spec
        self.metrics = ctx.metrics
        self.limits = ctx.limits
        self.poll_s = poll_s
        self.decoder = IngestDecoder(ctx.metrics, ctx.limits)
        self._headers = auth_headers(ctx.api_key)  # never logged
        self._seen: set[str] = set()
        self._current: _Followed | None = None
        self._listed_once = False
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._warn = ThrottledLog(log)

    async def wait_connected(self) -> None:
        """Returns once the source has looked at the container once (successfully or not)."""
        await self._connected.wait()

    async def start(self) -> None:
        self._task = asyncio.current_task()
        async with httpx.AsyncClient(
            headers=self._headers, timeout=httpx.Timeout(30.0, connect=10.0)
        ) as client:
            reader = TiledRunReader(client, self.spec.base_url, self.spec.path, self.spec.field)
            self._watch(reader, self.spec.path, until_closed=False)
            self._wake.set()
            log.info("following bluesky runs in %s", self.spec.describe())
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._wake.wait()
                    self._wake.clear()
                    try:
                        await self._look(reader)
                    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                        self._warn.warning("unreadable", "cannot read %s now (%s); trying again",
                                           self.spec.describe(), type(exc).__name__)  # fmt: skip
                    finally:
                        self._connected.set()
                    self._rewatch(reader)
            finally:
                for task in self._watchers.values():
                    task.cancel()
                await asyncio.gather(*self._watchers.values(), return_exceptions=True)
                self._watchers.clear()

    async def stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    # -- what changed ------------------------------------------------------------------------------------

    async def _look(self, reader: TiledRunReader) -> None:
        """Deliver what was written since the last look: the current run's frames, its stop, new runs."""
        if self._current is not None:
            try:
                await self._advance(reader, self._current)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != httpx.codes.NOT_FOUND:
                    raise
                # Deleted (or no longer readable with this key): it cannot go on, and must not hold up new runs.
                log.warning("run %s is gone from %s; closing it", self._current.run.uid, self.spec.describe())
                self._current = None
                await self._handle(Stop(num_frames=None, metadata={}))
        runs = await reader.recent_runs(RECENT_RUNS)
        if not self._listed_once:
            self._listed_once = True
            self._seen = {run.uid for run in runs}
            if runs and runs[0].stop is None:  # a run in progress: caught up from its first frame
                await self._open(reader, runs[0])
            return
        for run in sorted((run for run in runs if run.uid not in self._seen), key=_start_time):
            await self._open(reader, run)
        # Only runs still in the listed window can come back: the rest need not be remembered.
        self._seen &= {run.uid for run in runs} | ({self._current.run.uid} if self._current else set())

    async def _open(self, reader: TiledRunReader, run: RunInfo) -> None:
        self._seen.add(run.uid)
        # A run still open here never got its stop: IngestDecoder closes it as superseded.
        await self._handle(Start(run_id=run.uid, run_name=_run_name(run.start), tiled_url=reader.run_url(run),
                                 metadata=self._start_metadata(run)))  # fmt: skip
        self._current = _Followed(run)
        await self._advance(reader, self._current)

    async def _advance(self, reader: TiledRunReader, followed: _Followed) -> None:
        """Frames of the followed run from ``next_index`` on; its stop once every frame is delivered."""
        followed.run = await reader.run(followed.run)  # the stop document, if any, is read before the frames
        if followed.array is None:
            found = await reader.image_array(followed.run)
            if isinstance(found, list):
                if not followed.ambiguous_logged:
                    followed.ambiguous_logged = True
                    log.error("run %s has several image arrays (%s): name one with ?field=NAME",
                              followed.run.uid, ", ".join(found))  # fmt: skip
            else:
                followed.array = found
        if followed.array is not None:
            followed.array = await reader.refresh(followed.array)
            await self._deliver(reader, followed, followed.array)
        if followed.run.stop is not None and self._current is followed:
            await self._handle(Stop(num_frames=_num_frames(followed), metadata={}))
            self._current = None

    async def _deliver(self, reader: TiledRunReader, followed: _Followed, array: ImageArray) -> None:
        problem = array.problem(self.limits)
        while followed.next_index < array.frames:
            start = followed.next_index
            if problem is not None:  # every frame of the array is refused for the same reason, each counted
                self._reject(problem, followed.run.uid, start)
                followed.next_index += 1
                continue
            assert array.dtype is not None
            height, width = array.frame_shape
            frame_bytes = height * width * array.dtype.itemsize
            stop = min(array.frames, start + max(1, min(READ_FRAMES, READ_BYTES // frame_bytes)))
            try:
                data = await reader.read(array, start, stop)
            except ProtocolError as exc:  # the server sent something else than those frames
                for index in range(start, stop):
                    self._reject(exc, followed.run.uid, index)
                followed.next_index = stop
                continue
            received_at, received_perf = time.time(), time.perf_counter()
            frames = np.frombuffer(data, dtype=array.dtype).reshape(stop - start, height, width)
            for offset, image in enumerate(frames):
                index = start + offset
                followed.next_index = index + 1
                if self.limits.reject_non_finite and array.dtype.kind == "f" and not np.isfinite(image).all():
                    self._reject(
                        ProtocolError("non_finite", "frame contains NaN or inf"), followed.run.uid, index
                    )
                    continue
                await self._handle(Event(frame_number=index, image=image, tiled_url=reader.frame_url(array, index)),
                                   received_at, received_perf)  # fmt: skip

    # -- into the pipeline -------------------------------------------------------------------------------

    async def _handle(self, message: WireMessage, received_at: float | None = None,
                      received_perf: float | None = None) -> None:  # fmt: skip
        self.metrics.received.inc()
        now = time.time() if received_at is None else received_at
        perf = time.perf_counter() if received_perf is None else received_perf
        try:
            out: list[IngestMessage] = self.decoder.handle(message, now, perf)
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self._warn.warning(
                exc.reason, "rejected (%s) in run %s: %s", exc.reason, self.decoder.run_id, exc.detail
            )
            return
        try:
            for item in out:
                await self.operator.submit(item)
        except asyncio.CancelledError:
            self.metrics.dropped.labels(
                "shutdown"
            ).inc()  # the handled message (the last) never reached the queue
            raise

    def _reject(self, exc: ProtocolError, run_id: str, index: int) -> None:
        self.metrics.received.inc()
        self.metrics.rejected.labels(exc.reason).inc()
        self._warn.warning(
            exc.reason, "rejected frame %d (%s) in run %s: %s", index, exc.reason, run_id, exc.detail
        )

    def _start_metadata(self, run: RunInfo) -> dict[str, object]:
        """The start document, or its main keys when it is larger than the metadata limits allow."""
        start = run.start
        if (
            len(orjson.dumps(start)) <= self.limits.max_metadata_bytes
            and _depth(start) <= self.limits.max_metadata_depth
        ):
            return dict(start)
        log.warning(
            "run %s: start document over the metadata limits; keeping %s", run.uid, ", ".join(_START_KEYS)
        )
        return {
            key: start[key] for key in _START_KEYS if key in start and not isinstance(start[key], dict | list)
        }

    # -- websockets --------------------------------------------------------------------------------------

    def _rewatch(self, reader: TiledRunReader) -> None:
        """Subscribe to the nodes whose changes matter now: the container, and the current run's nodes up to its
        image array (the run, its streams while no array is known, then the array alone)."""
        wanted = {self.spec.path}
        followed = self._current
        if followed is not None:
            if followed.array is not None:
                wanted.add(followed.array.path)
            else:
                wanted.add(followed.run.path)
                wanted.update(f"{followed.run.path}/{stream}" for stream in _streams_of(followed))
            wanted -= followed.watched
        for path in set(self._watchers) - wanted:
            self._watchers.pop(path).cancel()
        for path in wanted - set(self._watchers):
            self._watch(reader, path, until_closed=path != self.spec.path)

    def _watch(self, reader: TiledRunReader, path: str, *, until_closed: bool) -> None:
        task = asyncio.create_task(watch(reader.stream_url(path), self._headers, self._wake, self.metrics,
                                         name=path, max_size=self.limits.max_message_bytes,
                                         until_closed=until_closed), name=f"tiled-watch {path}")  # fmt: skip
        self._watchers[path] = task
        followed = self._current
        if followed is not None:
            task.add_done_callback(lambda t, p=path, f=followed: _ended(t, p, f))


def build(spec: TiledSource, ctx: SourceContext) -> TiledLiveSource:
    return TiledLiveSource(spec, ctx)


def _ended(task: asyncio.Task[None], path: str, followed: _Followed) -> None:
    """A node whose stream its writer closed is not subscribed to again (it would stay silent)."""
    if not task.cancelled() and task.exception() is None:
        followed.watched.add(path)


def _streams_of(followed: _Followed) -> list[str]:
    hints = followed.run.start.get("hints")
    dims = hints.get("dimensions") if isinstance(hints, dict) else None
    names = {"primary"}
    for entry in dims if isinstance(dims, list) else []:
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            names.add(entry[1])
    return sorted(names)


def _run_name(start: dict[str, object]) -> str:
    plan, scan = start.get("plan_name"), start.get("scan_id")
    parts = [str(part) for part in (plan, f"scan {scan}" if scan is not None else None) if part is not None]
    return " ".join(parts)


def _start_time(run: RunInfo) -> float:
    value = run.start.get("time")
    return float(value) if isinstance(value, int | float) else 0.0


def _num_frames(followed: _Followed) -> int | None:
    """Frames the stop document announces for the image's stream (one per event), if it says."""
    stop = followed.run.stop or {}
    events = stop.get("num_events")
    if followed.array is None or not isinstance(events, dict):
        return None
    count = events.get(followed.array.stream)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def _depth(doc: object) -> int:
    """How deeply containers nest in ``doc`` (iterative: JSON may nest deeper than Python recurses)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (child, level + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return deepest
