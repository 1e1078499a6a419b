"""Re-clustering's corrections reach Tiled: the writer appends them to latent/cluster_updates after the rows
they correct, and the run catalog (REST /api/runs/{id}/points for runs not in memory) returns corrected ids."""

from __future__ import annotations

import time

import numpy as np
from tiled.client import from_uri
from tiled_support import make_point, publish_stored, tiled_server_fixture

from operators import point_row
from operators.messages import ClusterNew, ClusterUpdate, RunStarted, RunStopped
from operators.persist.catalog import TiledRunCatalog
from operators.persist.server import EmbeddedTiledServer
from operators.persist.writer import TiledWriter

tiled_server = tiled_server_fixture()


async def test_the_catalog_returns_the_ids_corrected_by_cluster_updates(tiled_server: EmbeddedTiledServer,
                                                                      tmp_path) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(2)
    writer = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path)
    await writer.start()
    run = "run-updates"
    await writer.publish(RunStarted(run, "ramp", time.time(), run_key=run))
    sent = {}
    for index in range(12):
        p, img = make_point(ep.url, run, index, rng)
        p.cluster = 1
        sent[index] = 1
        await publish_stored(writer, p, img)
    await writer.publish(ClusterNew(run, 5, 6, time.time()))
    await writer.publish(ClusterUpdate(run, [6, 7, 8, 9], [5, 5, 5, 5], time.time(), run_key=run))
    p, img = make_point(ep.url, run, 12, rng)
    p.cluster = 5
    await publish_stored(writer, p, img)
    await writer.publish(ClusterUpdate(run, [9, 12], [1, 1], time.time(), run_key=run))  # a later word wins
    await writer.publish(RunStopped(run, time.time(), 13, 13, run_key=run))
    assert await writer.flush(timeout=120)
    stats = writer.stats()
    await writer.stop()
    assert stats.rows_written == 13 and stats.rows_not_written == {}

    catalog = TiledRunCatalog(ep.url, ep.api_key)
    try:
        rows = await catalog.run_points(run)
    finally:
        catalog.close()
    assert rows is not None
    assert {r["index"]: r["cluster"] for r in rows} == {**{i: 1 for i in range(13)}, 6: 5, 7: 5, 8: 5}
    # the points table keeps what was sent; the corrections are their own table
    node = from_uri(ep.url, api_key=ep.api_key)[run]["latent"]
    assert set(node["points"].read()["cluster"]) == {1, 5}
    updates = node["cluster_updates"].read()
    assert list(updates["update"]) == [0, 0, 0, 0, 1, 1] and list(updates["index"]) == [6, 7, 8, 9, 9, 12]


async def test_a_run_without_updates_reads_as_before(tiled_server: EmbeddedTiledServer, tmp_path) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(3)
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path) as writer:
        await writer.publish(RunStarted("run-plain", "plain", time.time(), run_key="run-plain"))
        points = [make_point(ep.url, "run-plain", i, rng) for i in range(4)]
        for p, img in points:
            await publish_stored(writer, p, img)
        assert await writer.flush(timeout=60)
    catalog = TiledRunCatalog(ep.url, ep.api_key)
    try:
        rows = await catalog.run_points("run-plain")
    finally:
        catalog.close()
    assert [r["cluster"] for r in rows] == [p.cluster for p, _ in points]
    # rows read back from Tiled are the point row (operators.point_row) under its wire names, as sent
    assert rows == [point_row.rest_row(point_row.values(p)) for p, _ in points]
