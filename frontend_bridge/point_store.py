"""A run's point rows in memory, for backfill and REST: bounded, columnar, addressed by sequence number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from operators import point_row

_NUMERIC_NAMES = tuple(f.name for f in point_row.NUMERIC)
_TEXT_NAMES = tuple(f.name for f in point_row.TEXT)


class PointStore:
    """A run's point rows (`operators.point_row`) in memory, keeping the newest `max_points` (a ring once full).

    Numeric fields are columns of one structured array; text fields (the frame's URL) a list beside it.

    Points are addressed by a sequence number (0 for the run's first point) so a backfilling
    client can resume where it was even while old points are being evicted.
    """

    def __init__(self, max_points: int, initial_capacity: int = 1024) -> None:
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.max_points = max_points
        self._capacity = min(initial_capacity, max_points)
        self._rows = np.zeros(self._capacity, dtype=point_row.NUMERIC_DTYPE)
        self._text: list[tuple[str, ...]] = [()] * self._capacity
        self.first_seq = 0  # oldest sequence number still held
        self.end_seq = 0  # one past the newest

    def __len__(self) -> int:
        return self.end_seq - self.first_seq

    def append(self, row: dict[str, Any]) -> bool:
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
        self._rows[pos] = tuple(row[name] for name in _NUMERIC_NAMES)
        self._text[pos] = tuple(row[name] for name in _TEXT_NAMES)
        self.end_seq += 1
        return evicted

    def _grow(self) -> None:
        new_capacity = min(self._capacity * 2, self.max_points)
        rows = np.zeros(new_capacity, dtype=point_row.NUMERIC_DTYPE)
        rows[: self._capacity] = self._rows
        self._rows = rows
        self._text.extend([()] * (new_capacity - self._capacity))
        self._capacity = new_capacity

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The rows of sequence numbers in [start, stop) still held, as Python scalars."""
        start = max(start, self.first_seq)
        stop = min(stop, self.end_seq)
        if stop <= start:
            return []
        out: list[dict[str, Any]] = []
        for a, b in self._spans(start, stop):
            for numeric, text in zip(self._rows[a:b].tolist(), self._text[a:b], strict=True):
                out.append({**dict(zip(_NUMERIC_NAMES, numeric)), **dict(zip(_TEXT_NAMES, text))})
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
