"""The first point does not wait for Tiled: frames are taken as soon as the model is warm, and what was
published while Tiled was not answering yet lands in it once it does. An embedded Tiled that cannot start
stops the service with one clear error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import WsClient, free_port, start_service, stop_service, until
from tiled.client import from_uri

from operators.persist.server import EmbeddedTiledServer
from stream.simulate import simulate

pytestmark = pytest.mark.e2e

FRAMES = 8


def _health(url: str) -> dict:
    return httpx.get(f"{url}/api/health", timeout=5).json()


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=5).text


def _run_in_tiled(url: str, key: str, run_key: str) -> tuple[int, tuple[int, ...]] | None:
    """(rows in the run's points table, shape of its stored frames), or None while not all there."""
    try:
        run = from_uri(url, api_key=key)[run_key]
        return len(run["latent"]["points"].read()), tuple(run["primary"]["image"].shape)
    except Exception:  # noqa: BLE001 - not written yet
        return None


async def test_points_flow_while_tiled_is_not_up_yet_and_everything_lands_once_it_is(tmp_path: Path) -> None:
    tiled_port, key = free_port(), "latetiledkey0123456789"
    tiled_url = f"http://127.0.0.1:{tiled_port}"
    service = start_service(
        tmp_path, extra_args=("--tiled", tiled_url, "--tiled-api-key", key), wait_for_tiled=False
    )
    tiled = EmbeddedTiledServer(tmp_path / "late-tiled", port=tiled_port, api_key=key)
    try:
        assert _health(service.http)["tiled_connected"] is False
        async with WsClient(service.ws) as client:
            report = await simulate(service.zmq, frames=FRAMES, rate=10.0, scenario="crystallization", seed=3)
            await until(lambda: client.stopped(report.run_id), 60, "the run's points with no Tiled answering")
            points = client.points(report.run_id)
        assert [p["index"] for p in points] == list(range(FRAMES))
        assert all(p["tiled_url"].startswith(f"{tiled_url}/api/v1/array/") for p in points)

        await tiled.start()  # Tiled comes up only now, long after the scan
        await until(lambda: _health(service.http)["tiled_connected"], 60, "the writer to connect")
        landed = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run_key = points[0]["tiled_url"].split("/array/full/")[1].split("/")[0]
            landed = await asyncio.to_thread(_run_in_tiled, tiled_url, key, run_key)
            if landed is not None and landed[0] == FRAMES:
                break
            await asyncio.sleep(0.5)
        assert landed is not None and landed[0] == FRAMES and landed[1][0] == FRAMES, landed
        persist = _health(service.http)["persist"]
        assert (persist["frames_written"], persist["rows_written"]) == (FRAMES, FRAMES)
        assert persist["frames_not_written"] == {} and persist["rows_not_written"] == {}
        metrics = _metrics(service.http)
        assert f"latent_stream_persist_frames_written_total {float(FRAMES)}" in metrics
        async with httpx.AsyncClient(headers={"Authorization": f"Apikey {key}"}, trust_env=False) as http:
            r = await http.get(points[-1]["tiled_url"], headers={"Accept": "application/octet-stream"})
        assert r.status_code == 200
        assert np.frombuffer(r.content, np.int32).any()  # the frame itself, not a hole
    finally:
        rc, _ = stop_service(service)
        await tiled.stop()
    assert rc == 0, service.log_text()[-3000:]


def test_an_embedded_tiled_that_cannot_start_stops_the_service_with_its_error(tmp_path: Path) -> None:
    # Tiled refuses an API key that is not alphanumeric and exits during its start-up
    service = start_service(tmp_path, extra_args=("--tiled-api-key", "not-a-valid-key!"), wait_for_tiled=False)
    try:
        rc = service.proc.wait(timeout=120)
    finally:
        stop_service(service)
    log = service.log_text()
    assert rc == 1, log[-3000:]
    assert "embedded Tiled server exited with code" in log and "server.log" in log
    assert "Traceback" not in log.split("failed; shutting down")[-1]  # one clear error at the end, no dump
