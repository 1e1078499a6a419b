"""What was published and is not in Tiled yet: the one queue between the writer's intake and its write loop.

One FIFO of operations keeps each run's order (start, rows, cluster updates, stop). The frames waiting in
it are bounded in bytes (`max_buffer_bytes`): past it the OLDEST waiting frame image is dropped and counted
(frames_not_written["buffer_full"]); its row stays (rows are small and also in the result log).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np

from operators.persist.runs import Row, RunState
from operators.throttled_log import ThrottledLog


class Backlog:
    """The operations waiting to be written, the runs' state, and the frames among them."""

    def __init__(self, max_buffer_bytes: int, warn: ThrottledLog) -> None:
        self.max_buffer_bytes = max_buffer_bytes
        self.ops: collections.deque[tuple[str, Any]] = collections.deque()
        self.runs: dict[str, RunState] = {}
        self.wake = asyncio.Event()  # set when something was added
        self.buffered_bytes = 0
        self.closing = False  # the writer is stopping: write what is here now, retry little
        self.flushing = 0  # flush() callers waiting: write rows now rather than batch them
        self._frames: collections.deque[Row] = collections.deque()  # rows holding an image, oldest first
        self._warn = warn
        # set while the frames waiting fill at most half the buffer: a producer waiting for room (writer.py)
        # goes on from there
        self.drained = asyncio.Event()
        self.drained.set()

    def run(self, run_key: str, run_id: str | None = None) -> RunState:
        st = self.runs.get(run_key)
        if st is None:
            st = self.runs[run_key] = RunState(run_key, run_key if run_id is None else run_id)
        return st

    def add(self, kind: str, item: Any) -> None:
        self.ops.append((kind, item))

    def add_row(self, row: Row) -> None:
        self.ops.append(("row", row))
        if row.image is None:
            return
        self._frames.append(row)
        self.buffered_bytes += row.image.nbytes
        if self.buffered_bytes > self.max_buffer_bytes // 2:
            self.drained.clear()
        while self.buffered_bytes > self.max_buffer_bytes and self._frames:
            self.drop_image(self._frames.popleft(), "buffer_full")

    def take_image(self, row: Row) -> np.ndarray:
        """Out of the droppable buffer: the frame is in flight (or counted) now."""
        image = row.image
        assert image is not None
        self._less_waiting(image.nbytes)
        row.image = None
        self._frames.remove(row)
        return image

    def nearly_full(self) -> bool:
        """More than three quarters of the buffer waits: well past the writer's usual batching, short of a drop."""
        return self.buffered_bytes > 3 * self.max_buffer_bytes // 4

    def _less_waiting(self, nbytes: int) -> None:
        self.buffered_bytes -= nbytes
        if self.buffered_bytes <= self.max_buffer_bytes // 2:
            self.drained.set()

    def drop_image(self, row: Row, reason: str) -> None:
        if row.image is None:
            return
        self._less_waiting(row.image.nbytes)
        row.image = None
        dropped = self.run(row.run_key).frames_not_written
        dropped[reason] += 1
        self._warn.warning(reason, "run %s frame %d not written to Tiled: %s (%d so far in this run)",
                           row.run_key, row.index, reason, dropped[reason])  # fmt: skip

    def rows_waiting(self) -> int:
        return sum(1 for kind, _ in self.ops if kind == "row")
