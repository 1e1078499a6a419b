"""Persist frames and results to Tiled as they happen, off the per-frame path.

`TiledWriter` is a publisher (`async publish(message)`) with a second port for frames (`store_frame`, a
`FrameSink`): the pipeline hands it each frame that came without a tiled_url right before that frame's point,
and the point gives the frame its row. `publish` only logs the point to the run's result log (result_log.py)
and adds it, with its frame if one came, to the backlog (backlog.py); one background task, the write loop
(write_loop.py), writes the backlog to Tiled in order. Result logs left by a killed process are adopted and
replayed first (recovery.py).

  /<run_key>                  container, start metadata (the sender's run_id among it); "status" open -> closed
  /<run_key>/primary/image    (N, H, W) frames that came without a tiled_url, one chunk per frame,
                              slice i is the frame whose frame number is i
  /<run_key>/latent/points    appendable table, one row per processed frame (schema.POINT_COLUMNS)
  /<run_key>/latent/vectors   (N, D) float32 latent means; vectors row r <-> points row r ("row" column)
  /<run_key>/latent/cluster_updates  appendable table (update, index, cluster), created at the run's first
                              ClusterUpdate: re-clustering moved the point of frame `index` to `cluster`; the
                              points table keeps the id as sent, catalog.py applies the updates in order when
                              it reads a run. Updates are not in the result log: a crash loses those not written.

How frames reach Tiled: with the embedded server (`local_frames=True`), written into its own storage from
this process (local_frames.py); with a facility Tiled, PATCHed (tiled_http.py). Containers, arrays and
metadata are made with Tiled's client (tiled_nodes.py).

Each run is stored under its own key (`RunStarted.run_key`, see keys.py), never under the sender's run id:
a reused id gets a new node and a new result log. Nothing stored is overwritten: a frame number sent twice
in a run keeps its first frame ("duplicate_index"), and frame numbers above `max_frame_index` are not stored
("index_out_of_range", see `_refuse_frame`); their rows are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import numpy as np

from operators import point_row
from operators.messages import (
    ClusterNew,
    ClusterUpdate,
    Frame,
    PipelineMessage,
    Point,
    RunStarted,
    RunStopped,
)
from operators.persist import recovery
from operators.persist.backlog import Backlog
from operators.persist.errors import TiledRejected, translate
from operators.persist.local_frames import LocalFrameStore
from operators.persist.result_log import DIR_NAME, RecoveredRun, ResultLog
from operators.persist.runs import Row, RunState
from operators.persist.stats import FrameLag, WriterStats
from operators.persist.tiled_http import TiledHttp
from operators.persist.tiled_nodes import TiledNodes
from operators.persist.write_loop import WriteLoop, WriteSettings
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
        self.max_buffer_bytes = max_buffer_bytes  # frames waiting for Tiled, the oldest dropped beyond
        self.max_frame_index = max_frame_index
        self.request_timeout = request_timeout
        self.local_frames = local_frames  # the embedded server: frames go into its storage directly
        self.settings = WriteSettings(max_batch=max_batch, max_patch_bytes=max_patch_bytes,
                                      rows_interval=rows_interval, frames_linger=frames_linger,
                                      give_up_after=give_up_after, failed_attempts=failed_attempts)  # fmt: skip
        self._warn = ThrottledLog(logger)  # drops repeat per frame under overload; the counters stay exact
        self._result_log = ResultLog(Path(data_dir) / DIR_NAME)
        self._backlog = Backlog(self.max_buffer_bytes, self._warn)
        self._lag = FrameLag()
        self._loop: WriteLoop | None = None  # once connected
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # frames handed over by store_frame whose point has not come yet: at most a batch (the pipeline hands
        # a frame right before publishing its point)
        self._frames_in: dict[tuple[str, int], np.ndarray] = {}

    # ---- publisher side: never blocks -------------------------------------------------------

    def store_frame(self, frame: Frame) -> None:
        """The frame port (a `messages.FrameSink`): keep a frame to store until its point comes."""
        self._frames_in[(frame.run_key, frame.index)] = frame.image

    async def wait_for_room(self, timeout: float) -> None:
        """Back-pressure for a source that can wait: while more than three quarters of the frame buffer wait to
        be written and the writer is writing, wait (at most `timeout` s) until half is left.

        The embedded server's storage is this machine's disk: when it falls behind, slowing the pipeline (and,
        through its bounded inbox, the sender) keeps every frame, where a full buffer would drop the oldest. Not
        while Tiled is unreachable: an outage must never stall the live map (the buffer and its counters take it).
        """
        if not self._writing() or not self._backlog.nearly_full():
            return
        deadline = time.monotonic() + timeout
        while not self._backlog.drained.is_set() and self._writing():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):  # a look every 0.25 s: stop waiting as soon as writes fail
                await asyncio.wait_for(self._backlog.drained.wait(), min(remaining, 0.25))

    def _writing(self) -> bool:
        """Connected, and the last write did not fail: Tiled is taking what it is given."""
        return self.connected and self._loop is not None and not self._loop.failing

    async def publish(self, message: PipelineMessage) -> None:
        """Log and enqueue; returns without waiting for Tiled."""
        if isinstance(message, Point):
            self._enqueue_point(message)
        elif isinstance(message, RunStarted):
            self._enqueue_start(message)
        elif isinstance(message, RunStopped):
            self._enqueue_stop(message)
        elif isinstance(message, ClusterUpdate):
            st = self._backlog.run(message.run_key, message.run_id)
            self._backlog.add("update", (message.run_key, st.updates, list(message.indices), list(message.clusters)))
            st.updates += 1
        elif isinstance(message, ClusterNew):
            return
        self._backlog.wake.set()

    def _enqueue_start(self, m: RunStarted) -> None:
        # A new run closes runs recovered open after a crash (no source continues them: a resent run id
        # gets a new key).
        for st in list(self._backlog.runs.values()):
            if st.recovered_open:
                self._enqueue_stop(self._interrupted(st))
        st = self._backlog.run(m.run_key, m.run_id)
        start = {"run_key": m.run_key, "run_id": m.run_id, "run_name": m.run_name, "started_at": m.started_at,
                 "metadata": m.metadata}  # fmt: skip
        st.start = start
        self._result_log.append(m.run_key, {"t": "start", **start})
        self._backlog.add("start", m.run_key)

    @staticmethod
    def _interrupted(st: RunState) -> RunStopped:
        """The stop of a run recovered open that no source will close."""
        return RunStopped(st.run_id, time.time(), None, st.next_row, reason="interrupted", run_key=st.run_key)

    def _enqueue_point(self, p: Point) -> None:
        st = self._backlog.run(p.run_key, p.run_id)
        row = st.next_row
        st.next_row += 1
        values = {"row": row, **point_row.values(p)}
        latent = np.ascontiguousarray(p.latent, dtype=np.float32).reshape(-1)
        image = self._frames_in.pop((p.run_key, p.index), None) if p.stored_by_service else None
        if p.stored_by_service and image is None:  # the pipeline's frame sink is not connected to this writer
            st.frames_not_written["frame_not_received"] += 1
            self._warn.warning("frame_not_received", "run %s frame %d not stored: its frame never reached the "
                               "writer", p.run_key, p.index)  # fmt: skip
        elif image is not None and (refused := self._refuse_frame(st, p.index)):
            image = None
            st.frames_not_written[refused] += 1
            self._warn.warning(refused, "run %s frame %d not stored: %s", p.run_key, p.index, refused)
        elif image is not None:
            st.frame_indices.add(p.index)
        self._result_log.append(
            p.run_key,
            {"t": "point", "run_key": p.run_key, "run_id": p.run_id, **values, "stored_by_service": image is not None,
             "latent": latent.tobytes()},
        )  # fmt: skip
        self._backlog.add_row(
            Row(p.run_key, row, int(p.index), values, latent, image, float(p.timestamp), time.monotonic())
        )

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

    def _enqueue_stop(self, m: RunStopped) -> None:
        st = self._backlog.run(m.run_key, m.run_id)
        st.recovered_open = False
        for key in [k for k in self._frames_in if k[0] == m.run_key]:  # their points never came (a failed publish)
            del self._frames_in[key]
            st.frames_not_written["point_not_received"] += 1
        stop = {"stopped_at": m.stopped_at, "num_frames": m.num_frames, "processed": m.processed,
                "reason": m.reason}  # fmt: skip
        self._result_log.append(m.run_key, {"t": "stop", "run_key": m.run_key, "run_id": m.run_id, **stop})
        self._backlog.add("stop", (m.run_key, stop))

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (see `start_soon`) and wait until connected and the result logs are replayed."""
        task = self.start_soon()
        connected = asyncio.ensure_future(self._connected.wait())
        await asyncio.wait([task, connected], return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if task.done():
            task.result()  # connecting or replaying failed: raise that

    def start_soon(self, tiled_ready: Callable[[], Awaitable[object]] | None = None) -> asyncio.Task[None]:
        """Adopt the result logs, then write in the background; publishing may begin at once.

        The background task awaits `tiled_ready()` (e.g. the embedded server coming up), connects
        (retrying for as long as Tiled is unreachable), replays the result logs into Tiled, then writes
        what was published meanwhile and after. It fails when `tiled_ready()` raises or Tiled refuses
        the writer (e.g. a wrong API key); the caller watches the returned task.
        """
        result_log = self._result_log
        recovered = [rec for rec in result_log.recover() if recovery.adopt(self._backlog, result_log, rec)]
        self._task = asyncio.create_task(self._serve(tiled_ready, recovered), name="tiled-writer")
        return self._task

    @property
    def connected(self) -> bool:
        """Connected to Tiled, result logs replayed: writing."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def _serve(self, tiled_ready: Callable[[], Awaitable[object]] | None, recovered: list[RecoveredRun]) -> None:
        if tiled_ready is not None:
            await tiled_ready()
        loop = self._loop = await self._connect()
        for rec in recovered:
            await recovery.replay(loop, rec)
        self._connected.set()
        await loop.run()

    async def _connect(self) -> WriteLoop:
        # No give_up_after here: the live path runs without Tiled (points flow, rows wait in memory and in
        # the result logs), so an unreachable Tiled is waited for; one that refuses us (bad key) is fatal.
        delay = 0.2
        while True:
            try:
                nodes = await asyncio.to_thread(
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
        http = TiledHttp(self.base_url, self.api_key, root=self.root, timeout=self.request_timeout)
        local = LocalFrameStore(http.client, self.base_url) if self.local_frames else None
        return WriteLoop(self._backlog, self._result_log, nodes, http, local, self.settings, self._lag,
                         self._warn)  # fmt: skip

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Write what is buffered (up to `drain_timeout`), close recovered-open runs, stop."""
        backlog = self._backlog
        for st in list(backlog.runs.values()):
            if st.recovered_open:
                self._enqueue_stop(self._interrupted(st))
        backlog.wake.set()
        backlog.closing = True
        deadline = time.monotonic() + drain_timeout
        while backlog.ops and time.monotonic() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # a failure of the task is for its watcher (see start_soon)
            self._task = None
        for kind, item in backlog.ops:  # left in the result log: the next start replays the rows
            if kind == "row":
                backlog.run(item.run_key).rows_not_written["shutdown"] += 1
                backlog.drop_image(item, "shutdown")
        backlog.ops.clear()
        self._result_log.close()
        if self._loop is not None:
            await self._loop.http.aclose()
            await asyncio.to_thread(self._loop.nodes.close)
            self._loop = None

    async def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything enqueued so far is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        self._backlog.flushing += 1
        self._backlog.wake.set()
        try:
            while self._backlog.ops or (self._loop is not None and self._loop.busy):
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            self._backlog.flushing -= 1

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- counters -------------------------------------------------------------------------------

    def stats(self) -> WriterStats:
        runs = self._backlog.runs.values()
        fnw: collections.Counter[str] = collections.Counter()
        rnw: collections.Counter[str] = collections.Counter()
        for st in runs:
            fnw.update(st.frames_not_written)
            rnw.update(st.rows_not_written)
        stats = WriterStats(
            frames_written=sum(st.frames_written for st in runs),
            frame_requests=self._loop.frame_requests if self._loop else 0,
            rows_written=sum(st.rows_written for st in runs),
            frames_not_written=dict(fnw),
            rows_not_written=dict(rnw),
            retries=self._loop.retries if self._loop else 0,
            logs_set_aside=self._result_log.logs_set_aside,
            buffered_rows=self._backlog.rows_waiting(),
            buffered_bytes=self._backlog.buffered_bytes,
        )
        self._lag.fill(stats)
        return stats

    def run_counts(self, run_key: str) -> dict[str, Any]:
        """Per-run persistence counters (for the run report)."""
        st = self._backlog.runs.get(run_key)
        return {} if st is None else st.counts()
