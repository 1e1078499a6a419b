"""What every reader returns: a FrameSource of RecordedFrames, each with its origin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ReplayError(ValueError):
    """The source cannot be read (unknown kind, empty, unreadable, no timestamps for --speed)."""


@dataclass(frozen=True, slots=True)
class FrameOrigin:
    """Where one frame lives: a file path or Tiled URI, the HDF5 dataset if any, its index there."""

    source: str
    index: int
    dataset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "index": self.index, "dataset": self.dataset}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameOrigin:
        return cls(str(d["source"]), int(d["index"]), str(d.get("dataset") or ""))


@dataclass(slots=True)
class RecordedFrame:
    index: int  # position in the source, 0-based: becomes the event's frame_number
    image: np.ndarray
    tiled_url: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # per frame: exposure_time, timestamp, ...


@dataclass(slots=True)
class FrameSource:
    """A recorded scan: how many frames, their recorded times (if any), and a way to read them in order."""

    name: str
    kind: str  # "directory" | "file" | "hdf5" | "npy" | "tiled"
    count: int
    timestamps: np.ndarray | None  # seconds, one per frame, or None
    read: Callable[[int], RecordedFrame]
    metadata: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] | None = None
    origin: Callable[[int], FrameOrigin] | None = None

    def __iter__(self) -> Iterator[RecordedFrame]:
        for i in range(self.count):
            yield self.read(i)

    def origin_of(self, i: int) -> FrameOrigin:
        return (
            self.origin(i)
            if self.origin is not None
            else FrameOrigin(self.metadata.get("source", self.name), i)
        )


def optional_timestamps(path: Path, count: int) -> np.ndarray | None:
    if not path.exists():
        return None
    ts = np.load(path).astype(np.float64).reshape(-1)
    if len(ts) != count:
        raise ReplayError(f"{path}: {len(ts)} timestamps for {count} frames")
    return ts


def npy_source(path: Path) -> FrameSource:
    stack = np.load(path, mmap_mode="r")
    if stack.ndim != 3:
        raise ReplayError(f"{path}: expected an (N, H, W) stack, got shape {stack.shape}")
    ts = optional_timestamps(path.with_name(path.stem + ".timestamps.npy"), len(stack))
    return FrameSource(
        path.stem, "npy", len(stack), ts, lambda i: RecordedFrame(i, np.ascontiguousarray(stack[i])),
        {"source": str(path)}, origin=lambda i: FrameOrigin(str(path), i),
    )  # fmt: skip
