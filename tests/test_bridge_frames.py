"""Frames on the page: /api/frame and /api/aggregate read a REAL Tiled server and return correct PNGs."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import uvicorn
from bridge_support import bridge, free_socket
from tiled.catalog import in_memory
from tiled.client import from_uri
from tiled.config import Authentication
from tiled.server.app import build_app

from frontend_bridge import TiledConfig
from frontend_bridge.frames import BadFrameURL, FrameFetcher, FrameTooLarge, log_scale, valid_mask

API_KEY = "bridgetestkey"
SHAPE = (40, 56)
N_FRAMES = 6


@dataclass
class TiledFixture:
    base: str
    frames: np.ndarray  # (N, H, W) int32 as written

    def url(self, slice_expr: str, path: str = "scan1/primary/image") -> str:
        return f"{self.base}/api/v1/array/full/{path}?slice={slice_expr}"


def _frames() -> np.ndarray:
    rng = np.random.default_rng(7)
    frames = rng.poisson(50, size=(N_FRAMES, *SHAPE)).astype(np.int32)
    frames[:, 20:23, :] = -1  # a module gap
    frames[:, 5, 7] = 10_000_000  # a hot pixel
    frames[:, :, 30:] *= np.arange(1, N_FRAMES + 1, dtype=np.int32)[:, None, None]  # frames differ
    return frames


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledFixture]:
    """A real Tiled 0.2.20 server (in-memory catalog, writable storage) on a random port, with an API key."""
    data = tmp_path_factory.mktemp("tiled")
    catalog = in_memory(writable_storage=[str(Path(data) / "data")])
    app = build_app(catalog, authentication=Authentication(single_user_api_key=API_KEY))
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "Tiled did not start"
        time.sleep(0.05)
    host, port = sock.getsockname()
    base = f"http://{host}:{port}"
    frames = _frames()
    client = from_uri(base, api_key=API_KEY)
    primary = client.create_container("scan1").create_container("primary")
    image = primary.write_array(frames[:1], key="image")  # appendable stack, one frame per chunk
    for i in range(1, N_FRAMES):
        image.patch(frames[i : i + 1], offset=(i,), extend=True)
    primary.write_array(np.ones((2, 8, 8), dtype=np.int32), key="small")
    try:
        yield TiledFixture(base=base, frames=frames)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _png(response: httpx.Response, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), flags)
    assert image is not None
    return image


# -- rendering, on arrays ---------------------------------------------------------------------------


def test_log_scaling_ignores_gaps_and_is_not_washed_out_by_a_hot_pixel() -> None:
    frame = _frames()[0]
    scaled = log_scale(frame)
    assert scaled.dtype == np.uint8 and scaled.shape == SHAPE
    assert (scaled[20:23] == 0).all()  # gap pixels render black
    assert scaled[5, 7] == 255
    ordinary = scaled[valid_mask(frame)]
    assert np.median(ordinary) > 100  # a min-max scale would squash these near 0 under the hot pixel
    order = np.argsort(frame[0, :30])
    assert (np.diff(scaled[0, :30][order].astype(int)) >= 0).all()  # monotonic in the counts


def test_a_frame_with_no_valid_pixel_renders_black() -> None:
    assert (log_scale(np.full((4, 4), -1, dtype=np.int32)) == 0).all()


# -- /api/frame against Tiled --------------------------------------------------------------------


@pytest.mark.parametrize("slice_expr", ["3", "3:4", f"3:4,0:{SHAPE[0]},0:{SHAPE[1]}", "-3"])
async def test_a_frame_comes_back_as_its_log_scaled_png(tiled: TiledFixture, slice_expr: str) -> None:
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        response = await http.get(f"{srv.base}/api/frame", params={"url": tiled.url(slice_expr)})
    image = _png(response)
    assert image.shape == SHAPE
    np.testing.assert_array_equal(image, log_scale(tiled.frames[3]))


async def test_a_colormapped_frame_is_rgb(tiled: TiledFixture) -> None:
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        response = await http.get(f"{srv.base}/api/frame", params={"url": tiled.url("0"), "cmap": "viridis"})
    assert _png(response).shape == (*SHAPE, 3)


async def test_only_frames_on_the_configured_tiled_server_are_fetched(tiled: TiledFixture) -> None:
    port = int(tiled.base.rsplit(":", 1)[1])
    foreign = [
        f"http://127.0.0.1:{port + 1}/api/v1/array/full/scan1/primary/image?slice=0",  # other port
        f"http://localhost.evil.example:{port}/api/v1/array/full/scan1/primary/image?slice=0",
        f"https://127.0.0.1:{port}/api/v1/array/full/scan1/primary/image?slice=0",  # other scheme
        f"{tiled.base}/api/v1/auth/whoami",  # on the server but not a frame
        "file:///etc/passwd",
        "not a url",
    ]
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        responses = [await http.get(f"{srv.base}/api/frame", params={"url": url}) for url in foreign]
    assert [r.status_code for r in responses] == [403] * len(foreign)


async def test_frame_errors_become_clear_http_answers(tiled: TiledFixture) -> None:
    cases = {
        tiled.url(str(N_FRAMES)): 404,  # beyond the stack
        tiled.url("0", path="scan1/primary/nothing"): 404,
        tiled.url("zero"): 422,
        tiled.url("0:2"): 422,  # two frames, not one
        tiled.url("0:1:0"): 422,  # a zero step
        f"{tiled.base}/api/v1/array/full/scan1/../secret?slice=0": 422,
    }
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        got = {url: (await http.get(f"{srv.base}/api/frame", params={"url": url})) for url in cases}
    assert {url: r.status_code for url, r in got.items()} == cases
    assert all(r.json()["detail"] for r in got.values())


async def test_only_one_frame_of_a_bounded_size_is_ever_downloaded(tiled: TiledFixture) -> None:
    requested: list[str] = []

    async def record(request: httpx.Request) -> None:
        requested.append(request.url.path)

    frame_bytes = SHAPE[0] * SHAPE[1] * 4
    async with httpx.AsyncClient(event_hooks={"request": [record]}) as client:
        fetcher = FrameFetcher(tiled.base, API_KEY, client=client, max_frame_bytes=frame_bytes - 1)
        with pytest.raises(BadFrameURL, match="not one frame"):
            await fetcher.fetch(f"{tiled.base}/api/v1/array/full/scan1/primary/image")  # the whole stack
        with pytest.raises(BadFrameURL, match="not one frame"):
            await fetcher.fetch(tiled.url("0:3"))
        with pytest.raises(FrameTooLarge, match=f"{frame_bytes} bytes"):
            await fetcher.fetch(tiled.url("0"))
    assert requested == ["/api/v1/metadata/scan1/primary/image"]  # the structure only: no array data


async def test_the_frame_route_refuses_a_whole_stack_and_frames_over_the_size_bound(
    tiled: TiledFixture,
) -> None:
    whole_stack = f"{tiled.base}/api/v1/array/full/scan1/primary/image"
    async with httpx.AsyncClient() as http:
        async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv:
            stack = await http.get(f"{srv.base}/api/frame", params={"url": whole_stack})
        async with bridge(
            tiled=TiledConfig(tiled.base, API_KEY, max_frame_pixels=SHAPE[0] * SHAPE[1] - 1)
        ) as srv:
            large = await http.get(f"{srv.base}/api/frame", params={"url": tiled.url("0")})
    assert stack.status_code == 422 and "not one frame" in stack.json()["detail"]
    assert large.status_code == 422 and "at most" in large.json()["detail"]


async def test_a_wrong_api_key_or_a_dead_tiled_is_a_bad_gateway(tiled: TiledFixture) -> None:
    dead = free_socket()
    dead_base = "http://{}:{}".format(*dead.getsockname())
    dead.close()
    async with httpx.AsyncClient() as http:
        async with bridge(tiled=TiledConfig(tiled.base, "wrongkey")) as srv:
            refused = await http.get(f"{srv.base}/api/frame", params={"url": tiled.url("0")})
        async with bridge(tiled=TiledConfig(dead_base, API_KEY, timeout_s=5)) as srv:
            url = f"{dead_base}/api/v1/array/full/scan1/primary/image?slice=0"
            unreachable = await http.get(f"{srv.base}/api/frame", params={"url": url})
    assert refused.status_code == 502 and "API key" in refused.json()["detail"]
    assert unreachable.status_code == 502


# -- /api/aggregate against Tiled ------------------------------------------------------------------


def _expected(frames: np.ndarray, stat: str) -> np.ndarray:
    """Mean or std over frames, per pixel, counting only valid (non-negative) values."""
    values = np.where(frames >= 0, frames, np.nan).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN gap pixels
        reduced = np.nanmean(values, axis=0) if stat == "mean" else np.nanstd(values, axis=0)
    mask = np.isfinite(reduced)
    return log_scale(np.nan_to_num(reduced), mask)


@pytest.mark.parametrize("stat", ["mean", "std"])
async def test_the_aggregate_of_a_selection_is_its_per_pixel_statistic(
    tiled: TiledFixture, stat: str
) -> None:
    chosen = [0, 2, 3, 5]
    urls = [tiled.url(str(i)) for i in chosen]
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        response = await http.post(f"{srv.base}/api/aggregate", json={"urls": urls, "stat": stat})
    image = _png(response)
    assert response.headers["x-frame-count"] == str(len(chosen))
    expected = _expected(tiled.frames[chosen], stat)
    # float64 sums in a different order may flip a rounding at the uint8 boundary
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert (image[20:23] == 0).all()


async def test_an_aggregate_refuses_foreign_urls_and_mixed_shapes(tiled: TiledFixture) -> None:
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        foreign = await http.post(
            f"{srv.base}/api/aggregate",
            json={"urls": [tiled.url("0"), "http://192.0.2.1/api/v1/array/full/x?slice=0"], "stat": "mean"},
        )
        mixed = await http.post(
            f"{srv.base}/api/aggregate",
            json={"urls": [tiled.url("0"), tiled.url("0", path="scan1/primary/small")], "stat": "std"},
        )
    assert foreign.status_code == 403
    assert mixed.status_code == 422 and "shape" in mixed.json()["detail"]


async def test_an_aggregate_skips_frames_not_yet_stored_and_says_how_many(tiled: TiledFixture) -> None:
    stored = len(tiled.frames)
    urls = [tiled.url("1"), tiled.url("4"), tiled.url(str(stored)), tiled.url(str(stored + 7))]
    async with bridge(tiled=TiledConfig(tiled.base, API_KEY)) as srv, httpx.AsyncClient() as http:
        partial = await http.post(f"{srv.base}/api/aggregate", json={"urls": urls, "stat": "mean"})
        none_yet = await http.post(f"{srv.base}/api/aggregate", json={"urls": urls[2:], "stat": "mean"})
    image = _png(partial)
    assert (partial.headers["x-frame-count"], partial.headers["x-frames-missing"]) == ("2", "2")
    assert np.abs(image.astype(int) - _expected(tiled.frames[[1, 4]], "mean").astype(int)).max() <= 1
    assert none_yet.status_code == 404 and "none of the 2" in none_yet.json()["detail"]
