"""REST routes: health, metrics, runs (memory + catalog), reference map, the page's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from bridge_support import MODEL, bridge, connect, point, receive_until, run_started, run_stopped

from frontend_bridge import RunCatalog
from operators import point_row


class ListCatalog:
    """An in-memory RunCatalog, shaped like the Tiled-backed one the persistence side plugs in."""

    def __init__(self, runs: dict[str, list[dict[str, Any]]], fail: bool = False) -> None:
        self._runs = runs
        self._fail = fail

    async def list_runs(self, limit: int) -> list[dict[str, Any]]:
        if self._fail:
            raise ConnectionError("tiled is down")
        return [{"run_id": r, "run_name": r, "num_points": len(p)} for r, p in self._runs.items()][:limit]

    async def run_points(self, run_id: str) -> list[dict[str, Any]] | None:
        if self._fail:
            raise ConnectionError("tiled is down")
        return self._runs.get(run_id)


def test_the_test_catalog_satisfies_the_protocol() -> None:
    assert isinstance(ListCatalog({}), RunCatalog)


async def test_health_reports_run_clients_counters_rate_and_stage_medians() -> None:
    async with bridge(health_extra=lambda: {"ingest": {"frames": 7}}) as srv, httpx.AsyncClient() as http:
        await srv.hub.publish(run_started("r1", "scan"))
        for i in range(20):
            await srv.hub.publish(point("r1", i))
        async with connect(f"{srv.ws}/lse"):
            body = (await http.get(f"{srv.base}/api/health")).json()
    assert body["status"] == "ok"
    assert body["uptime_s"] >= 0
    assert body["current_run"]["run_id"] == "r1" and body["current_run"]["num_points"] == 20
    assert body["clients"] == {"lse": 1, "ws": 0}
    assert body["counters"]["points"] == 20
    assert set(body["counters"]["dropped"]) >= {"lse_slow_client", "ws_slow_client", "store_full"}
    assert body["frames_per_s"] > 0
    assert body["stage_p50_ms"]["encode"] == pytest.approx(20.0)
    assert body["model"] == {"autoencoder_model": MODEL.autoencoder_model, "dimred_model": MODEL.dimred_model}
    assert body["ingest"] == {"frames": 7}


async def test_metrics_expose_the_hub_counters_in_prometheus_text() -> None:
    async with bridge() as srv, httpx.AsyncClient() as http:
        await srv.hub.publish(run_started("r1"))
        await srv.hub.publish(point("r1", 0))
        async with connect(f"{srv.ws}/ws") as ws:
            await receive_until(ws, lambda m: m["type"] == "backfill_end")
            response = await http.get(f"{srv.base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'latent_stream_bridge_clients{endpoint="ws"} 1.0' in response.text
    assert 'latent_stream_bridge_dropped_total{reason="ws_slow_client"} 0.0' in response.text
    assert "latent_stream_bridge_points_total 1.0" in response.text


async def test_runs_list_the_current_run_then_past_runs_then_the_catalog() -> None:
    catalog = ListCatalog(
        {
            "old": [
                {
                    "index": 0,
                    "x": 1.0,
                    "y": 2.0,
                    "cluster": 0,
                    "novelty": 0.1,
                    "timestamp": 1.0,
                    "tiled_url": "",
                }
            ],
            "r1": [],  # also in memory: memory wins
        }
    )
    async with bridge(run_catalog=catalog) as srv, httpx.AsyncClient() as http:
        await srv.hub.publish(run_started("r1"))
        for i in range(3):
            await srv.hub.publish(point("r1", i))
        await srv.hub.publish(run_stopped("r1", 3))
        await srv.hub.publish(run_started("r2"))
        await srv.hub.publish(point("r2", 0))
        runs = (await http.get(f"{srv.base}/api/runs")).json()
        r1_points = (await http.get(f"{srv.base}/api/runs/r1/points")).json()
        old_points = (await http.get(f"{srv.base}/api/runs/old/points")).json()
        missing = await http.get(f"{srv.base}/api/runs/nope/points")
        limited = (await http.get(f"{srv.base}/api/runs", params={"limit": 1})).json()
    assert runs["current"] == "r2"
    assert [(r["run_id"], r["source"], r["current"]) for r in runs["runs"]] == [
        ("r2", "memory", True),
        ("r1", "memory", False),
        ("old", "catalog", False),
    ]
    assert runs["runs"][1]["stopped_at"] is not None and runs["runs"][1]["num_points"] == 3
    assert [p["index"] for p in r1_points] == [0, 1, 2]
    assert list(r1_points[0]) == list(point_row.WIRE_KEYS)  # the point row, under its wire names
    assert r1_points[1]["tiled_url"].endswith("/r1/primary/image?slice=1")
    assert old_points[0]["x"] == 1.0
    assert missing.status_code == 404
    assert [r["run_id"] for r in limited["runs"]] == ["r2"]


async def test_a_failing_catalog_still_lists_the_live_runs() -> None:
    async with bridge(run_catalog=ListCatalog({}, fail=True)) as srv, httpx.AsyncClient() as http:
        await srv.hub.publish(run_started("r1"))
        runs = (await http.get(f"{srv.base}/api/runs")).json()
        points = await http.get(f"{srv.base}/api/runs/unknown/points")
    assert [r["run_id"] for r in runs["runs"]] == ["r1"]
    assert "tiled is down" in runs["catalog_error"]
    assert points.status_code == 502


async def test_the_reference_embedding_is_served_as_columns() -> None:
    embedding = np.array([[0.5, -1.0], [2.0, 3.25], [4.0, 5.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    async with (
        bridge(reference_embedding=embedding, reference_clusters=labels) as srv,
        httpx.AsyncClient() as http,
    ):
        body = (await http.get(f"{srv.base}/api/reference")).json()
    assert body == {
        "autoencoder_model": MODEL.autoencoder_model,
        "dimred_model": MODEL.dimred_model,
        "count": 3,
        "x": [0.5, 2.0, 4.0],
        "y": [-1.0, 3.25, 5.0],
        "cluster": [0, 1, 1],
        "frames": False,  # no recorded reference frames: /api/reference/frame/{i} is 404
    }


async def test_without_a_reference_embedding_the_route_says_so() -> None:
    async with bridge() as srv, httpx.AsyncClient() as http:
        response = await http.get(f"{srv.base}/api/reference")
    assert response.status_code == 404
    assert "reference" in response.json()["detail"]


def test_a_malformed_reference_embedding_is_refused_at_startup() -> None:
    from prometheus_client import CollectorRegistry

    from frontend_bridge import Hub, create_app

    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        create_app(Hub(MODEL), registry=CollectorRegistry(), reference_embedding=np.zeros((4, 3)))


async def test_the_page_is_served_locally_with_no_outside_assets(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>live</title>")
    (tmp_path / "app.js").write_text("export const ok = 1;")
    async with bridge(static_dir=tmp_path) as srv, httpx.AsyncClient() as http:
        index = await http.get(f"{srv.base}/")
        script = await http.get(f"{srv.base}/static/app.js")
        missing = await http.get(f"{srv.base}/static/nope.js")
    assert index.status_code == 200 and "<title>live</title>" in index.text
    assert script.status_code == 200 and "ok = 1" in script.text
    assert missing.status_code == 404


async def test_frames_need_a_configured_tiled_server() -> None:
    async with bridge() as srv, httpx.AsyncClient() as http:
        response = await http.get(
            f"{srv.base}/api/frame", params={"url": "http://127.0.0.1:1/api/v1/array/full/a"}
        )
    assert response.status_code == 503


async def test_aggregate_requests_are_bounded_and_validated() -> None:
    async with bridge(max_aggregate=5) as srv, httpx.AsyncClient() as http:
        too_many = await http.post(f"{srv.base}/api/aggregate", json={"urls": ["u"] * 6, "stat": "mean"})
        empty = await http.post(f"{srv.base}/api/aggregate", json={"urls": [], "stat": "mean"})
        bad_stat = await http.post(f"{srv.base}/api/aggregate", json={"urls": ["u"], "stat": "median"})
    assert too_many.status_code == 413 and "at most 5" in too_many.json()["detail"]
    assert empty.status_code == 422
    assert bad_stat.status_code == 422
