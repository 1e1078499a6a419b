"""``latent-stream serve --source stream2://...`` end to end: a stream v2 sender made from the public spec (cbor2,
bitshuffle-LZ4 uint32 EIGER2 X 4M frames) PUSHes to a real service subprocess, whose /ws clients get one point
per frame in order, computed with the detector's pixel mask applied, and the series' metadata in run_start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import LiveService, WsClient, start_service, stop_service, until

from stream.stream2_sender import Eiger2Grid, Stream2FrameSender, encode_end, encode_image, encode_start

pytestmark = pytest.mark.e2e

FRAMES = 24  # 12 pairs; the 200-frame series was measured once (see the README, "Sources")
HOT = (slice(900, 1100), slice(700, 900))  # a 200 x 200 px region the pixel mask marks as bad


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    tmp = tmp_path_factory.mktemp("serve-stream2")
    port = _free()
    live = start_service(tmp, extra_args=("--source", f"stream2://127.0.0.1:{port}"), wait_for_tiled=True)
    live.zmq = f"tcp://127.0.0.1:{port}"  # where the service PULLs from: the sender binds it
    yield live
    stop_service(live)


def _free() -> int:
    from service_support import free_port

    return free_port()


class _Frames:
    """SAXS-like EIGER2 X 4M frames: a beam-stop shadow and a ring whose radius grows with the index."""

    def __init__(self) -> None:
        self.grid = Eiger2Grid()
        h, w = self.grid.shape
        y, x = np.ogrid[:h, :w]
        self.r = np.hypot(y - 1100.0, x - 1000.0).astype(np.float32)
        self.mask = self.grid.pixel_mask.copy()
        self.mask[HOT] |= 8  # DECTRIS bit 3: a hot pixel

    def frame(self, k: int, *, hot: bool) -> np.ndarray:
        ring = 400.0 + 25.0 * k
        counts = 2000.0 * np.exp(-self.r / 250.0) + 300.0 * np.exp(-(((self.r - ring) / 12.0) ** 2)) + 3.0
        out = counts.astype(np.uint32)
        out[self.grid.pixel_mask != 0] = 2**32 - 1
        if hot:
            out[HOT] = 50_000  # far brighter than the scattering, well below saturation
        return out


async def _counters(service: LiveService) -> dict[str, dict[str, float]]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{service.http}/metrics")).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("latent_stream_"):
            out[family.name.removeprefix("latent_stream_")] = {
                ",".join(s.labels.values()): s.value for s in family.samples if s.name.endswith("_total")
            }
    return out


def _xy(point: dict) -> np.ndarray:
    return np.asarray(point["feature_vector"], dtype=float)


async def test_a_stream2_series_becomes_points_in_order_with_the_pixel_mask_applied(service: LiveService) -> None:
    frames = _Frames()
    uid = "eiger-series-masked"
    async with WsClient(service.ws) as client, Stream2FrameSender(service.zmq, detector=None) as sender:
        await sender.send_raw(encode_start(
            uid, series_id=1, shape=frames.grid.shape, number_of_images=FRAMES, pixel_mask=frames.mask,
            saturation_value=2**31 - 1, detector_description="EIGER2 X 4M", count_time=0.099, frame_time=0.1,
            incident_energy=12_000.0,
        ))  # fmt: skip
        for i in range(FRAMES):  # frame 2k and 2k+1 differ only inside the masked region
            image = await asyncio.to_thread(frames.frame, i // 2, hot=i % 2 == 1)
            await sender.send_raw(encode_image(uid, i, {"threshold_1": image}, series_id=1))
        await sender.send_raw(encode_end(uid, series_id=1))
        await until(lambda: client.stopped(uid), 180, "the masked series' points and its end")

    points = client.points(uid)
    assert [p["index"] for p in points] == list(range(FRAMES))
    for k in range(0, FRAMES, 2):
        assert np.allclose(_xy(points[k]), _xy(points[k + 1]), atol=1e-5), k  # the hot region changed nothing
    assert not np.allclose(_xy(points[0]), _xy(points[-1]), atol=1e-3)  # while the ring moved the point
    start = next(m for m in client.messages if m.get("type") == "run_start" and m["run_id"] == uid)
    metadata = start["metadata"]
    assert metadata["detector_description"] == "EIGER2 X 4M" and metadata["incident_energy"] == 12_000.0
    assert metadata["series_id"] == 1 and metadata["number_of_images"] == FRAMES and metadata["channel"]
    assert "pixel_mask" not in metadata
    stop = next(m for m in client.messages if m.get("type") == "run_stop" and m["run_id"] == uid)
    assert stop["num_frames"] == FRAMES and stop["processed"] == FRAMES


async def test_without_the_mask_the_hot_region_moves_the_point(service: LiveService) -> None:
    """The control for the test above: the same pair of frames, in a series whose start has no pixel mask."""
    frames = _Frames()
    uid = "eiger-series-unmasked"
    async with WsClient(service.ws) as client, Stream2FrameSender(service.zmq, detector=None) as sender:
        await sender.send_raw(encode_start(uid, series_id=2, shape=frames.grid.shape, number_of_images=2))
        for i in range(2):
            image = await asyncio.to_thread(frames.frame, 0, hot=i == 1)
            image[frames.grid.pixel_mask != 0] = 0  # no mask: gaps read as empty pixels
            await sender.send_raw(encode_image(uid, i, {"threshold_1": image}, series_id=2))
        await sender.send_raw(encode_end(uid, series_id=2))
        await until(lambda: client.stopped(uid), 120, "the unmasked series' end")
    first, second = client.points(uid)
    assert not np.allclose(_xy(first), _xy(second), atol=1e-5)


async def test_bad_stream2_input_is_counted_and_the_series_goes_on(service: LiveService) -> None:
    frames = _Frames()
    uid = "eiger-series-bad"
    before = await _counters(service)
    good = frames.frame(0, hot=False)
    bad = {
        "malformed": b"\xa1\x64typ",
        "unknown_msg_type": encode_end(uid, series_id=3).replace(b"end", b"eNd"),
        "bad_dtype": encode_image(uid, 1, {"threshold_1": good.astype(np.uint16)}, series_id=3),
        "bad_shape": encode_image(uid, 1, {"threshold_1": good[:100]}, series_id=3),
        "wrong_series": encode_image("some-other-series", 1, {"threshold_1": good}, series_id=9),
    }
    async with WsClient(service.ws) as client, Stream2FrameSender(service.zmq, detector=None) as sender:
        await sender.send_raw(encode_image(uid, 0, {"threshold_1": good}, series_id=3))  # before the start
        await sender.send_raw(encode_start(uid, series_id=3, shape=frames.grid.shape, number_of_images=4))
        await sender.send_raw(encode_image(uid, 0, {"threshold_1": good}, series_id=3))
        for payload in bad.values():
            await sender.send_raw(payload)
        await sender.send_raw(encode_image(uid, 2, {"threshold_1": good}, series_id=3))  # 1 lost
        await sender.send_raw(encode_image(uid, 3, {"threshold_1": good}, series_id=3))
        await sender.send_raw(encode_end(uid, series_id=3))
        await until(lambda: client.stopped(uid), 120, "the bad-input series' end")

    assert [p["index"] for p in client.points(uid)] == [0, 2, 3]
    after = await _counters(service)
    delta = {r: after["rejected"].get(r, 0) - before.get("rejected", {}).get(r, 0) for r in after["rejected"]}
    assert {r: n for r, n in delta.items() if n} == {**dict.fromkeys(bad, 1), "no_active_run": 1}
    assert after["lost_upstream"][""] - before.get("lost_upstream", {}).get("", 0) == 1
    received = sum(after["received"].values())
    assert received == sum(after["processed"].values()) + sum(after["rejected"].values()) + sum(
        after.get("dropped", {}).values()
    )
