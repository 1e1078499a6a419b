"""What the writer holds per run and per point row between publishing and Tiled."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Row:
    """One point on its way to Tiled: its table row, latent vector and (until written) its frame."""

    run_key: str
    row: int
    index: int
    values: dict[str, Any]
    latent: np.ndarray
    image: np.ndarray | None
    published_at: float  # unix s, the point's timestamp
    queued_at: float = 0.0  # monotonic s, when publish enqueued it (rows are written in batches by age)


@dataclass(slots=True)
class RunState:
    run_key: str  # the node it is stored under
    run_id: str  # as the sender called it: metadata and log lines only
    next_row: int = 0
    start: dict[str, Any] | None = None
    created: bool = False
    image_shape: tuple[int, ...] | None = None  # set once /<run>/primary/image exists (one frame's shape)
    image_dtype: str | None = None
    vectors_dim: int | None = None  # set once /<run>/latent/vectors exists
    updates: int = 0  # ClusterUpdates enqueued (their sequence number in latent/cluster_updates)
    updates_created: bool = False  # /<run>/latent/cluster_updates exists
    recovered_open: bool = False
    frame_indices: set[int] = field(default_factory=set)  # of frames taken to store: a repeat is not written
    frames_written: int = 0
    rows_written: int = 0
    frames_not_written: collections.Counter[str] = field(default_factory=collections.Counter)
    rows_not_written: collections.Counter[str] = field(default_factory=collections.Counter)

    def counts(self) -> dict[str, Any]:
        """Per-run persistence counters (for the run report)."""
        return {
            "rows_written": self.rows_written,
            "frames_written": self.frames_written,
            "frames_not_written": dict(self.frames_not_written),
            "rows_not_written": dict(self.rows_not_written),
        }


@dataclass(slots=True)
class BatchOutcome:
    """What a (possibly retried) batch of rows achieved."""

    rows_done: int = 0
    rows_skipped: int = 0  # already in Tiled from an attempt whose answer was lost


def consecutive(rows: list[Row], key: Callable[[Row], int]) -> list[list[Row]]:
    """Split into runs of consecutive keys (each run is one PATCH)."""
    groups: list[list[Row]] = []
    for r in rows:
        if groups and key(r) == key(groups[-1][-1]) + 1:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups
