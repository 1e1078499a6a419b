"""Persist frames and results to Tiled as they happen, off the per-frame path.

`TiledWriter` is a publisher (`async publish(message)`): `publish` only logs the point to the
run's result log (see wal.py) and enqueues it; one background task writes to Tiled, the frames in
order, a few per request (one PATCH per run of consecutive indices, up to `max_patch_bytes`; a frame
waits up to `frames_linger` seconds for others to join it), and the rows in batches (up to
`max_batch` rows or `rows_interval` seconds, after their frames). Why frames wait: Tiled spends
~30 ms of CPU per request on top of its per-byte cost, so at 10 Hz one PATCH per frame costs the
embedded server ~20% more CPU than one per 0.3 s (benchmarks/persist.py), on a machine whose cores
the live path needs too; 0.3 s is small against the 2 s in which a frame must be fetchable.

  /<run_key>                  container, start metadata (the sender's run_id among it); "status" open -> closed
  /<run_key>/primary/image    (N, H, W) frames that came without a tiled_url, one chunk per frame,
                             slice i is the frame whose frame number is i
  /<run_key>/latent/points    appendable table, one row per processed frame (columns in POINT_SCHEMA)
  /<run_key>/latent/vectors   (N, D) float32 latent means; vectors row r <-> points row r ("row" column)
  /<run_key>/latent/cluster_updates  appendable table (update, index, cluster), created at the run's first
                             ClusterUpdate: re-clustering moved the point of frame `index` to `cluster`; the
                             points table keeps the id as sent, catalog.py applies the updates in order when
                             it reads a run. Updates are not in the result log: a crash loses those not written.

Buffer policy (bounded): frames waiting to be written are bounded by `max_buffer_bytes`; when full,
the OLDEST waiting frame image is dropped and counted (frames_not_written["buffer_full"]); its row is
kept (rows are small and also in the result log). A batch that fails because Tiled is not there
(connection refused, timeout, 502/503/504) is retried with exponential backoff for up to
`give_up_after` seconds, then counted as not written ("tiled_unreachable"); one that Tiled answers
with another 5xx is tried `failed_attempts` times ("failed_by_tiled"), and a 4xx is counted at once
("rejected_by_tiled"), so that one bad request never holds up the runs behind it. Appending rows is
not idempotent, so before re-appending after an ambiguous failure the writer reads the table's "row"
column and skips what already landed.

Each run is stored under its own key (`RunStarted.run_key`, see keys.py), never under the sender's
run id: a reused id gets a new node and a new result log. Nothing stored is overwritten: a frame
number sent twice in a run keeps its first frame ("duplicate_index"), and frame numbers above
`max_frame_index` are not stored ("index_out_of_range", see `_refuse_frame`); their rows are.

Resume after a crash: on start every result log left in the data directory is adopted at once and,
once Tiled answers and before anything published since, replayed into it: rows missing from Tiled
are appended (vectors too), frames the log does not mark as written are counted as lost
("lost_in_crash": the image died with the process), and a run whose log has a `stop` record is
closed. A run without one is closed with reason "interrupted" when another run starts or the writer
stops. A log that cannot be replayed (unreadable, or a node Tiled refuses) is moved aside
(wal.SET_ASIDE_DIR), counted (`logs_set_aside`, rows "unreplayable") and logged: it never stops the
writer from starting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import numpy as np

from operators.messages import ClusterNew, ClusterUpdate, PipelineMessage, Point, RunStarted, RunStopped
from operators.persist.errors import TiledFailed, TiledRejected, translate
from operators.persist.keys import is_safe_key
from operators.persist.local_frames import LocalFrameStore
from operators.persist.runs import BatchOutcome, Row, RunState, consecutive, jsonable
from operators.persist.schema import POINT_COLUMNS, UPDATE_COLUMNS, arrow_file
from operators.persist.stats import FrameLag, WriterStats
from operators.persist.tiled_http import TiledHttp
from operators.persist.tiled_nodes import TiledNodes
from operators.persist.wal import RecoveredRun, ResultLog
from operators.throttled_log import ThrottledLog

logger = logging.getLogger(__name__)


class TiledWriter:
    """Publisher that persists frames and results into a Tiled server (see module doc)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        data_dir: Path | str,
        root: str = "",
        max_buffer_bytes: int = 512 * 2**20,
        max_batch: int = 16,
        max_patch_bytes: int = 64 * 2**20,
        rows_interval: float = 1.0,
        frames_linger: float = 0.3,
        give_up_after: float = 300.0,
        failed_attempts: int = 3,
        max_frame_index: int = 1_000_000,
        request_timeout: float = 30.0,
        local_frames: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.root = root.strip("/")
        self.max_buffer_bytes = max_buffer_bytes
        self.max_batch = max_batch
        self.max_patch_bytes = max_patch_bytes
        self.rows_interval = rows_interval
        self.frames_linger = frames_linger
        self.give_up_after = give_up_after
        self.failed_attempts = failed_attempts
        self.max_frame_index = max_frame_index
        self.request_timeout = request_timeout
        self.local_frames = local_frames  # the embedded server: frames go into its storage directly
        self._local: LocalFrameStore | None = None
        self._log = ResultLog(Path(data_dir) / "results-log")
        # One FIFO of operations keeps the per-run order: start, rows..., stop.
        self._ops: collections.deque[tuple[str, Any]] = collections.deque()
        self._frame_queue: collections.deque[Row] = (
            collections.deque()
        )  # rows holding an image, oldest first
        self._buffered_bytes = 0
        self._wake = asyncio.Event()
        self._runs: dict[str, RunState] = {}
        self._task: asyncio.Task[None] | None = None
        self._nodes: TiledNodes | None = None  # containers, arrays, metadata (connected in _connect)
        self._http: TiledHttp | None = None  # frames, vectors and rows
        self._flushing = 0  # flush() callers waiting: write rows now rather than batch them
        self._lag = FrameLag()
        self._retries = 0
        self._frame_requests = 0
        self._warn = ThrottledLog(logger)  # drops repeat per frame under overload; the counters stay exact
        self._closing = False
        self._busy = False
        self._connected = asyncio.Event()

    # ---- publisher side: never blocks -------------------------------------------------------

    async def publish(self, message: PipelineMessage) -> None:
        """Log and enqueue; returns without waiting for Tiled."""
        if isinstance(message, Point):
            self._enqueue_point(message)
        elif isinstance(message, RunStarted):
            self._enqueue_start(message)
        elif isinstance(message, RunStopped):
            self._enqueue_stop(message)
        elif isinstance(message, ClusterUpdate):
            st = self._run(message.run_key, message.run_id)
            self._ops.append(("update", (message.run_key, st.updates, list(message.indices), list(message.clusters))))
            st.updates += 1
        elif isinstance(message, ClusterNew):
            return
        self._wake.set()

    def _run(self, run_key: str, run_id: str | None = None) -> RunState:
        st = self._runs.get(run_key)
        if st is None:
            st = self._runs[run_key] = RunState(run_key, run_key if run_id is None else run_id)
        return st

    def _enqueue_start(self, m: RunStarted) -> None:
        # A new run closes runs recovered open after a crash that nobody continued.
        for st in list(self._runs.values()):
            if st.recovered_open:
                self._enqueue_stop(self._interrupted(st))
        st = self._run(m.run_key, m.run_id)
        start = {
            "run_key": m.run_key,
            "run_id": m.run_id,
            "run_name": m.run_name,
            "started_at": m.started_at,
            "metadata": m.metadata,
        }
        st.start = start
        self._log.append(m.run_key, {"t": "start", **start})
        self._ops.append(("start", m.run_key))

    @staticmethod
    def _interrupted(st: RunState) -> RunStopped:
        """The stop of a run recovered open that no source will close."""
        return RunStopped(st.run_id, time.time(), None, st.next_row, reason="interrupted", run_key=st.run_key)

    def _enqueue_point(self, p: Point) -> None:
        st = self._run(p.run_key, p.run_id)
        row = st.next_row
        st.next_row += 1
        values = {
            "row": row,
            "index": int(p.index),
            "x": float(p.x),
            "y": float(p.y),
            "cluster": int(p.cluster),
            "novelty": float(p.novelty),
            "timestamp": float(p.timestamp),
            "processing_time": float(p.timings.total),
            "encode_time": float(p.timings.encode),
            "project_time": float(p.timings.project),
            "tiled_url": p.tiled_url,
        }
        latent = np.ascontiguousarray(p.latent, dtype=np.float32).reshape(-1)
        image = p.image if (p.stored_by_service and p.image is not None) else None
        if image is not None and (refused := self._refuse_frame(st, p.index)):
            image = None
            st.frames_not_written[refused] += 1
            self._warn.warning(refused, "run %s frame %d not stored: %s", p.run_key, p.index, refused)
        elif image is not None:
            st.frame_indices.add(p.index)
        self._log.append(
            p.run_key,
            {"t": "point", "run_key": p.run_key, "run_id": p.run_id, **values, "stored_by_service": image is not None,
             "latent": latent.tobytes()},
        )  # fmt: skip
        r = Row(p.run_key, row, int(p.index), values, latent, image, float(p.timestamp), time.monotonic())
        self._ops.append(("row", r))
        if image is not None:
            self._frame_queue.append(r)
            self._buffered_bytes += image.nbytes
            while self._buffered_bytes > self.max_buffer_bytes and self._frame_queue:
                self._drop_image(self._frame_queue.popleft(), "buffer_full")

    def _refuse_frame(self, st: RunState, index: int) -> str | None:
        """Why a frame must not be stored, if it must not.

        A resent frame number would overwrite the frame stored first. Tiled describes the frame stack
        with one chunk per frame up to the highest index, so its cost for every later request grows with
        that index (~3 s per request at 10**7, 26 s at 10**8, a dead server at 2**31 here): one absurd
        frame number must not make storage crawl.
        """
        if index in st.frame_indices:
            return "duplicate_index"
        if index > self.max_frame_index:
            return "index_out_of_range"
        return None

    def _drop_image(self, r: Row, reason: str) -> None:
        if r.image is None:
            return
        self._buffered_bytes -= r.image.nbytes
        r.image = None
        dropped = self._run(r.run_key).frames_not_written
        dropped[reason] += 1
        self._warn.warning(reason, "run %s frame %d not written to Tiled: %s (%d so far in this run)",
                           r.run_key, r.index, reason, dropped[reason])  # fmt: skip

    def _enqueue_stop(self, m: RunStopped) -> None:
        st = self._run(m.run_key, m.run_id)
        st.recovered_open = False
        stop = {"stopped_at": m.stopped_at, "num_frames": m.num_frames, "processed": m.processed,
                "reason": m.reason}  # fmt: skip
        self._log.append(m.run_key, {"t": "stop", "run_key": m.run_key, "run_id": m.run_id, **stop})
        self._ops.append(("stop", (m.run_key, stop)))

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (see `start_soon`) and wait until connected and the crash logs are replayed."""
        task = self.start_soon()
        connected = asyncio.ensure_future(self._connected.wait())
        await asyncio.wait([task, connected], return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if task.done():
            task.result()  # connecting or replaying failed: raise that

    def start_soon(self, tiled_ready: Callable[[], Awaitable[object]] | None = None) -> asyncio.Task[None]:
        """Adopt the crash logs, then write in the background; publishing may begin at once.

        The background task awaits `tiled_ready()` (e.g. the embedded server coming up), connects
        (retrying for as long as Tiled is unreachable), replays the crash logs into Tiled, then writes
        what was published meanwhile and after. It fails when `tiled_ready()` raises or Tiled refuses
        the writer (e.g. a wrong API key); the caller watches the returned task.
        """
        recovered = []
        for rec in self._log.recover():
            try:
                self._adopt(rec)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                self._set_aside(rec, f"{type(exc).__name__}: {exc}")
            else:
                recovered.append(rec)
        self._task = asyncio.create_task(self._serve(tiled_ready, recovered), name="tiled-writer")
        return self._task

    @property
    def connected(self) -> bool:
        """Connected to Tiled, crash logs replayed: writing."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def _serve(self, tiled_ready: Callable[[], Awaitable[object]] | None, recovered: list[RecoveredRun]) -> None:
        if tiled_ready is not None:
            await tiled_ready()
        await self._connect()
        for rec in recovered:
            await self._replay(rec)
        self._connected.set()
        await self._loop()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Write what is buffered (up to `drain_timeout`), close recovered-open runs, stop."""
        for st in list(self._runs.values()):
            if st.recovered_open:
                self._enqueue_stop(self._interrupted(st))
        self._wake.set()
        self._closing = True
        deadline = time.monotonic() + drain_timeout
        while self._ops and time.monotonic() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # a failure of the task is for its watcher (see start_soon)
            self._task = None
        for kind, item in self._ops:  # left in the result log: the next start replays the rows
            if kind == "row":
                self._run(item.run_key).rows_not_written["shutdown"] += 1
                if item.image is not None:
                    self._drop_image(item, "shutdown")
        self._ops.clear()
        self._log.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._nodes is not None:
            await asyncio.to_thread(self._nodes.close)
            self._nodes = None

    async def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything enqueued so far is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        self._flushing += 1
        self._wake.set()
        try:
            while self._ops or self._busy:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            self._flushing -= 1

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> WriterStats:
        fnw: collections.Counter[str] = collections.Counter()
        rnw: collections.Counter[str] = collections.Counter()
        for st in self._runs.values():
            fnw.update(st.frames_not_written)
            rnw.update(st.rows_not_written)
        stats = WriterStats(
            frames_written=sum(st.frames_written for st in self._runs.values()),
            frame_requests=self._frame_requests,
            rows_written=sum(st.rows_written for st in self._runs.values()),
            frames_not_written=dict(fnw),
            rows_not_written=dict(rnw),
            retries=self._retries,
            logs_set_aside=self._log.logs_set_aside,
            buffered_rows=sum(1 for k, _ in self._ops if k == "row"),
            buffered_bytes=self._buffered_bytes,
        )
        self._lag.fill(stats)
        return stats

    def run_counts(self, run_key: str) -> dict[str, Any]:
        """Per-run persistence counters (for the run report)."""
        st = self._runs.get(run_key)
        return {} if st is None else st.counts()

    # ---- the write loop -------------------------------------------------------------------------

    async def _connect(self) -> None:
        # No give_up_after here: the live path runs without Tiled (points flow, rows wait in memory and in
        # the result logs), so an unreachable Tiled is waited for; one that refuses us (bad key) is fatal.
        delay = 0.2
        while True:
            try:
                self._nodes = await asyncio.to_thread(
                    TiledNodes.connect, self.base_url, self.api_key, root=self.root, timeout=self.request_timeout
                )
                break
            except Exception as exc:
                err = translate(exc)
                if isinstance(err, TiledRejected):
                    raise err from exc
                self._warn.warning("connect", "Tiled at %s not reachable yet (%s); retrying", self.base_url, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._http = TiledHttp(self.base_url, self.api_key, root=self.root, timeout=self.request_timeout)
        if self.local_frames:
            self._local = LocalFrameStore(self._http.client, self.base_url)

    async def _loop(self) -> None:
        while True:
            if not self._ops:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._busy = True
            try:
                await self._step()
            finally:
                self._busy = False

    async def _step(self) -> None:
        """Write the operation at the head of the queue (and a batch of rows behind it)."""
        kind, item = self._ops[0]
        if kind == "row":
            batch: list[Row] = []
            boundary = False  # the batch ends at another run / a start / a stop: no point waiting
            for k, it in self._ops:
                if k != "row" or it.run_key != item.run_key:
                    boundary = True
                    break
                if len(batch) >= self.max_batch:
                    break
                batch.append(it)
            # Frames wait up to `frames_linger` to share a PATCH (each is fetchable once its PATCH
            # returns); rows wait up to `rows_interval` to be written in batches (one vectors PATCH
            # + one table append), after their frames so that a visible row's tiled_url resolves.
            self._wake.clear()
            now = time.monotonic()
            hurry = boundary or len(batch) >= self.max_batch or self._closing or self._flushing > 0
            waiting = [r for r in batch if r.image is not None]
            if waiting and not hurry and not self._frames_due(waiting, now):
                await self._sleep_until_woken(waiting[0].queued_at + self.frames_linger - now)
                return
            await self._write_frames(batch)
            if not (hurry or time.monotonic() - batch[0].queued_at >= self.rows_interval):
                if len(self._ops) > len(batch) or any(r.image is not None for r in batch):
                    return  # more arrived while the frames were written
                await self._sleep_until_woken(batch[0].queued_at + self.rows_interval - time.monotonic())
                return
            await self._write_batch(batch)
            for _ in batch:
                self._ops.popleft()
        elif kind == "start":
            await self._with_retry(f"start of run {item}", self._ensure_run, item)
            self._ops.popleft()
        elif kind == "update":  # after the rows it corrects (one FIFO); appending it twice changes nothing
            await self._with_retry(f"cluster update of run {item[0]}", self._write_update, *item)
            self._ops.popleft()
        elif kind == "stop":
            run_key, stop = item
            failed = await self._with_retry(f"stop of run {run_key}", self._close_run, run_key, stop)
            self._ops.popleft()
            if self._local is not None:
                self._local.forget(self._image_path(run_key))
            if not failed and not any(
                k == "row" and it.run_key == run_key for k, it in self._ops
            ):  # everything of this run is in Tiled
                self._log.discard(run_key)

    def _frames_due(self, waiting: list[Row], now: float) -> bool:
        """Write now: the oldest waiting frame has lingered long enough, or a full PATCH is waiting."""
        return (
            now - waiting[0].queued_at >= self.frames_linger
            or sum(r.image.nbytes for r in waiting if r.image is not None) >= self.max_patch_bytes
        )

    async def _sleep_until_woken(self, timeout: float) -> None:
        """Until publish() brings something new, or `timeout` s pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))

    async def _with_retry(self, what: str, fn: Any, *args: Any) -> str | None:
        """Run `fn(*args, attempt)` (a coroutine function on the loop, else in a worker thread),
        retrying transient errors.

        Returns None on success, else the reason it gave up: "rejected_by_tiled" (4xx, at once),
        "failed_by_tiled" (5xx `failed_attempts` times) or "tiled_unreachable" (for `give_up_after` s).
        """
        delay = 0.2
        t0 = time.monotonic()
        attempt = 0
        is_async = inspect.iscoroutinefunction(fn)
        while True:
            try:
                if is_async:
                    await fn(*args, attempt)
                else:
                    await asyncio.to_thread(fn, *args, attempt)
                return None
            except Exception as exc:  # noqa: BLE001 - translated at this boundary
                err = translate(exc)
                attempt += 1
                if isinstance(err, TiledRejected):
                    logger.error("Tiled rejected %s: %s", what, err)
                    return "rejected_by_tiled"
                if isinstance(err, TiledFailed) and attempt >= self.failed_attempts:
                    logger.error("Tiled failed %s %d times, dropped: %s", what, attempt, err)
                    return "failed_by_tiled"
                if time.monotonic() - t0 > self.give_up_after or (self._closing and attempt > 3):
                    logger.error("giving up on %s after %d attempts: %s", what, attempt, err)
                    return "tiled_unreachable"
                self._retries += 1
                logger.warning(
                    "writing %s to Tiled failed (%s); retry %d in %.1f s", what, err, attempt, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_frames(self, batch: list[Row]) -> None:
        """Write the frames still waiting in `batch`, in order; bookkeeping on the loop.

        Frames with consecutive indices go in one PATCH (up to `max_patch_bytes`): Tiled's server
        spends ~30 ms of CPU per request on top of its per-byte cost, so under load, when frames
        queue up behind a slow write, fewer larger writes let it catch up. Only the frames of the
        PATCH in flight leave the droppable buffer.
        """
        if not any(r.image is not None for r in batch):
            return
        run_key = batch[0].run_key  # a batch holds one run's rows
        st = self._run(run_key)
        if st.image_shape is None:
            first = next(r for r in batch if r.image is not None)
            failed = await self._with_retry(
                f"image array of run {run_key}", self._ensure_image_array, run_key, first.image
            )
            if failed:
                for r in batch:
                    if r.image is not None:
                        self._take_image(r)
                        st.frames_not_written[failed] += 1
                return
        while group := self._next_patch(batch, st):
            first, last = group[0][0].index, group[-1][0].index
            what = f"frame {first} of run {run_key}" if first == last else f"frames {first}-{last} of run {run_key}"
            try:
                failed = await self._with_retry(what, self._store_frames, run_key, first, [im for _, im in group])
            except asyncio.CancelledError:  # stop() gave up draining while these frames were in flight
                st.frames_not_written["shutdown"] += len(group)
                raise
            if failed:
                st.frames_not_written[failed] += len(group)
                continue
            self._frame_requests += 1
            now = time.time()
            for r, _ in group:
                self._lag.record(now - r.published_at)
                st.frames_written += 1
                self._log.append(run_key, {"t": "frame_ok", "run_key": run_key, "index": r.index})

    def _next_patch(self, batch: list[Row], st: RunState) -> list[tuple[Row, np.ndarray]]:
        """Take the next frames to write out of the buffer: consecutive indices, up to `max_patch_bytes`.

        A frame whose shape or dtype differs from the run's first frame is counted and skipped.
        """
        group: list[tuple[Row, np.ndarray]] = []
        size = 0
        for r in batch:
            if r.image is None:
                continue
            image = r.image
            if (tuple(image.shape), image.dtype.str) != (st.image_shape, st.image_dtype):
                self._take_image(r)
                st.frames_not_written["shape_mismatch"] += 1
                self._warn.warning("shape_mismatch", "run %s frame %d not written: shape/dtype differs from "
                                   "the run's first frame", r.run_key, r.index)  # fmt: skip
                continue
            if group and (r.index != group[-1][0].index + 1 or size + image.nbytes > self.max_patch_bytes):
                break
            group.append((r, self._take_image(r)))
            size += image.nbytes
        return group

    def _take_image(self, r: Row) -> np.ndarray:
        """Out of the droppable buffer: the frame is in flight (or counted) now."""
        image = r.image
        assert image is not None
        self._buffered_bytes -= image.nbytes
        r.image = None
        self._frame_queue.remove(r)
        return image

    async def _write_batch(self, batch: list[Row]) -> None:
        """Write one batch of rows (points table + latent vectors); bookkeeping stays on the loop."""
        out = BatchOutcome()
        run_key = batch[0].run_key
        failed = await self._with_retry(f"rows of run {run_key}", self._write_rows, batch, out)
        st = self._run(run_key)
        st.rows_written += out.rows_done
        if failed:
            st.rows_not_written[failed] += len(batch) - out.rows_done - out.rows_skipped

    # ---- data: frames, vectors, rows (on the event loop) -----------------------------------------

    def _image_path(self, run_key: str) -> str:
        assert self._http is not None
        return self._http.path(run_key, "primary", "image")

    async def _store_frames(self, run_key: str, first: int, images: list[np.ndarray], attempt: int = 0) -> None:
        """Slices first, first + 1, ... of /<run>/primary/image: into the embedded server's storage when it
        is on this machine (local_frames.py), else one PATCH. Idempotent: safe to retry."""
        assert self._http is not None
        if self._local is None:
            await self._http.patch_frames(run_key, first, images)
            return
        path = self._image_path(run_key)
        if not self._local.knows(path):
            await self._local.open(path)
        await self._local.write(path, first, images)

    async def _write_rows(self, batch: list[Row], out: BatchOutcome, attempt: int = 0) -> None:
        assert self._http is not None and self._nodes is not None
        run_key = batch[0].run_key
        st = self._run(run_key)
        if not st.created:
            await asyncio.to_thread(self._ensure_run, run_key)
        rows = batch
        if attempt > 0:  # the previous append may have landed: skip rows already there
            present = await asyncio.to_thread(self._nodes.rows_present, run_key)
            rows = [r for r in batch if r.row not in present]
            out.rows_skipped = len(batch) - len(rows)
        if not rows:
            return
        dim = rows[0].latent.shape[0]
        if st.vectors_dim is None:
            await asyncio.to_thread(self._ensure_vectors_array, run_key, dim)
        for group in consecutive(rows, key=lambda r: r.row):  # idempotent: rewriting the same rows
            await self._http.patch_vectors(run_key, group[0].row, np.stack([r.latent for r in group]))
        await self._http.append_table(run_key, "points", arrow_file([r.values for r in rows], POINT_COLUMNS))
        out.rows_done = len(rows)

    async def _write_update(self, run_key: str, seq: int, indices: list[int], clusters: list[int],
                            attempt: int = 0) -> None:  # fmt: skip
        assert self._http is not None
        st = self._run(run_key)
        if not st.updates_created:
            await asyncio.to_thread(self._ensure_updates_table, run_key)
        rows = [{"update": seq, "index": i, "cluster": c} for i, c in zip(indices, clusters, strict=True)]
        await self._http.append_table(run_key, "cluster_updates", arrow_file(rows, UPDATE_COLUMNS))

    # ---- nodes (worker thread): the run's containers, arrays and metadata ----------------------------

    def _ensure_run(self, run_key: str, attempt: int = 0) -> None:
        assert self._nodes is not None
        st = self._run(run_key)
        start = st.start or {"run_name": st.run_id, "started_at": time.time(), "metadata": {}}
        md = {**jsonable(start.get("metadata") or {}), "run_id": st.run_id, "run_key": run_key,
              "run_name": start["run_name"], "started_at": start["started_at"], "status": "open",
              "writer": "latent-stream"}  # fmt: skip
        self._nodes.ensure_run(run_key, md)
        st.created = True

    def _ensure_image_array(self, run_key: str, first: np.ndarray, attempt: int = 0) -> None:
        """Create (or find, after a restart) /<run>/primary/image; remember its frame shape and dtype."""
        assert self._nodes is not None
        st = self._run(run_key)
        if not st.created:
            self._ensure_run(run_key)
        st.image_shape, st.image_dtype = self._nodes.ensure_array(run_key, "primary", "image", first.shape,
                                                                  first.dtype)  # fmt: skip

    def _ensure_vectors_array(self, run_key: str, dim: int, attempt: int = 0) -> None:
        assert self._nodes is not None
        (row_dim,), _ = self._nodes.ensure_array(run_key, "latent", "vectors", (dim,), np.dtype(np.float32))
        self._run(run_key).vectors_dim = row_dim

    def _ensure_updates_table(self, run_key: str) -> None:
        assert self._nodes is not None
        st = self._run(run_key)
        if not st.created:
            self._ensure_run(run_key)
        self._nodes.ensure_table(run_key, "cluster_updates", UPDATE_COLUMNS)
        st.updates_created = True

    def _close_run(self, run_key: str, stop: dict[str, Any], attempt: int = 0) -> None:
        assert self._nodes is not None
        st = self._run(run_key)
        if not st.created:
            self._ensure_run(run_key)
        md = {"status": "closed", **jsonable(stop), "rows": st.next_row, "persist": st.counts()}
        self._nodes.update_metadata(run_key, md)

    # ---- crash recovery -------------------------------------------------------------------------

    def _adopt(self, rec: RecoveredRun) -> None:
        """Take over a logged run's state, before anything new is published."""
        st = self._run(rec.run_key, rec.run_id)
        if rec.start is not None:
            st.start = {"run_name": str(rec.start.get("run_name") or rec.run_id),
                        "started_at": float(rec.start.get("started_at") or 0.0),
                        "metadata": dict(rec.start.get("metadata") or {})}  # fmt: skip
        st.next_row = max((int(p["row"]) for p in rec.points), default=-1) + 1
        lost = sum(
            1 for p in rec.points if p.get("stored_by_service") and int(p["index"]) not in rec.frames_ok
        )
        if lost:
            st.frames_not_written["lost_in_crash"] += lost
            logger.warning(
                "run %s (%s): %d frames died with the previous process before reaching Tiled",
                rec.run_id, rec.run_key, lost,
            )  # fmt: skip
        st.frames_written += len(rec.frames_ok)
        st.frame_indices.update(rec.frames_ok)
        st.recovered_open = rec.stop is None

    async def _replay(self, rec: RecoveredRun) -> None:
        """Bring Tiled up to date with an adopted run, or set its log aside if that cannot be done.

        A log that cannot be replayed (a key Tiled refuses, records it cannot take) must never stop the
        writer from starting: a restart that fails on it would fail on every restart after it.
        """
        if not is_safe_key(rec.run_key):  # a log from a version that stored runs under the raw id
            self._set_aside(rec, f"{rec.run_key!r} is not a safe storage key")
            return
        try:
            failed = await self._replay_rows(rec)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the log must not block the start
            self._set_aside(rec, f"{type(exc).__name__}: {exc}")
            return
        if failed == "tiled_unreachable":
            return  # the log stays: the next start replays it
        if failed:
            self._set_aside(rec, failed)
        elif rec.stop is not None:
            self._log.discard(rec.run_key)

    async def _replay_rows(self, rec: RecoveredRun) -> str | None:
        """The run's node, the rows Tiled lacks, its close; the reason it gave up, if it did."""
        st = self._run(rec.run_key)
        if failed := await self._with_retry(f"recovery of run {rec.run_key}", self._ensure_run, rec.run_key):
            return failed
        rows = [
            Row(rec.run_key, int(p["row"]), int(p["index"]), {name: p[name] for name, _ in POINT_COLUMNS},
                 np.frombuffer(p["latent"], dtype=np.float32), None, float(p["timestamp"]))
            for p in rec.points
        ]  # fmt: skip
        assert self._nodes is not None
        present = await asyncio.to_thread(self._nodes.rows_present, rec.run_key)
        missing = [r for r in rows if r.row not in present]
        st.rows_written += len(present)
        for i in range(0, len(missing), 256):
            await self._write_batch(missing[i : i + 256])
        logger.info("run %s (%s) recovered: %d rows in the log, %d re-appended",
                    rec.run_id, rec.run_key, len(rows), len(missing))  # fmt: skip
        if rec.stop is None:
            return None
        stop = {k: rec.stop.get(k) for k in ("stopped_at", "num_frames", "processed", "reason")}
        return await self._with_retry(f"close of run {rec.run_key}", self._close_run, rec.run_key, stop)

    def _set_aside(self, rec: RecoveredRun, why: str) -> None:
        st = self._run(rec.run_key)
        st.recovered_open = False
        unstored = len(rec.points) - st.rows_written - sum(st.rows_not_written.values())
        if unstored > 0:
            st.rows_not_written["unreplayable"] += unstored
        path = self._log.set_aside(rec.run_key)
        logger.error("result log of run %s (%s) cannot be replayed into Tiled (%s); moved to %s",
                     rec.run_id, rec.run_key, why, path)  # fmt: skip

