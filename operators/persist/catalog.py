"""Past runs read back from Tiled: the bridge's `RunCatalog` and the data behind `latent-stream verify`.

Implements `frontend_bridge.app.RunCatalog` structurally (no import of the bridge):
`list_runs(limit)` and `run_points(run_id)`. The Tiled client is synchronous, so every call runs in a
worker thread; nothing here is on the per-frame path.

A run is found by its storage key or by the sender's run id (the latest run that came with that id;
a reused id is stored under one key per run, see keys.py).

A run's points come with the ids re-clustering corrected: the points table keeps each id as it was sent, and
`latent/cluster_updates` (update, index, cluster) says which frames moved since; they are applied in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from operators import point_row
from operators.persist.keys import is_safe_key
from operators.tiled_layout import CLUSTER_UPDATES, LATENT, POINTS

logger = logging.getLogger(__name__)


class TiledRunCatalog:
    """Runs written by `TiledWriter` under `root` of a Tiled server."""

    def __init__(self, base_url: str, api_key: str | None, *, root: str = "", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.root = root.strip("/")
        self.timeout = timeout
        self._client: Any = None

    def _root(self) -> Any:
        if self._client is None:
            from tiled.client import from_uri

            self._client = from_uri(self.base_url, api_key=self.api_key, timeout=self.timeout)
        node = self._client
        for part in filter(None, self.root.split("/")):
            node = node[part]
        return node

    async def list_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: run_id, run_key, run_name, started_at, stopped_at, num_points, status."""
        return await asyncio.to_thread(self._list_runs, limit)

    def _runs(self) -> list[tuple[str, dict[str, Any], Any]]:
        """(key, metadata, node) of every run this service wrote."""
        out = []
        for key, node in self._root().items():
            md = dict(node.metadata)
            if md.get("writer") == "latent-stream":
                out.append((key, md, node))
        return out

    def _find(self, run: str) -> Any | None:
        """The node of run key ``run``, else of the latest run the sender called ``run``."""
        root = self._root()
        if is_safe_key(run) and run in root:  # anything else would be read as a path into the tree
            return root[run]
        named = [(md.get("started_at") or 0.0, node) for _, md, node in self._runs() if md.get("run_id") == run]
        return max(named, key=lambda started_node: started_node[0])[1] if named else None

    def _list_runs(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for key, md, _ in self._runs():
            out.append(
                {
                    "run_id": md.get("run_id", key),
                    "run_key": key,
                    "run_name": md.get("run_name", key),
                    "started_at": md.get("started_at"),
                    "stopped_at": md.get("stopped_at"),
                    "num_points": md.get("rows"),
                    "status": md.get("status", "open"),
                }
            )
        out.sort(key=lambda r: r.get("started_at") or 0.0, reverse=True)
        return out[:limit]

    async def run_points(self, run: str) -> list[dict[str, Any]] | None:
        """The run's rows (`point_row.rest_row`) in processing order, or None for an unknown run (key or run id)."""
        return await asyncio.to_thread(self._run_points, run)

    def _run_points(self, run: str) -> list[dict[str, Any]] | None:
        node = self._find(run)
        if node is None:
            return None
        latent = node.get(LATENT, None)
        if latent is None or POINTS not in latent:
            return []
        try:
            df = latent[POINTS].read()
        except Exception as exc:  # noqa: BLE001 - an appendable table with no partition written yet
            logger.info("run %r has no readable points yet: %s", run, exc)
            return []
        df = df.sort_values("row") if "row" in df else df
        moved = _cluster_updates(latent, run)
        if moved:
            df = df.assign(cluster=[moved.get(int(i), int(c)) for i, c in zip(df["index"], df["cluster"], strict=True)])
        return [point_row.rest_row(rec) for rec in df[list(point_row.NAMES)].to_dict("records")]

    async def run_report(self, run: str) -> dict[str, Any] | None:
        """What Tiled holds for a run (key or run id): what the writer recorded at its close, rows and frames stored.

        Ingest counters (received, rejected) are the service's, for all runs together: `verify` reads them
        from its /api/health, not from here.
        """
        return await asyncio.to_thread(self._run_report, run)

    def _run_report(self, run_id: str) -> dict[str, Any] | None:
        run = self._find(run_id)
        if run is None:
            return None
        md = dict(run.metadata)
        rows = 0
        if LATENT in run and POINTS in run[LATENT]:
            try:
                rows = len(run[LATENT][POINTS].read(["row"]))
            except Exception:  # noqa: BLE001 - nothing appended yet
                rows = 0
        persist = md.get("persist") or {}
        return {
            "run_id": md.get("run_id", run_id),
            "run_key": run.item["id"],
            "status": md.get("status", "open"),
            "num_frames": md.get("num_frames"),
            "processed": md.get("processed"),
            "rows_stored": rows,
            "frames_stored": persist.get("frames_written"),
            "frames_not_written": persist.get("frames_not_written", {}),
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.context.close()
            self._client = None


def _cluster_updates(latent: Any, run: str) -> dict[int, int]:
    """Frame number -> its cluster id after every re-clustering of the run (the last update wins)."""
    if CLUSTER_UPDATES not in latent:
        return {}
    try:
        df = latent[CLUSTER_UPDATES].read()
    except Exception as exc:  # noqa: BLE001 - created, nothing appended yet
        logger.info("run %r has no readable cluster updates yet: %s", run, exc)
        return {}
    df = df.reset_index(drop=True)
    df = df.assign(_pos=range(len(df))).sort_values(["update", "_pos"], kind="stable")
    return {int(i): int(c) for i, c in zip(df["index"], df["cluster"], strict=True)}

