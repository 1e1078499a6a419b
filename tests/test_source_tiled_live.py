"""``tiled://`` source: bluesky runs written into a real ``tiled serve`` (Redis streaming) by a real RunEngine with
TiledWriter and a simulated area detector, followed over Tiled's websockets.

The source polls only every 600 s here, so what it delivers during a test came because a websocket woke it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from operators.messages import Frame, RunStarted, RunStopped
from operators.metrics import PipelineMetrics
from stream.ingest import IngestMessage
from stream.protocol import DEFAULT_LIMITS
from stream.sources import SourceContext, build_source, parse_source
from stream.sources.tiled_live import TiledLiveSource
from tests.service_support import WsClient, start_service, stop_service
from tests.tiled_live_support import (
    API_KEY,
    CONTAINER,
    BlueskyBeamline,
    ConnectionCutter,
    TiledServe,
    make_container,
    redis_server,
)

pytestmark = pytest.mark.e2e

# The issue asks for 100 frames (run once: TILED_LIVE_FRAMES=100); CI writes fewer on its 2 cores.
FRAMES = int(os.environ.get("TILED_LIVE_FRAMES", "12"))
DETECTOR_DATASET = "/entry/data/data"  # where ophyd-async's SimBlobDetector writes its frames


class Inbox:
    """The pipeline's side of the seam, keeping what it is given."""

    def __init__(self) -> None:
        self.messages: list[IngestMessage] = []

    async def submit(self, message: IngestMessage) -> bool:
        self.messages.append(message)
        return True

    def frames(self) -> list[Frame]:
        return [m for m in self.messages if isinstance(m, Frame)]

    def stopped(self) -> bool:
        return any(isinstance(m, RunStopped) for m in self.messages)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServe]:
    work = tmp_path_factory.mktemp("tiled-live")
    with redis_server(work) as redis_uri:
        server = TiledServe(work, redis_uri)
        server.start()
        try:
            make_container(server)
            yield server
        finally:
            server.stop()


@pytest.fixture
def beamline(tiled: TiledServe) -> Iterator[BlueskyBeamline]:
    beamline = BlueskyBeamline(tiled)
    yield beamline
    beamline.release()


@contextlib.asynccontextmanager
async def following(
    url: str, inbox: Inbox, metrics: PipelineMetrics, poll_s: float = 600.0
) -> AsyncIterator[TiledLiveSource]:
    spec = parse_source(url)
    ctx = SourceContext(inbox, metrics, DEFAULT_LIMITS, zmq_context=None, api_key=API_KEY)  # type: ignore[arg-type]
    source = build_source(spec, ctx)
    assert isinstance(source, TiledLiveSource)
    source.poll_s = poll_s  # 600 s: websockets must do the waking
    task = asyncio.create_task(source.start())
    await source.wait_connected()
    try:
        yield source
    finally:
        await source.stop()
        assert task.done()


async def until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def detector_frames(tiled: TiledServe, count: int) -> np.ndarray:
    """The frames as the detector wrote them (its newest HDF5 file), (count, H, W)."""
    newest = max(tiled.detector_dir.glob("*.h5"), key=lambda p: p.stat().st_mtime)
    with h5py.File(newest, "r") as f:
        data = f[DETECTOR_DATASET][...]
    assert data.shape[0] == count
    return data


def fetch(url: str) -> np.ndarray:
    response = httpx.get(
        url, headers={"Authorization": f"Apikey {API_KEY}", "Accept": "application/octet-stream"}
    )
    response.raise_for_status()
    return np.frombuffer(response.content, dtype=np.uint8)


def tiled_url(tiled: TiledServe, port: int | None = None) -> str:
    return f"tiled://127.0.0.1:{port or tiled.port}/{CONTAINER}"


async def test_a_service_started_mid_run_gets_every_frame_once_and_each_url_fetches_that_frame(
    tiled: TiledServe, beamline: BlueskyBeamline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    writing = asyncio.create_task(asyncio.to_thread(beamline.run, FRAMES, pauses=(5,)))
    await beamline.wait_paused()  # 5 frames written before the service starts
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    async with following(tiled_url(tiled), inbox, metrics):
        await until(lambda: len(inbox.frames()) == 5)
        beamline.resume()
        uid = await writing
        await until(inbox.stopped)

    started, *_, stopped = inbox.messages
    assert isinstance(started, RunStarted) and started.run_id == uid
    assert started.metadata["plan_name"] == "count" and started.metadata["sample"] == "blobs"
    assert isinstance(stopped, RunStopped) and stopped.reason == "stop" and stopped.num_frames == FRAMES
    frames = inbox.frames()
    assert [f.index for f in frames] == list(range(FRAMES))
    written = detector_frames(tiled, FRAMES)
    for frame in frames:
        assert frame.run_key == started.run_key and frame.image.shape == (240, 320)
        assert np.array_equal(frame.image, written[frame.index])
        assert np.array_equal(fetch(frame.tiled_url).reshape(240, 320), written[frame.index])
        assert "api_key" not in frame.tiled_url and API_KEY not in frame.tiled_url
    assert metrics.lost_upstream._value.get() == 0
    assert metrics.received._value.get() == len(inbox.messages)
    assert API_KEY not in caplog.text


async def test_a_connection_dropped_mid_run_loses_and_repeats_no_frame(
    tiled: TiledServe, beamline: BlueskyBeamline
) -> None:
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    async with (
        ConnectionCutter(tiled.port) as cutter,
        following(tiled_url(tiled, cutter.port), inbox, metrics),
    ):
        cut_at, restore_at = FRAMES // 3, 2 * FRAMES // 3
        writing = asyncio.create_task(asyncio.to_thread(beamline.run, FRAMES, pauses=(cut_at, restore_at)))
        await beamline.wait_paused()
        await until(lambda: len(inbox.frames()) == cut_at)
        cutter.cut(refuse=True)  # websockets and HTTP down while frames cut_at..restore_at - 1 are written
        beamline.resume()
        await beamline.wait_paused()
        assert len(inbox.frames()) == cut_at
        cutter.restore()
        beamline.resume()
        await writing
        await until(inbox.stopped)

    assert_every_frame_once_after_reconnecting(inbox, metrics)
    written = detector_frames(tiled, FRAMES)
    assert all(np.array_equal(f.image, written[f.index]) for f in inbox.frames())


async def test_a_tiled_server_restarted_mid_run_loses_and_repeats_no_frame(
    tiled: TiledServe, beamline: BlueskyBeamline
) -> None:
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    async with following(tiled_url(tiled), inbox, metrics):
        writing = asyncio.create_task(asyncio.to_thread(beamline.run, FRAMES, pauses=(FRAMES // 2,)))
        await beamline.wait_paused()
        await until(lambda: len(inbox.frames()) == FRAMES // 2)
        await asyncio.to_thread(tiled.stop)  # every websocket of the source drops
        await asyncio.to_thread(tiled.start)  # same port, same catalog, same Redis
        beamline.resume()
        await writing
        await until(inbox.stopped)

    assert_every_frame_once_after_reconnecting(inbox, metrics)


def assert_every_frame_once_after_reconnecting(inbox: Inbox, metrics: PipelineMetrics) -> None:
    assert [f.index for f in inbox.frames()] == list(range(FRAMES))
    assert metrics.source_reconnects._value.get() >= 1
    assert metrics.lost_upstream._value.get() == 0


async def test_bad_frames_are_rejected_with_a_reason_and_unwritten_ones_count_as_lost(
    tiled: TiledServe,
) -> None:
    """A float image array with a NaN frame, and a stop document announcing more events than were written."""
    client = tiled.client()
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    async with following(tiled_url(tiled) + "?field=img", inbox, metrics):
        uid = "hand-written-run"
        run = client[CONTAINER].create_container(
            uid, metadata={"start": {"uid": uid, "time": 2e9, "scan_id": 7}}
        )
        stream = run.create_container("primary")
        frames = np.ones((3, 1, 8, 8), dtype=np.float32)
        frames[1, 0, 2, 2] = np.nan
        stream.write_array(frames, key="img")
        stream.write_array(np.zeros((3, 8, 8), dtype=np.int16), key="other")  # not the field asked for
        run.update_metadata({"stop": {"uid": "s", "run_start": uid, "num_events": {"primary": 5}}})
        await until(inbox.stopped)

    assert [f.index for f in inbox.frames()] == [0, 2]
    assert metrics.rejected.labels("non_finite")._value.get() == 1
    # Frame 1 is a gap in the frame numbers (as a rejected frame is for every source), events 3 and 4 never came.
    assert metrics.lost_upstream._value.get() == 3
    assert metrics.received._value.get() == len(inbox.messages) + 1
    stopped = inbox.messages[-1]
    assert isinstance(stopped, RunStopped) and stopped.num_frames == 5


async def test_each_new_run_is_a_run_and_one_left_without_stop_is_superseded_by_the_next(
    tiled: TiledServe,
) -> None:
    client = tiled.client()
    container = client.create_container("runs-in-sequence")
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    async with following(f"tiled://127.0.0.1:{tiled.port}/runs-in-sequence", inbox, metrics):
        for n, uid in enumerate(("crashed-run", "next-run")):
            run = container.create_container(
                uid, metadata={"start": {"uid": uid, "time": 2e9 + n, "scan_id": n}}
            )
            run.create_container("primary").write_array(np.full((2, 4, 4), n, dtype=np.uint16), key="image")
            await until(lambda n=n: len(inbox.frames()) == 2 * (n + 1))
        run.update_metadata({"stop": {"uid": "s", "run_start": "next-run", "num_events": {"primary": 2}}})
        await until(lambda: len([m for m in inbox.messages if isinstance(m, RunStopped)]) == 2)

    kinds = [(type(m).__name__, m.run_id) for m in inbox.messages]
    assert kinds == [("RunStarted", "crashed-run"), ("Frame", "crashed-run"), ("Frame", "crashed-run"),
                     ("RunStopped", "crashed-run"), ("RunStarted", "next-run"), ("Frame", "next-run"),
                     ("Frame", "next-run"), ("RunStopped", "next-run")]  # fmt: skip
    reasons = [m.reason for m in inbox.messages if isinstance(m, RunStopped)]
    assert reasons == ["superseded", "stop"]
    assert all(int(f.image.max()) == (f.run_id == "next-run") for f in inbox.frames())


async def test_a_run_deleted_while_followed_is_closed_and_the_next_run_still_comes(tiled: TiledServe) -> None:
    client = tiled.client()
    container = client.create_container("deleted-run")
    metrics, inbox = PipelineMetrics(CollectorRegistry()), Inbox()
    # Deleting a node sends no websocket message: the source's poll finds the run gone.
    async with following(f"tiled://127.0.0.1:{tiled.port}/deleted-run", inbox, metrics, poll_s=0.5):
        run = container.create_container("gone", metadata={"start": {"uid": "gone", "time": 2e9}})
        run.create_container("primary").write_array(np.zeros((2, 4, 4), dtype=np.uint16), key="image")
        await until(lambda: len(inbox.frames()) == 2)
        container.delete_contents("gone", recursive=True, external_only=False)
        await until(inbox.stopped)
        run = container.create_container("after", metadata={"start": {"uid": "after", "time": 2e9 + 1}})
        run.create_container("primary").write_array(np.ones((1, 4, 4), dtype=np.uint16), key="image")
        await until(lambda: len(inbox.frames()) == 3)

    stops = [(m.run_id, m.reason) for m in inbox.messages if isinstance(m, RunStopped)]
    assert stops == [("gone", "stop")]
    assert inbox.frames()[-1].run_id == "after"


# The case is 100 frames (run once: TILED_LIVE_SERVE_FRAMES=100); CI writes fewer on its 2 cores.
SERVE_FRAMES = int(os.environ.get("TILED_LIVE_SERVE_FRAMES", "10"))


async def test_serve_turns_a_bluesky_run_in_tiled_into_points_whose_urls_fetch_the_frames(
    tiled: TiledServe, beamline: BlueskyBeamline, tmp_path: Path
) -> None:
    source = ("--source", tiled_url(tiled), "--source-api-key", API_KEY)
    service = start_service(tmp_path, extra_args=source, wait_for_tiled=False)
    try:
        async with WsClient(service.ws) as client:
            writing = asyncio.create_task(asyncio.to_thread(beamline.run, SERVE_FRAMES))
            uid = await writing
            await until(lambda: client.stopped(uid), 300)
            points = client.points(uid)
        # a click on a live point: the page's frame comes from the beamline's Tiled, where the frame is
        async with httpx.AsyncClient(base_url=service.http, timeout=60) as http:
            page_frame = await http.get("/api/frame", params={"url": points[-1]["tiled_url"]})
            elsewhere = await http.get("/api/frame", params={"url": "http://127.0.0.1:1/api/v1/array/full/x?slice=0"})
    finally:
        stop_service(service)
    assert page_frame.status_code == 200 and page_frame.headers["content-type"] == "image/png"
    assert elsewhere.status_code == 403  # still no open proxy: only the two configured servers
    assert API_KEY not in service.log_text()
    assert sorted(p["index"] for p in points) == list(range(SERVE_FRAMES))
    written = detector_frames(tiled, SERVE_FRAMES)
    for point in points:
        assert np.array_equal(fetch(point["tiled_url"]).reshape(240, 320), written[point["index"]])
