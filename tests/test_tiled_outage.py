"""Tiled unreachable for 10 s during a run: points keep flowing, everything lands once it is back (issue 4)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from tiled.client import from_uri
from tiled_support import make_point, publish_stored, tiled_server_fixture

from operators.messages import RunStarted, RunStopped
from operators.persist.server import EmbeddedTiledServer, free_port
from operators.persist.writer import TiledWriter

tiled_server = tiled_server_fixture()

OUTAGE_S = 10.0
RATE_HZ = 10.0


@pytest.mark.parametrize("local_frames", [False, True], ids=["http", "local"])
async def test_tiled_down_for_ten_seconds_loses_no_frame_and_no_row(
    tiled_server: EmbeddedTiledServer, tmp_path, local_frames: bool
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(11)
    writer = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path, give_up_after=120, local_frames=local_frames)
    await writer.start()
    run_id = f"run-outage-{local_frames}"
    await writer.publish(RunStarted(run_id, "outage", time.time(), run_key=run_id))
    points, images = [], []

    async def publish_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            p, img = make_point(ep.url, run_id, len(points), rng)
            points.append(p)
            images.append(img)
            await publish_stored(writer, p, img)  # the pipeline's view: must return at once, Tiled or not
            await asyncio.sleep(1 / RATE_HZ)

    await publish_for(1.5)
    assert await writer.flush(timeout=60)
    before = len(points)
    await tiled_server.stop()  # Tiled unreachable: connection refused
    down_at = time.monotonic()
    await publish_for(OUTAGE_S)
    during = len(points) - before
    stats_down = writer.stats()
    await tiled_server.start()  # same port, same data directory
    assert time.monotonic() - down_at >= OUTAGE_S
    await publish_for(1.0)
    await writer.publish(RunStopped(run_id, time.time(), num_frames=len(points), processed=len(points), run_key=run_id))
    assert await writer.flush(timeout=180)
    stats = writer.stats()
    await writer.stop()

    # points kept flowing at the publishing cadence while Tiled was down, and piled up in the buffer
    assert during >= 0.8 * OUTAGE_S * RATE_HZ
    assert stats_down.buffered_rows >= during - 1
    # ...and everything landed afterwards, nothing counted as not written
    assert stats.frames_not_written == {} and stats.rows_not_written == {}
    assert stats.frames_written == len(points) and stats.rows_written == len(points)
    assert stats.retries > 0 or stats.lag_max_s is not None and stats.lag_max_s >= OUTAGE_S / 2

    headers = {**ep.headers, "Accept": "application/octet-stream"}
    async with httpx.AsyncClient(headers=headers, trust_env=False) as client:
        for p, img in zip(points, images, strict=True):
            r = await client.get(p.tiled_url)
            assert r.status_code == 200 and r.content == img.tobytes(), p.index
    run = from_uri(ep.url, api_key=ep.api_key)[run_id]
    table = run["latent"]["points"].read()
    assert sorted(table["index"]) == list(range(len(points)))  # each row exactly once
    assert run["latent"]["vectors"].shape == (len(points), 512)
    assert run.metadata["status"] == "closed"


async def test_a_tiled_that_comes_up_long_after_the_writer_started_still_gets_everything(tmp_path) -> None:
    # The service must not give up on a Tiled that is down when it starts: it keeps the live path going.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    writer = TiledWriter(url, "latekey0123", data_dir=tmp_path / "writer", give_up_after=1.0)
    task = writer.start_soon()
    rng = np.random.default_rng(3)
    await writer.publish(RunStarted("run-late", "late", time.time(), run_key="run-late"))
    for i in range(5):
        await publish_stored(writer, *make_point(url, "run-late", i, rng))
    await asyncio.sleep(3.0)  # three times give_up_after, Tiled still down
    assert not task.done() and not writer.connected
    tiled = EmbeddedTiledServer(tmp_path / "tiled", port=port, api_key="latekey0123")
    try:
        await tiled.start()
        assert await writer.flush(timeout=120)
        stats = writer.stats()
        assert (stats.frames_written, stats.rows_written) == (5, 5)
        assert stats.frames_not_written == {} and stats.rows_not_written == {}
    finally:
        await writer.stop()
        await tiled.stop()


async def test_an_outage_never_makes_the_pipeline_wait_for_room_in_the_frame_buffer(
    tiled_server: EmbeddedTiledServer, tmp_path
) -> None:
    """With the embedded Tiled the pipeline waits for the disk when the frame buffer is nearly full
    (`wait_for_room`), but not for a Tiled that is down: the live map keeps going, the buffer takes the outage."""
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(12)
    frame_bytes = make_point(ep.url, "x", 0, rng)[1].nbytes
    writer = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path, give_up_after=120, local_frames=True,
                         max_buffer_bytes=8 * frame_bytes)
    await writer.start()
    run_id = "run-room-outage"
    await writer.publish(RunStarted(run_id, "outage", time.time(), run_key=run_id))
    await publish_stored(writer, *make_point(ep.url, run_id, 0, rng))
    assert await writer.flush(timeout=60)
    await tiled_server.stop()
    waited = []
    for index in range(1, 40):
        await publish_stored(writer, *make_point(ep.url, run_id, index, rng))
        t0 = time.monotonic()
        await writer.wait_for_room(5.0)
        waited.append(time.monotonic() - t0)
    stats_down = writer.stats()
    await tiled_server.start()
    await writer.publish(RunStopped(run_id, time.time(), num_frames=40, processed=40, run_key=run_id))
    assert await writer.flush(timeout=180)
    await writer.stop()

    assert max(waited) < 5.0 and sum(waited) < 5.0  # no call sat out its wait: only until a write failed
    assert stats_down.frames_not_written.get("buffer_full", 0) > 0  # the buffer took the outage, counted
