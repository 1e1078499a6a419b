"""The writer's one background task: takes the backlog's operations in order and writes them to Tiled.

Frames go in order, a few per request (one per run of consecutive indices, up to `max_patch_bytes`; a
frame waits up to `frames_linger` seconds for others to join it), and rows in batches (up to `max_batch`
rows or `rows_interval` seconds, after their frames, so that a visible row's tiled_url resolves). Why
frames wait: Tiled spends ~30 ms of CPU per request on top of its per-byte cost, so at 10 Hz one PATCH per
frame cost the embedded server ~20% more CPU than one per 0.3 s (benchmarks/persist.py), on a machine
whose cores the live path needs too; 0.3 s is small against the 2 s in which a frame must be fetchable.

Retries (`with_retry`): a write that fails because Tiled is not there (connection refused, timeout,
502/503/504) is retried with exponential backoff for up to `give_up_after` seconds ("tiled_unreachable");
one that Tiled answers with another 5xx is tried `failed_attempts` times ("failed_by_tiled"); a 4xx is
counted at once ("rejected_by_tiled"): one bad request never holds up the runs behind it. Appending rows is
not idempotent, so before re-appending after an ambiguous failure the loop reads which rows landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.persist.backlog import Backlog
from operators.persist.errors import TiledFailed, TiledRejected, translate
from operators.persist.local_frames import LocalFrameStore
from operators.persist.result_log import ResultLog
from operators.persist.runs import BatchOutcome, Row, RunState, consecutive
from operators.persist.schema import POINT_COLUMNS, UPDATE_COLUMNS, arrow_file
from operators.persist.stats import FrameLag
from operators.persist.tiled_http import TiledHttp
from operators.persist.tiled_nodes import TiledNodes
from operators.run_metadata import jsonable
from operators.throttled_log import ThrottledLog
from operators.tiled_layout import CLUSTER_UPDATES, IMAGE, LATENT, POINTS, PRIMARY, VECTORS

logger = logging.getLogger(__name__)

FRAMES_AHEAD = 4  # batches of rows whose frames may be written before the first batch's rows


@dataclass(frozen=True, slots=True)
class WriteSettings:
    max_batch: int = 16
    max_patch_bytes: int = 64 * 2**20
    rows_interval: float = 1.0
    frames_linger: float = 0.3
    give_up_after: float = 300.0
    failed_attempts: int = 3


class WriteLoop:
    """Writes `backlog` to Tiled through `nodes` (containers, arrays, metadata), `http` (vectors, rows and,
    without `local`, frames) and `local` (frames into the embedded server's own storage)."""

    def __init__(self, backlog: Backlog, result_log: ResultLog, nodes: TiledNodes, http: TiledHttp,
                 local: LocalFrameStore | None, settings: WriteSettings, lag: FrameLag,
                 warn: ThrottledLog) -> None:  # fmt: skip
        self.backlog = backlog
        self.result_log = result_log
        self.nodes = nodes
        self.http = http
        self.local = local
        self.settings = settings
        self.lag = lag
        self.retries = 0
        self.frame_requests = 0
        self.failing = False  # the last attempt to write failed and is being retried (an outage, or Tiled erring)
        self.busy = False  # an operation is being written (flush() waits for it)
        self._warn = warn

    async def run(self) -> None:
        backlog = self.backlog
        while True:
            if not backlog.ops:
                backlog.wake.clear()
                await backlog.wake.wait()
                continue
            self.busy = True
            try:
                await self._step()
            finally:
                self.busy = False

    async def _step(self) -> None:
        """Write the operation at the head of the queue (and a batch of rows behind it)."""
        ops, s = self.backlog.ops, self.settings
        kind, item = ops[0]
        if kind == "row":
            ahead: list[Row] = []  # this run's rows at the head, up to FRAMES_AHEAD batches
            boundary = False  # they end at another run / a start / a stop: no point waiting
            for k, it in ops:
                if k != "row" or it.run_key != item.run_key:
                    boundary = True
                    break
                if len(ahead) >= s.max_batch * FRAMES_AHEAD:
                    break
                ahead.append(it)
            batch = ahead[: s.max_batch]
            self.backlog.wake.clear()
            now = time.monotonic()
            hurry = boundary or len(batch) >= s.max_batch or self.backlog.closing or self.backlog.flushing > 0
            waiting = [r for r in ahead if r.image is not None]
            if waiting and not hurry and not self._frames_due(waiting, now):
                await self._sleep_until_woken(waiting[0].queued_at + s.frames_linger - now)
                return
            # Frames do not queue behind rows: a slow table append (Tiled's DuckDB, ~25 ms and more under
            # load) must not hold the frames of the rows behind it.
            await self._write_frames(ahead)
            if not (hurry or time.monotonic() - batch[0].queued_at >= s.rows_interval):
                if len(ops) > len(batch) or any(r.image is not None for r in batch):
                    return  # more arrived while the frames were written
                await self._sleep_until_woken(batch[0].queued_at + s.rows_interval - time.monotonic())
                return
            await self.write_batch(batch)
            for _ in batch:
                ops.popleft()
        elif kind == "start":
            await self.with_retry(f"start of run {item}", self.ensure_run, item)
            ops.popleft()
        elif kind == "update":  # after the rows it corrects (one FIFO); appending it twice changes nothing
            await self.with_retry(f"cluster update of run {item[0]}", self._write_update, *item)
            ops.popleft()
        elif kind == "stop":
            run_key, stop = item
            failed = await self.with_retry(f"stop of run {run_key}", self.close_run, run_key, stop)
            ops.popleft()
            if self.local is not None:
                self.local.forget(self._image_path(run_key))
            if not failed and not any(k == "row" and it.run_key == run_key for k, it in ops):
                self.result_log.discard(run_key)  # everything of this run is in Tiled

    def _frames_due(self, waiting: list[Row], now: float) -> bool:
        """Write now: the oldest waiting frame has lingered long enough, or a full request is waiting."""
        return (
            now - waiting[0].queued_at >= self.settings.frames_linger
            or sum(r.image.nbytes for r in waiting if r.image is not None) >= self.settings.max_patch_bytes
        )

    async def _sleep_until_woken(self, timeout: float) -> None:
        """Until the intake brings something new, or `timeout` s pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.backlog.wake.wait(), max(timeout, 0.0))

    async def with_retry(self, what: str, fn: Any, *args: Any) -> str | None:
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
                self.failing = False
                return None
            except Exception as exc:  # noqa: BLE001 - translated at this boundary
                err = translate(exc)
                attempt += 1
                self.failing = True
                if isinstance(err, TiledRejected):
                    logger.error("Tiled rejected %s: %s", what, err)
                    return "rejected_by_tiled"
                if isinstance(err, TiledFailed) and attempt >= self.settings.failed_attempts:
                    logger.error("Tiled failed %s %d times, dropped: %s", what, attempt, err)
                    return "failed_by_tiled"
                if time.monotonic() - t0 > self.settings.give_up_after or (self.backlog.closing and attempt > 3):
                    logger.error("giving up on %s after %d attempts: %s", what, attempt, err)
                    return "tiled_unreachable"
                self.retries += 1
                logger.warning("writing %s to Tiled failed (%s); retry %d in %.1f s", what, err, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- frames --------------------------------------------------------------------------------

    async def _write_frames(self, batch: list[Row]) -> None:
        """Write the frames still waiting in `batch`, in order; bookkeeping on the loop.

        Frames with consecutive indices go in one request (up to `max_patch_bytes`): under load, when
        frames queue up behind a slow write, fewer larger writes let Tiled catch up. Only the frames of the
        request in flight leave the droppable buffer.
        """
        if not any(r.image is not None for r in batch):
            return
        run_key = batch[0].run_key  # a batch holds one run's rows
        st = self.backlog.run(run_key)
        if st.image_shape is None:
            first = next(r for r in batch if r.image is not None)
            failed = await self.with_retry(
                f"image array of run {run_key}", self._ensure_image_array, run_key, first.image
            )
            if failed:
                for r in batch:
                    if r.image is not None:
                        self.backlog.take_image(r)
                        st.frames_not_written[failed] += 1
                return
        while group := self._next_group(batch, st):
            first, last = group[0][0].index, group[-1][0].index
            what = f"frame {first} of run {run_key}" if first == last else f"frames {first}-{last} of run {run_key}"
            try:
                failed = await self.with_retry(what, self._store_frames, run_key, first, [im for _, im in group])
            except asyncio.CancelledError:  # stop() gave up draining while these frames were in flight
                st.frames_not_written["shutdown"] += len(group)
                raise
            if failed:
                st.frames_not_written[failed] += len(group)
                continue
            self.frame_requests += 1
            now = time.time()
            for r, _ in group:
                self.lag.record(now - r.published_at)
                st.frames_written += 1
                self.result_log.append(run_key, {"t": "frame_ok", "run_key": run_key, "index": r.index})

    def _next_group(self, batch: list[Row], st: RunState) -> list[tuple[Row, np.ndarray]]:
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
                self.backlog.take_image(r)
                st.frames_not_written["shape_mismatch"] += 1
                self._warn.warning("shape_mismatch", "run %s frame %d not written: shape/dtype differs from "
                                   "the run's first frame", r.run_key, r.index)  # fmt: skip
                continue
            if group and (r.index != group[-1][0].index + 1 or size + image.nbytes > self.settings.max_patch_bytes):
                break
            group.append((r, self.backlog.take_image(r)))
            size += image.nbytes
        return group

    def _image_path(self, run_key: str) -> str:
        return self.http.path(run_key, PRIMARY, IMAGE)

    async def _store_frames(self, run_key: str, first: int, images: list[np.ndarray], attempt: int = 0) -> None:
        """Slices first, first + 1, ... of /<run>/primary/image: into the embedded server's storage when it
        is on this machine (local_frames.py), else one PATCH. Idempotent: safe to retry."""
        if self.local is None:
            await self.http.patch_frames(run_key, first, images)
            return
        path = self._image_path(run_key)
        if not self.local.knows(path):
            await self.local.open(path)
        await self.local.write(path, first, images)

    # ---- rows and cluster updates ---------------------------------------------------------------

    async def write_batch(self, batch: list[Row]) -> None:
        """Write one batch of rows (points table + latent vectors); bookkeeping stays on the loop."""
        out = BatchOutcome()
        run_key = batch[0].run_key
        failed = await self.with_retry(f"rows of run {run_key}", self._write_rows, batch, out)
        st = self.backlog.run(run_key)
        st.rows_written += out.rows_done
        if failed:
            st.rows_not_written[failed] += len(batch) - out.rows_done - out.rows_skipped

    async def _write_rows(self, batch: list[Row], out: BatchOutcome, attempt: int = 0) -> None:
        run_key = batch[0].run_key
        st = self.backlog.run(run_key)
        if not st.created:
            await asyncio.to_thread(self.ensure_run, run_key)
        rows = batch
        if attempt > 0:  # the previous append may have landed: skip rows already there
            present = await asyncio.to_thread(self.nodes.rows_present, run_key)
            rows = [r for r in batch if r.row not in present]
            out.rows_skipped = len(batch) - len(rows)
        if not rows:
            return
        dim = rows[0].latent.shape[0]
        if st.vectors_dim is None:
            await asyncio.to_thread(self._ensure_vectors_array, run_key, dim)
        for group in consecutive(rows, key=lambda r: r.row):  # idempotent: rewriting the same rows
            await self.http.patch_vectors(run_key, group[0].row, np.stack([r.latent for r in group]))
        await self.http.append_table(run_key, POINTS, arrow_file([r.values for r in rows], POINT_COLUMNS))
        out.rows_done = len(rows)

    async def _write_update(self, run_key: str, seq: int, indices: list[int], clusters: list[int],
                            attempt: int = 0) -> None:  # fmt: skip
        st = self.backlog.run(run_key)
        if not st.updates_created:
            await asyncio.to_thread(self._ensure_updates_table, run_key)
        rows = [{"update": seq, "index": i, "cluster": c} for i, c in zip(indices, clusters, strict=True)]
        await self.http.append_table(run_key, CLUSTER_UPDATES, arrow_file(rows, UPDATE_COLUMNS))

    # ---- nodes (worker thread): the run's containers, arrays and metadata -----------------------

    def ensure_run(self, run_key: str, attempt: int = 0) -> None:
        st = self.backlog.run(run_key)
        start = st.start or {"run_name": st.run_id, "started_at": time.time(), "metadata": {}}
        metadata = jsonable(start.get("metadata") or {}, bytes_as="repr")  # the run's record: bytes kept
        md = {**metadata, "run_id": st.run_id, "run_key": run_key,
              "run_name": start["run_name"], "started_at": start["started_at"], "status": "open",
              "writer": "latent-stream"}  # fmt: skip
        self.nodes.ensure_run(run_key, md)
        st.created = True

    def _ensure_image_array(self, run_key: str, first: np.ndarray, attempt: int = 0) -> None:
        """Create (or find, after a restart) /<run>/primary/image; remember its frame shape and dtype."""
        st = self.backlog.run(run_key)
        if not st.created:
            self.ensure_run(run_key)
        st.image_shape, st.image_dtype = self.nodes.ensure_array(run_key, PRIMARY, IMAGE, first.shape,
                                                                 first.dtype)  # fmt: skip

    def _ensure_vectors_array(self, run_key: str, dim: int, attempt: int = 0) -> None:
        (row_dim,), _ = self.nodes.ensure_array(run_key, LATENT, VECTORS, (dim,), np.dtype(np.float32))
        self.backlog.run(run_key).vectors_dim = row_dim

    def _ensure_updates_table(self, run_key: str) -> None:
        st = self.backlog.run(run_key)
        if not st.created:
            self.ensure_run(run_key)
        self.nodes.ensure_table(run_key, CLUSTER_UPDATES, UPDATE_COLUMNS)
        st.updates_created = True

    def close_run(self, run_key: str, stop: dict[str, Any], attempt: int = 0) -> None:
        st = self.backlog.run(run_key)
        if not st.created:
            self.ensure_run(run_key)
        md = {"status": "closed", **jsonable(stop, bytes_as="repr"), "rows": st.next_row,
              "persist": st.counts()}  # fmt: skip
        self.nodes.update_metadata(run_key, md)
