"""/lse speaks exactly what the Latent Space Explorer's live mode reads (../shared/notes/lse-live-mode.md)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
from bridge_support import (
    MODEL,
    bridge,
    cluster_new,
    connect,
    frame_url,
    point,
    receive,
    run_started,
    run_stopped,
)
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr


class LatentSpaceEvent(BaseModel):
    """The LSE's LatentSpaceEvent, plus this service's own keys; nothing else is allowed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tiled_url: StrictStr
    feature_vector: list[StrictFloat]
    index: StrictInt
    autoencoder_model: StrictStr
    dimred_model: StrictStr
    experiment_name: StrictStr
    timestamp: StrictFloat
    total_processing_time: StrictFloat
    autoencoder_time: StrictFloat
    dimred_time: StrictFloat
    # this service's keys
    run_id: StrictStr
    cluster: StrictInt
    novelty: StrictFloat


def lse_parse_tiled_url(url: str) -> tuple[str, int]:
    """(dataset path, frame index) the way the LSE reads a tiled_url."""
    parts = urlsplit(url)
    match = re.search(r"api/v1/(?:metadata|array/(?:full|block))/(.*)", parts.path)
    assert match, f"the LSE cannot find a dataset in {url}"
    slice_expr = parse_qs(parts.query).get("slice", ["0"])[0]
    return match.group(1), int(slice_expr.split(",")[0].split(":")[0])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8000/api/v1/array/full/r/primary/image?slice=5", ("r/primary/image", 5)),
        ("http://h:8000/api/v1/array/full/r/primary/image?slice=5:6", ("r/primary/image", 5)),
        ("http://h:8000/api/v1/array/full/r/primary/image?slice=5:6,0:1679,0:1475", ("r/primary/image", 5)),
        ("http://h:8000/api/v1/metadata/r/primary/image", ("r/primary/image", 0)),
    ],
)
def test_the_lse_url_reading_used_below_matches_the_note(url: str, expected: tuple[str, int]) -> None:
    assert lse_parse_tiled_url(url) == expected


async def test_lse_clients_get_one_schema_exact_json_message_per_point_and_nothing_else() -> None:
    run_id = "scan-42"
    async with bridge() as srv, connect(f"{srv.ws}/lse") as ws:
        await srv.hub.publish(run_started(run_id, "scan 42", experiment_name="beamtime-7"))
        await srv.hub.publish(point(run_id, 0))
        await srv.hub.publish(cluster_new(run_id, 1, 1))  # typed events never reach /lse
        await srv.hub.publish(point(run_id, 1, cluster=1))
        # the ALS form of a frame URI with a full slice
        await srv.hub.publish(
            point(run_id, 2, url=f"{frame_url(run_id, 2).split('?')[0]}?slice=2:3,0:1679,0:1475")
        )
        await srv.hub.publish(run_stopped(run_id, 3))
        await srv.hub.publish(run_started("scan-43", "scan 43"))
        await srv.hub.publish(point("scan-43", 0))

        raw = [await ws.recv() for _ in range(4)]
        assert all(isinstance(r, str) for r in raw), "the LSE reads JSON text frames"
        events = [LatentSpaceEvent.model_validate_json(r) for r in raw]

    assert [(e.run_id, e.index) for e in events] == [(run_id, 0), (run_id, 1), (run_id, 2), ("scan-43", 0)]
    for event in events:
        assert len(event.feature_vector) == 2
        assert event.autoencoder_model == MODEL.autoencoder_model
        assert event.dimred_model == MODEL.dimred_model
        dataset, index = lse_parse_tiled_url(event.tiled_url)
        assert index == event.index
        assert dataset == f"{event.run_id}/primary/image"
        assert event.total_processing_time == pytest.approx(0.03)
        assert event.autoencoder_time == pytest.approx(0.02)
        assert event.dimred_time == pytest.approx(0.004)
    assert events[0].experiment_name == "beamtime-7"
    assert events[3].experiment_name == "scan 43"  # the run name when the start document names no experiment
    assert events[1].cluster == 1


async def test_lse_feature_vector_is_the_published_point() -> None:
    async with bridge() as srv, connect(f"{srv.ws}/lse") as ws:
        await srv.hub.publish(run_started("r"))
        p = point("r", 7)
        await srv.hub.publish(p)
        event = LatentSpaceEvent.model_validate(await receive(ws))
    assert event.feature_vector == [float(p.x), float(p.y)]
    assert event.novelty == p.novelty
    assert event.timestamp == p.timestamp


async def test_lse_late_joiner_gets_history_only_when_asking_for_backfill() -> None:
    async with bridge() as srv:
        await srv.hub.publish(run_started("r"))
        for i in range(5):
            await srv.hub.publish(point("r", i))
        async with (
            connect(f"{srv.ws}/lse?backfill=true") as with_history,
            connect(f"{srv.ws}/lse") as live_only,
        ):
            await srv.hub.publish(point("r", 5))
            history = [LatentSpaceEvent.model_validate(await receive(with_history)) for _ in range(6)]
            live = LatentSpaceEvent.model_validate(await receive(live_only))
    assert [e.index for e in history] == [0, 1, 2, 3, 4, 5]
    assert live.index == 5
