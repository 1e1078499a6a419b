"""One run as the hub knows it: its start and stop events, its clusters and (while retained) its points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .point_store import PointStore
from .wire import RunContext


@dataclass(slots=True)
class RunState:
    """One run as the hub knows it: its start/stop events, clusters and (while retained) its points."""

    ctx: RunContext
    run_key: str  # where the run is stored; also what /api/runs/{id} accepts for a past run
    run_name: str
    started_at: float
    start_event: dict[str, Any] | None  # only the current run's: new clients get no other run's start
    store: PointStore | None
    points: int = 0  # points published for the run (including evicted ones)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    stop_event: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    def summary(self, *, current: bool) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_key": self.run_key,
            "run_name": self.run_name,
            "experiment_name": self.ctx.experiment_name,
            "started_at": self.started_at,
            "stopped_at": self.stop_event["stopped_at"] if self.stop_event else None,
            "active": self.stop_event is None,
            "current": current,
            "num_points": self.points,
            "points_in_memory": len(self.store) if self.store is not None else 0,
            "new_clusters": len(self.clusters),  # founded during the run (cluster_new)
            "source": "memory",
        }
