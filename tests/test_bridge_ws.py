"""The full stream on /ws: typed events, backfill for late joiners, msgpack, slow clients, tokens."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import uvicorn
from bridge_support import (
    bridge,
    close_code,
    cluster_new,
    connect,
    point,
    receive,
    receive_until,
    run_started,
    run_stopped,
)
from prometheus_client import generate_latest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from frontend_bridge import Hub
from frontend_bridge.wire import LSE_KEYS, SERVICE_KEYS
from stream.serve import bridge_server_config


async def publish_paced_by(
    hub: Hub, received: list[int], n: int, batch: int = 100, pause: float = 0.0
) -> None:
    """Publish n points in batches, never more than one batch ahead of the fast reader.

    If a stalled client could hold the hub up, the fast reader would stop progressing and this
    would never finish; the stalled client meanwhile falls further behind with every batch.
    pause: seconds between batches (stretches the run).
    """
    for start in range(0, n, batch):
        for i in range(start, min(start + batch, n)):
            await hub.publish(point("r1", i))
        async with asyncio.timeout(30):
            while len(received) < start:
                await asyncio.sleep(0.001)
        await asyncio.sleep(pause)


async def publish_read_by(hub: Hub, fast: ClientConnection, n: int, pause: float = 0.0) -> list[int]:
    """Publish n points paced by `fast` (publish_paced_by), which reads them all; the indexes it read."""
    received: list[int] = []

    async def read_fast() -> None:
        while len(received) < n:
            received.append((await receive(fast))["index"])

    reader = asyncio.create_task(read_fast())
    await publish_paced_by(hub, received, n, pause=pause)
    await asyncio.wait_for(reader, 60)
    return received


async def indexes_through(ws: ClientConnection, last: int) -> list[int]:
    """The point indexes `ws` reads up to and including `last`."""
    indexes: list[int] = []
    while not indexes or indexes[-1] != last:
        indexes.append((await receive(ws))["index"])
    return indexes


def _types(messages: list[dict]) -> list[str]:
    return [m["type"] for m in messages]


async def test_a_client_present_from_the_start_sees_the_run_as_typed_events_in_order() -> None:
    async with bridge() as srv, connect(f"{srv.ws}/ws") as ws:
        assert [await receive(ws), await receive(ws)] == [
            {"type": "backfill_start", "run_id": None, "count": 0},
            {"type": "backfill_end", "run_id": None, "count": 0, "skipped": 0},
        ]
        await srv.hub.publish(run_started("r1", "scan one", sample="AgBeh"))
        await srv.hub.publish(point("r1", 0))
        await srv.hub.publish(cluster_new("r1", 1, 1))
        await srv.hub.publish(point("r1", 1, cluster=1))
        await srv.hub.publish(run_stopped("r1", 2))
        messages = await receive_until(ws, lambda m: m["type"] == "run_stop")

    assert _types(messages) == ["run_start", "point", "cluster_new", "point", "run_stop"]
    start, p0, new, p1, stop = messages
    assert start["run_id"] == "r1" and start["run_name"] == "scan one"
    assert start["metadata"] == {"sample": "AgBeh"}
    assert set(p0) == {"type", *LSE_KEYS, *SERVICE_KEYS}
    assert (p0["index"], p1["index"], p1["cluster"]) == (0, 1, 1)
    assert new == {
        "type": "cluster_new",
        "run_id": "r1",
        "cluster": 1,
        "index": 1,
        "timestamp": new["timestamp"],
    }
    assert (stop["run_id"], stop["processed"], stop["num_frames"], stop["reason"]) == ("r1", 2, 2, "stop")


async def test_a_late_client_gets_the_current_run_then_live_points_without_gaps_or_duplicates() -> None:
    async with bridge(backfill_chunk=64) as srv:
        await srv.hub.publish(run_started("r1"))
        for i in range(300):
            await srv.hub.publish(point("r1", i, cluster=0 if i < 100 else 1))
            if i == 100:
                await srv.hub.publish(cluster_new("r1", 1, 100))
        async with connect(f"{srv.ws}/ws") as ws:
            # Keep publishing while the client is still catching up.
            for i in range(300, 600):
                await srv.hub.publish(point("r1", i))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            messages = await receive_until(ws, lambda m: m.get("index") == 599)

    assert _types(messages[:3]) == ["run_start", "backfill_start", "cluster_new"]
    assert messages[1] == {"type": "backfill_start", "run_id": "r1", "count": 300}
    points = [m["index"] for m in messages if m["type"] == "point"]
    assert points == list(range(600))
    ends = [m for m in messages if m["type"] == "backfill_end"]
    assert len(ends) == 1 and ends[0]["count"] >= 300 and ends[0]["skipped"] == 0
    after_end = messages[messages.index(ends[0]) + 1 :]
    assert all(m["type"] == "point" for m in after_end)
    assert [m["index"] for m in messages if m["type"] == "point"][: ends[0]["count"]] == list(
        range(ends[0]["count"])
    )


async def test_a_client_joining_after_the_run_ended_sees_the_whole_run_and_its_stop() -> None:
    async with bridge() as srv:
        await srv.hub.publish(run_started("r1"))
        for i in range(10):
            await srv.hub.publish(point("r1", i))
        await srv.hub.publish(run_stopped("r1", 10))
        async with connect(f"{srv.ws}/ws") as ws:
            messages = await receive_until(ws, lambda m: m["type"] == "run_stop")
    assert _types(messages) == ["run_start", "backfill_start", *["point"] * 10, "backfill_end", "run_stop"]


async def test_a_new_run_during_a_backfill_follows_the_old_run_in_order() -> None:
    async with bridge(backfill_chunk=16) as srv:
        await srv.hub.publish(run_started("old"))
        for i in range(200):
            await srv.hub.publish(point("old", i))
        async with connect(f"{srv.ws}/ws") as ws:
            await srv.hub.publish(run_stopped("old", 200))
            await srv.hub.publish(run_started("new"))
            await srv.hub.publish(point("new", 0))
            messages = await receive_until(ws, lambda m: m.get("run_id") == "new" and m["type"] == "point")
    kinds = [(m["type"], m.get("run_id")) for m in messages if m["type"] != "point" or m["run_id"] == "new"]
    assert kinds == [
        ("run_start", "old"),
        ("backfill_start", "old"),
        ("backfill_end", "old"),
        ("run_stop", "old"),
        ("run_start", "new"),
        ("point", "new"),
    ]
    assert [m["index"] for m in messages if m["type"] == "point" and m["run_id"] == "old"] == list(range(200))


async def test_msgpack_clients_get_binary_frames_with_the_same_messages() -> None:
    async with bridge() as srv:
        await srv.hub.publish(run_started("r1"))
        await srv.hub.publish(point("r1", 0))
        async with connect(f"{srv.ws}/ws?format=msgpack") as packed, connect(f"{srv.ws}/ws") as text:
            await srv.hub.publish(point("r1", 1))
            raw = [await asyncio.wait_for(packed.recv(), 10) for _ in range(5)]
            as_json = await receive_until(text, lambda m: m.get("index") == 1)
    assert all(isinstance(r, bytes) for r in raw)
    decoded = [msgpack.unpackb(r, raw=False) for r in raw]
    assert _types(decoded) == ["run_start", "backfill_start", "point", "backfill_end", "point"]
    assert decoded == as_json


async def test_an_unknown_format_is_refused_with_1003() -> None:
    async with bridge() as srv, connect(f"{srv.ws}/ws?format=xml") as ws:
        assert await close_code(ws) == 1003


async def test_a_client_that_stops_reading_is_dropped_and_never_delays_the_others() -> None:
    n = 20_000
    async with bridge(ws_queue=256) as srv:
        await srv.hub.publish(run_started("r1"))
        # max_queue=1: the slow client's library stops reading the socket as soon as one message waits.
        async with (
            connect(f"{srv.ws}/ws", max_queue=1, compression=None) as slow,
            connect(f"{srv.ws}/ws") as fast,
        ):
            await receive_until(fast, lambda m: m["type"] == "backfill_end")
            received: list[int] = []

            async def read_fast() -> None:
                while len(received) < n:
                    message = await receive(fast)
                    if message["type"] == "point":
                        received.append(message["index"])

            reader = asyncio.create_task(read_fast())
            await publish_paced_by(srv.hub, received, n)
            await asyncio.wait_for(reader, 60)
            assert received == list(range(n))
            assert srv.hub.dropped["ws_slow_client"] == 1
            assert srv.hub.client_counts()["ws"] == 1
            # When the slow client reads again, it finds the server closed it with "try again later".
            assert await close_code(slow, timeout=30) == 1013
        metrics = generate_latest(srv.registry).decode()
    assert 'latent_stream_bridge_dropped_total{reason="ws_slow_client"} 1.0' in metrics


async def test_a_slow_lse_client_loses_its_oldest_points_and_keeps_the_newest() -> None:
    n = 20_000
    async with bridge(lse_queue=256) as srv:
        await srv.hub.publish(run_started("r1"))
        async with (
            connect(f"{srv.ws}/lse", max_queue=1, compression=None) as slow,
            connect(f"{srv.ws}/lse") as fast,
        ):
            received = await publish_read_by(srv.hub, fast, n)
            assert received == list(range(n))
            dropped = srv.hub.dropped["lse_slow_client"]
            assert dropped > 0
            slow_indexes = await indexes_through(slow, n - 1)
    assert slow_indexes == sorted(slow_indexes)  # order kept, the oldest queued points dropped
    assert len(slow_indexes) == n - dropped
    assert slow_indexes[-256:] == list(range(n - 256, n))


@pytest.mark.parametrize("path", ["/ws", "/lse"])
async def test_with_a_token_websockets_without_it_are_closed_with_1008(path: str) -> None:
    async with bridge(token="s3cret") as srv:
        async with connect(f"{srv.ws}{path}") as ws:
            assert await close_code(ws) == 1008
        async with connect(f"{srv.ws}{path}?token=wrong") as ws:
            assert await close_code(ws) == 1008
        await srv.hub.publish(run_started("r1"))
        async with (
            connect(f"{srv.ws}{path}?token=s3cret") as by_query,
            connect(f"{srv.ws}{path}", additional_headers={"Authorization": "Bearer s3cret"}) as by_header,
        ):
            await srv.hub.publish(point("r1", 0))
            for ws in (by_query, by_header):
                last = await receive_until(ws, lambda m: m.get("index") == 0)
                assert last[-1]["run_id"] == "r1"


async def test_clients_are_told_when_the_server_shuts_down() -> None:
    async with bridge() as srv:
        ws = await connect(f"{srv.ws}/ws")
        await receive_until(ws, lambda m: m["type"] == "backfill_end")
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)


async def test_a_client_can_skip_the_backfill_and_get_only_live_messages() -> None:
    async with bridge() as srv:
        await srv.hub.publish(run_started("r1"))
        await srv.hub.publish(point("r1", 0))
        async with connect(f"{srv.ws}/ws?backfill=false") as ws:
            await srv.hub.publish(point("r1", 1))
            first = await receive(ws)
    assert (first["type"], first["index"]) == ("point", 1)


def keepalive_100x_faster(app: object) -> uvicorn.Config:
    """The service's own uvicorn settings with its keepalive 100 times faster: a stall of seconds here is
    minutes served."""
    config = bridge_server_config(app, "127.0.0.1", 0)
    assert config.ws_ping_interval is not None
    config.ws_ping_interval /= 100
    if config.ws_ping_timeout is not None:
        config.ws_ping_timeout /= 100
    return config


async def test_a_stalled_lse_client_keeps_its_connection_and_gets_the_newest_points_on_reading() -> None:
    n = 20_000
    async with bridge(server_config=keepalive_100x_faster, lse_queue=256) as srv:
        await srv.hub.publish(run_started("r1"))
        async with (
            # Its library stops reading the socket (pongs included) as soon as one message waits.
            connect(f"{srv.ws}/lse", max_queue=1, compression=None, ping_interval=None) as slow,
            connect(f"{srv.ws}/lse") as fast,
        ):
            stalled_since = time.monotonic()
            await publish_read_by(srv.hub, fast, n, pause=0.02)
            assert time.monotonic() - stalled_since > 20 * 0.2  # 20 keepalive intervals, the fast ones
            assert srv.hub.client_counts()["lse"] == 2
            slow_indexes = await indexes_through(slow, n - 1)
    assert srv.hub.dropped["lse_slow_client"] > 0
    assert slow_indexes == sorted(slow_indexes) and slow_indexes[-256:] == list(range(n - 256, n))


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"plan": _nested(300)}, "metadata_too_deep"),  # JSON encoders stop at 255 levels
        ({"notes": "x" * 100_000}, "metadata_too_large"),
        ({"sample": "\ud800"}, "metadata_unencodable"),  # a lone surrogate: not UTF-8
    ],
)
async def test_start_metadata_that_cannot_be_sent_is_omitted_and_every_client_still_connects(
    metadata: dict, reason: str
) -> None:
    async with bridge() as srv, connect(f"{srv.ws}/ws") as present:
        await receive_until(present, lambda m: m["type"] == "backfill_end")
        await srv.hub.publish(run_started("r1", **metadata))
        await srv.hub.publish(point("r1", 0))
        live = await receive_until(present, lambda m: m["type"] == "point")
        async with connect(f"{srv.ws}/ws") as text, connect(f"{srv.ws}/ws?format=msgpack") as packed:
            joined = [await receive_until(ws, lambda m: m["type"] == "backfill_end") for ws in (text, packed)]
    for messages in (live, *joined):
        start = messages[0]
        assert (start["type"], start["run_id"], start["metadata"]) == ("run_start", "r1", {})
        assert start["metadata_omitted"] == reason
        assert [m["index"] for m in messages if m["type"] == "point"] == [0]
    assert srv.hub.dropped[reason] == 1


async def test_start_metadata_within_the_bounds_reaches_clients_whole() -> None:
    metadata = {"plan": _nested(20), "notes": "x" * 50_000, "detectors": ["pilatus", 2]}
    async with bridge() as srv:
        await srv.hub.publish(run_started("r1", **metadata))
        async with connect(f"{srv.ws}/ws?format=msgpack") as ws:
            start = await receive(ws)
    assert (start["metadata"], start["metadata_omitted"]) == (metadata, None)


async def test_a_cluster_update_from_the_pipelines_re_clustering_reaches_a_real_ws_client(default_bundle) -> None:
    """Real pipeline (worker-process re-clustering) -> hub -> uvicorn -> websocket clients, /ws and /lse."""
    from prometheus_client import CollectorRegistry
    from ramp_support import ScriptedBundle, ramp_run
    from test_pipeline_recluster import _frame

    from operators.messages import RunStarted
    from operators.metrics import PipelineMetrics
    from operators.pipeline import LivePipeline
    from stream.synthetic import generate_scan

    state, script, _ = ramp_run()
    images = [f.image for f in generate_scan("film_formation", 4, seed=3)]
    pipeline = LivePipeline(ScriptedBundle(default_bundle, state, script), PipelineMetrics(CollectorRegistry()),
                            tiled_base_url="http://127.0.0.1:8000", recluster="process")
    async with bridge() as srv, connect(f"{srv.ws}/ws") as ws, connect(f"{srv.ws}/ws?format=msgpack") as mp, \
            connect(f"{srv.ws}/lse") as lse:
        pipeline.add_publisher(srv.hub)
        task = asyncio.create_task(pipeline.run())
        try:
            await pipeline.submit(RunStarted("run-r", "ramp", time.time(), run_key="run-r-key"))
            for i in range(len(script)):
                await pipeline.submit(_frame("run-r", i, images[i % len(images)]))
            json_msgs = await receive_until(ws, lambda m: m["type"] == "cluster_update", 90)
            mp_msgs = await receive_until(mp, lambda m: m["type"] == "cluster_update", 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pipeline.close()
        lse_msgs = []
        with pytest.raises(TimeoutError):
            while True:
                lse_msgs.append(await receive(lse, 1.0))

    update = json_msgs[-1]
    assert set(update) == {"type", "run_id", "indices", "clusters"} and update["run_id"] == "run-r"
    assert len(update["indices"]) == len(update["clusters"]) > 0
    sent = {m["index"]: m["cluster"] for m in json_msgs if m["type"] == "point"}
    announced = {m["cluster"] for m in json_msgs if m["type"] == "cluster_new"}
    for i, c in zip(update["indices"], update["clusters"], strict=True):
        assert i in sent and sent[i] != c  # corrects a point the client already has
        assert c in announced  # to an id announced before
    assert mp_msgs[-1] == update  # msgpack clients get the same message
    assert lse_msgs and all("type" not in m for m in lse_msgs)  # /lse: points only, as they were sent
    # the hub's store (backfill, REST) holds the corrected ids
    rows = {r["index"]: r["cluster"] for r in srv.hub.run_rows("run-r")}
    assert all(rows[i] == c for i, c in zip(update["indices"], update["clusters"], strict=True))
