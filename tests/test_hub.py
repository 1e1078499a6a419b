"""The hub's memory: bounded per-run point store, run index, drop policies and their counters."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from bridge_support import MODEL, cluster_new, point, run_started, run_stopped
from prometheus_client import CollectorRegistry, generate_latest

from frontend_bridge import Hub, WireFormat
from frontend_bridge.clients import ClientClosed
from frontend_bridge.point_store import PointStore
from operators import point_row


def _row(i: int) -> dict:
    return point_row.values(point("r", i, url=f"u{i}"))


def test_the_point_store_keeps_the_newest_points_and_reports_each_eviction() -> None:
    store = PointStore(max_points=5, initial_capacity=2)
    sent = [_row(i) for i in range(8)]
    evictions = [store.append(row) for row in sent]
    assert evictions == [False] * 5 + [True] * 3
    assert (store.first_seq, store.end_seq, len(store)) == (3, 8, 5)
    rows = store.rows(0, 100)
    assert rows == sent[3:]  # every field of the point row, as it went in
    assert [r["tiled_url"] for r in rows] == ["u3", "u4", "u5", "u6", "u7"]
    assert [r["index"] for r in store.rows(6, 7)] == [6]  # a slice across the ring's wrap point
    assert store.rows(8, 9) == []


def test_the_point_store_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_points"):
        PointStore(0)


async def test_points_beyond_the_memory_bound_are_evicted_and_counted() -> None:
    hub = Hub(MODEL, max_points=10)
    await hub.publish(run_started("r"))
    for i in range(25):
        await hub.publish(point("r", i))
    assert hub.dropped["store_full"] == 15
    assert hub.runs()[0]["num_points"] == 25
    assert hub.runs()[0]["points_in_memory"] == 10
    assert hub.run_rows("r") is None  # partial in memory: the catalog must answer


async def test_a_late_client_whose_backfill_was_evicted_is_told_how_many_points_it_missed() -> None:
    hub = Hub(MODEL, max_points=10, backfill_chunk=4)
    await hub.publish(run_started("r"))
    for i in range(10):
        await hub.publish(point("r", i))
    client = hub.connect("ws", WireFormat.WS_JSON, backfill=True)
    batch = [json.loads(p) for p in await client.next_batch()]
    assert [m["type"] for m in batch] == ["run_start", "backfill_start"]
    first = [json.loads(p)["index"] for p in await client.next_batch()]
    for i in range(10, 16):  # evicts 0..5 while the client is between chunks
        await hub.publish(point("r", i))
    rest: list[dict] = []
    while not rest or rest[-1]["type"] != "backfill_end":
        rest.extend(json.loads(p) for p in await client.next_batch())
    indexes = first + [m["index"] for m in rest if m["type"] == "point"]
    assert indexes == [0, 1, 2, 3, *range(6, 16)]
    assert rest[-1] == {"type": "backfill_end", "run_id": "r", "count": 14, "skipped": 2}


async def test_a_new_run_supersedes_an_unstopped_one_and_both_are_indexed() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("a"))
    await hub.publish(point("a", 0))
    await hub.publish(run_started("b"))
    runs = hub.runs()
    assert [(r["run_id"], r["current"], r["active"]) for r in runs] == [
        ("b", True, True),
        ("a", False, False),
    ]
    assert hub.run_rows("a")[0]["index"] == 0


async def test_late_points_of_a_finished_run_are_dropped_and_counted() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("a"))
    await hub.publish(run_stopped("a", 0))
    await hub.publish(point("a", 0))
    await hub.publish(run_started("b"))
    await hub.publish(point("a", 1))
    await hub.publish(cluster_new("a", 3, 1))
    assert hub.dropped["stale_run"] == 3
    assert hub.run_rows("a") == []


async def test_a_point_for_an_unannounced_run_opens_it() -> None:
    hub = Hub(MODEL)
    await hub.publish(point("surprise", 0))
    assert hub.current is not None and hub.current.run_id == "surprise"
    assert hub.run_rows("surprise")[0]["index"] == 0


async def test_unsupported_messages_are_counted_not_raised() -> None:
    hub = Hub(MODEL)
    await hub.publish({"msg_type": "event"})  # type: ignore[arg-type]
    assert hub.dropped["unsupported_message"] == 1


async def test_past_runs_keep_their_points_only_within_the_past_points_bound() -> None:
    hub = Hub(MODEL, max_points=100, max_past_points=15, max_runs=2)
    for run in ("a", "b", "c", "d"):
        await hub.publish(run_started(run))
        for i in range(10):
            await hub.publish(point(run, i))
        await hub.publish(run_stopped(run, 10))
    await hub.publish(run_started("e"))
    assert [r["run_id"] for r in hub.runs()] == ["e", "d", "c"]  # max_runs finished runs remembered
    assert len(hub.run_rows("d")) == 10
    assert hub.run_rows("c") is None  # 10 + 10 > 15: only the newest past run keeps its points
    assert hub.run_rows("a") is None


async def test_a_full_ws_client_queue_closes_that_client_with_1013() -> None:
    hub = Hub(MODEL, ws_queue=3)
    await hub.publish(run_started("r"))
    client = hub.connect("ws", WireFormat.WS_JSON, backfill=False)
    other = hub.connect("ws", WireFormat.WS_JSON, backfill=False)
    for i in range(3):
        await hub.publish(point("r", i))
    assert len(await other.next_batch()) == 3  # this one keeps up
    await hub.publish(point("r", 3))
    assert len(await other.next_batch()) == 1
    with pytest.raises(ClientClosed) as closed:
        await client.next_batch()
    assert closed.value.code == 1013
    assert hub.dropped["ws_slow_client"] == 1


async def test_the_hub_counters_are_on_the_registry_it_was_given() -> None:
    registry = CollectorRegistry()
    hub = Hub(MODEL, registry=registry, lse_queue=2)
    await hub.publish(run_started("r"))
    hub.connect("lse", WireFormat.LSE_JSON, backfill=False)
    for i in range(5):
        await hub.publish(point("r", i))
    text = generate_latest(registry).decode()
    assert 'latent_stream_bridge_clients{endpoint="lse"} 1.0' in text
    assert 'latent_stream_bridge_dropped_total{reason="lse_slow_client"} 3.0' in text
    assert 'latent_stream_bridge_dropped_total{reason="store_full"} 0.0' in text
    assert "latent_stream_bridge_points_total 5.0" in text
    assert "latent_stream_bridge_backfill_points 5.0" in text


async def test_health_statistics_come_from_the_published_timings() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    for i in range(10):
        await hub.publish(point("r", i))
    p50 = hub.stage_p50_ms()
    assert p50["encode"] == pytest.approx(20.0)
    assert p50["total"] == pytest.approx(30.0)
    assert hub.frames_per_second() > 0


async def test_a_point_that_cannot_be_placed_is_dropped_and_counted() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    bad = point("r", 0)
    bad.x = float("nan")
    await hub.publish(bad)
    await hub.publish(point("r", 1))
    assert hub.dropped["non_finite_point"] == 1
    assert [row["index"] for row in hub.run_rows("r")] == [1]


async def test_a_repeated_start_of_the_active_run_keeps_its_points() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    await hub.publish(point("r", 0))
    await hub.publish(run_started("r"))
    await hub.publish(point("r", 1))
    assert [r["run_id"] for r in hub.runs()] == ["r"]
    assert [row["index"] for row in hub.run_rows("r")] == [0, 1]


async def _memory_held_by_runs(notes_bytes: int, runs: int = 33) -> int:
    """Bytes a hub holds after `runs` runs, each with `notes_bytes` of start metadata."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        hub = Hub(MODEL, max_runs=runs - 1)
        for r in range(runs):
            await hub.publish(run_started(f"r{r}", notes=f"{r}" + "x" * notes_bytes))
            await hub.publish(run_stopped(f"r{r}", 0))
        assert len(hub.runs()) == runs
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


async def test_only_the_current_runs_start_metadata_stays_in_memory() -> None:
    metadata_held = await _memory_held_by_runs(60_000) - await _memory_held_by_runs(0)
    assert metadata_held < 500_000  # the current run's 60 kB (within the bound), not 32 past runs' 2 MB


def _update(run_id: str, indices: list[int], clusters: list[int]):
    from operators.messages import ClusterUpdate

    return ClusterUpdate(run_id, indices, clusters, 1.0, run_key=run_id)


async def test_a_cluster_update_corrects_the_stored_points_and_reaches_ws_clients_but_not_lse() -> None:
    hub = Hub(MODEL, max_points=8)
    await hub.publish(run_started("r"))
    ws = hub.connect("ws", WireFormat.WS_JSON, backfill=False)
    lse = hub.connect("lse", WireFormat.LSE_JSON, backfill=False)
    for i in range(10):  # 0 and 1 are evicted: the update names them too, harmlessly
        await hub.publish(point("r", i, cluster=1))
    await hub.publish(cluster_new("r", 7, 6))
    await hub.publish(_update("r", [0, 6, 7, 8], [7, 7, 7, 7]))
    got = [json.loads(p) for p in await ws.next_batch()]
    assert got[-2]["type"] == "cluster_new"
    assert got[-1] == {"type": "cluster_update", "run_id": "r", "indices": [0, 6, 7, 8], "clusters": [7, 7, 7, 7]}
    assert all(json.loads(p)["cluster"] == 1 for p in await lse.next_batch())  # points only, as sent
    assert not lse.queue
    rows = hub.current.store.rows(0, 100)
    assert [(r["index"], r["cluster"]) for r in rows] == [(i, 7 if i in (6, 7, 8) else 1) for i in range(2, 10)]
    # a client joining now gets the corrected ids in its backfill
    late = hub.connect("ws", WireFormat.WS_JSON, backfill=True)
    msgs: list[dict] = []
    while not msgs or msgs[-1]["type"] != "backfill_end":
        msgs.extend(json.loads(p) for p in await late.next_batch())
    assert {m["index"]: m["cluster"] for m in msgs if m["type"] == "point"} == {
        i: 7 if i in (6, 7, 8) else 1 for i in range(2, 10)
    }


async def test_a_cluster_update_for_another_run_is_dropped_and_counted() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    await hub.publish(point("r", 0))
    await hub.publish(_update("old", [0], [5]))
    assert hub.dropped["stale_run"] == 1
    assert hub.current.store.rows(0, 1)[0]["cluster"] == 0


async def test_the_rest_api_returns_the_corrected_ids_of_a_run_in_memory() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    for i in range(4):
        await hub.publish(point("r", i, cluster=0))
    await hub.publish(_update("r", [2, 3], [4, 4]))
    assert [row["cluster"] for row in hub.run_rows("r")] == [0, 0, 4, 4]
