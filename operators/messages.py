"""Messages that flow between pipeline stages and out to publishers.

These are the in-process contract between `stream` (frames in), `operators` (compute) and
`frontend_bridge` / persistence (out). Wire formats (msgpack in, JSON/msgpack out) are built
from these at the edges; nothing here knows about sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class RunStarted:
    """A run began (a `start` document arrived)."""

    run_id: str  # as the sender gave it (or generated when it gave none)
    run_key: str = field(kw_only=True)  # where the run is stored (operators.persist.keys): unique per run
    run_name: str
    started_at: float  # unix seconds
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Frame:
    """One detector frame after decode, before any computation.

    `image` is a read-only view on the received bytes (zero-copy), shape (H, W).
    `tiled_url` is empty when the service itself must store the frame.
    """

    run_id: str
    run_key: str = field(kw_only=True)
    index: int  # the frame number from the source
    image: np.ndarray
    tiled_url: str
    received_at: float  # unix seconds, when the message arrived
    received_perf: float  # time.perf_counter() at arrival, for latency accounting
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class StageTimings:
    """Seconds spent per stage for one frame (batched stages are shared by the batch)."""

    queue: float = 0.0
    preprocess: float = 0.0
    encode: float = 0.0
    project: float = 0.0
    cluster: float = 0.0
    total: float = 0.0  # arrival -> point ready


@dataclass(slots=True)
class Point:
    """The result for one frame: its 2-D position, cluster, and where its frame lives."""

    run_id: str
    run_key: str = field(kw_only=True)
    index: int
    x: float
    y: float
    cluster: int
    novelty: float
    tiled_url: str
    timestamp: float  # unix seconds when the point was produced
    timings: StageTimings
    latent: np.ndarray  # (latent_dim,) float32 latent mean
    # True when the frame came without a tiled_url and this service stores it: the frame itself travels by
    # its own path (a `FrameSink`), never inside the point
    stored_by_service: bool


@dataclass(slots=True)
class ClusterNew:
    """A new cluster id appeared during the run (a new structural regime)."""

    run_id: str
    cluster: int
    index: int  # frame that founded it
    timestamp: float


@dataclass(slots=True)
class ClusterUpdate:
    """Points already published whose cluster id changed (re-clustering of the run split a phase off).

    Published after every point it corrects, and after the `ClusterNew` of any id it names. Ids are never
    renumbered: a point only moves to a new id or to the id its phase already has.
    """

    run_id: str
    run_key: str = field(kw_only=True)
    indices: list[int]  # frame numbers of the corrected points
    clusters: list[int]  # their cluster id now, one per index
    timestamp: float  # unix seconds


@dataclass(slots=True)
class RunStopped:
    """A run ended (a `stop` document arrived, or the service is shutting down)."""

    run_id: str
    run_key: str = field(kw_only=True)
    stopped_at: float
    num_frames: int | None  # as announced by the source, if it said
    processed: int
    reason: str = "stop"  # "stop" | "superseded" (a new start came first) | "shutdown"


PipelineMessage = RunStarted | Point | ClusterNew | ClusterUpdate | RunStopped

FrameSink = Callable[[Frame], None]
"""Where the pipeline hands each frame this service must store (one that came without a `tiled_url`), right
before it publishes that frame's `Point` (same `run_key` and `index`). Must not block: the composition root
connects it to the Tiled writer's `store_frame`."""
