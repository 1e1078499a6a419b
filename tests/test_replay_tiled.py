"""Replay from a Tiled frame stack, the run catalog, and `verify` against a real Tiled server (issue 4)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import zmq
import zmq.asyncio
from tiled.client import from_uri
from tiled_support import make_point, publish_stored, tiled_server_fixture

from operators import point_row
from operators.messages import RunStarted, RunStopped
from operators.persist.catalog import TiledRunCatalog
from operators.persist.server import EmbeddedTiledServer, free_port
from operators.persist.writer import TiledWriter
from stream.protocol import Event, Start, Stop, decode
from stream.replay import open_source, replay_source, verify_runs

tiled_server = tiled_server_fixture()


def _free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


async def test_replay_from_a_tiled_uri_carries_each_frames_tiled_uri(
    tiled_server: EmbeddedTiledServer, tmp_path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    frames = np.random.default_rng(8).integers(0, 1000, (5, 43, 62), dtype=np.int32)
    client = from_uri(ep.url, api_key=ep.api_key)
    client.create_container("beamline").write_array(
        frames, key="scan7", metadata={"timestamps": [0, 1, 2, 3, 4]}
    )
    uri = f"{ep.url}/api/v1/array/full/beamline/scan7"
    src = open_source(uri, api_key=ep.api_key)
    assert src.count == 5 and src.timestamps is not None
    address = _free_address()
    sender = asyncio.create_task(replay_source(src, address, rate=0, run_id="tiled-replay", report_dir=tmp_path,
                                               progress=False))  # fmt: skip
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    got = []
    try:
        while not got or not isinstance(got[-1], Stop):
            got.append(decode(await asyncio.wait_for(sock.recv(), 30)))
        await asyncio.wait_for(sender, 30)
    finally:
        sock.close(linger=0)
        ctx.term()
        src.close()
    assert isinstance(got[0], Start)
    events = [m for m in got if isinstance(m, Event)]
    assert [e.frame_number for e in events] == [0, 1, 2, 3, 4]
    assert [e.tiled_url for e in events] == [f"{uri}?slice={i}" for i in range(5)]
    for e, frame in zip(events, frames, strict=True):
        np.testing.assert_array_equal(e.image, frame)


async def test_verify_reports_sent_processed_stored_and_lost_per_run(
    tiled_server: EmbeddedTiledServer, tmp_path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(9)
    writer = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path / "svc")
    await writer.start()
    for run_id, n_processed in (("complete", 6), ("short", 4)):
        await writer.publish(RunStarted(run_id, run_id, time.time(), run_key=run_id))
        for i in range(n_processed):
            await publish_stored(writer, *make_point(ep.url, run_id, i, rng))
        await writer.publish(RunStopped(run_id, time.time(), num_frames=6, processed=n_processed, run_key=run_id))
        (tmp_path / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "sent": 6}))
    assert await writer.flush(timeout=60)
    await writer.stop()

    rows = {r["run_id"]: r for r in await verify_runs([], report_dir=tmp_path, tiled_url=ep.url,
                                                      tiled_api_key=ep.api_key)}  # fmt: skip
    assert rows["complete"]["sent"] == rows["complete"]["processed"] == rows["complete"]["stored"] == 6
    assert rows["complete"]["lost"] == 0 and rows["complete"]["ok"]
    assert rows["short"]["sent"] == 6 and rows["short"]["processed"] == 4 and rows["short"]["lost"] == 2
    assert not rows["short"]["ok"]

    catalog = TiledRunCatalog(ep.url, ep.api_key)
    runs = await catalog.list_runs(10)
    assert {"complete", "short"} <= {r["run_id"] for r in runs}
    points = await catalog.run_points("complete")
    assert [p["index"] for p in points] == list(range(6))
    assert list(points[0]) == list(point_row.WIRE_KEYS)  # the point row, under its wire names
    assert await catalog.run_points("no-such-run") is None
    # every field the catalog returns is one the writer writes: none is empty for a run closed cleanly
    [listed] = [r for r in runs if r["run_id"] == "complete"]
    assert None not in listed.values()
    report = await catalog.run_report("complete")
    assert report is not None and None not in report.values()
    assert report["num_frames"] == report["processed"] == report["rows_stored"] == report["frames_stored"] == 6
    await asyncio.to_thread(catalog.close)
