"""Past runs read back from Tiled: the bridge's `RunCatalog` and the data behind `latent-stream verify`.

Implements `frontend_bridge.app.RunCatalog` structurally (no import of the bridge):
`list_runs(limit)` and `run_points(run_id)`. The Tiled client is synchronous, so every call runs in a
worker thread; nothing here is on the per-frame path.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

ROW_KEYS = ("index", "x", "y", "cluster", "novelty", "timestamp", "tiled_url")


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
        """Newest first: run_id, run_name, started_at, stopped_at, num_points, status."""
        return await asyncio.to_thread(self._list_runs, limit)

    def _list_runs(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for run_id, node in self._root().items():
            md = dict(node.metadata)
            if md.get("writer") != "latent-stream":
                continue
            out.append(
                {
                    "run_id": run_id,
                    "run_name": md.get("run_name", run_id),
                    "started_at": md.get("started_at"),
                    "stopped_at": md.get("stopped_at"),
                    "num_points": md.get("rows"),
                    "status": md.get("status", "open"),
                }
            )
        out.sort(key=lambda r: r.get("started_at") or 0.0, reverse=True)
        return out[:limit]

    async def run_points(self, run_id: str) -> list[dict[str, Any]] | None:
        """The run's rows (keys ROW_KEYS) in processing order, or None for an unknown run."""
        return await asyncio.to_thread(self._run_points, run_id)

    def _run_points(self, run_id: str) -> list[dict[str, Any]] | None:
        root = self._root()
        if run_id not in root:
            return None
        latent = root[run_id].get("latent", None)
        if latent is None or "points" not in latent:
            return []
        try:
            df = latent["points"].read()
        except Exception as exc:  # noqa: BLE001 - an appendable table with no partition written yet
            logger.info("run %s has no readable points yet: %s", run_id, exc)
            return []
        df = df.sort_values("row") if "row" in df else df
        rows = []
        for rec in df[list(ROW_KEYS)].to_dict("records"):
            rec["index"] = int(rec["index"])
            rec["cluster"] = int(rec["cluster"])
            for k in ("x", "y", "novelty", "timestamp"):
                v = float(rec[k])
                rec[k] = v if math.isfinite(v) else None
            rows.append(rec)
        return rows

    async def run_report(self, run_id: str) -> dict[str, Any] | None:
        """What Tiled holds for a run: its metadata counters, rows stored and frames stored."""
        return await asyncio.to_thread(self._run_report, run_id)

    def _run_report(self, run_id: str) -> dict[str, Any] | None:
        root = self._root()
        if run_id not in root:
            return None
        run = root[run_id]
        md = dict(run.metadata)
        rows = 0
        if "latent" in run and "points" in run["latent"]:
            try:
                rows = len(run["latent"]["points"].read(["row"]))
            except Exception:  # noqa: BLE001 - nothing appended yet
                rows = 0
        persist = md.get("persist") or {}
        return {
            "run_id": run_id,
            "status": md.get("status", "open"),
            "num_frames": md.get("num_frames"),
            "processed": md.get("processed"),
            "rows_stored": rows,
            "frames_stored": persist.get("frames_written"),
            "frames_not_written": persist.get("frames_not_written", {}),
            "received": md.get("received"),
            "rejected": md.get("rejected"),
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.context.close()
            self._client = None
