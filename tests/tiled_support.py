"""Shared helpers for the Tiled tests: a real embedded Tiled server and synthetic points."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from operators.messages import Frame, Point, RunStarted, StageTimings
from operators.persist.server import EmbeddedTiledServer
from operators.persist.writer import TiledWriter
from operators.tiled_layout import frame_uri

SMALL_SHAPE = (48, 64)  # a small test detector: keeps 2 shared cores fast


def tiled_server_fixture() -> Any:
    """A module-scoped fixture: one real Tiled server (child process) per test module.

    Tests may stop and restart it (same port, same data directory).
    """

    @pytest.fixture(scope="module")
    def tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTiledServer]:
        srv = EmbeddedTiledServer(tmp_path_factory.mktemp("tiled-data"), port=0)
        asyncio.run(srv.start())
        try:
            yield srv
        finally:
            asyncio.run(srv.stop())

    return tiled_server


def make_point(
    base_url: str, run_id: str, index: int, rng: np.random.Generator, shape: tuple[int, int] = SMALL_SHAPE
) -> tuple[Point, np.ndarray]:
    image = rng.integers(0, 2**20, shape, dtype=np.int32)
    point = Point(
        run_id=run_id,
        run_key=run_id,
        index=index,
        x=float(rng.standard_normal()),
        y=float(rng.standard_normal()),
        cluster=int(rng.integers(0, 4)),
        novelty=float(rng.random()),
        tiled_url=frame_uri(base_url, run_id, index),
        timestamp=time.time(),
        timings=StageTimings(total=0.01, encode=0.005, project=0.001),
        latent=rng.standard_normal(512).astype(np.float32),
        stored_by_service=True,
    )
    return point, image


async def publish_stored(writer: TiledWriter, point: Point, image: np.ndarray) -> None:
    """What the pipeline does with a frame the service stores: the frame to the writer's frame port, then
    its point."""
    writer.store_frame(Frame(point.run_id, point.index, image, "", point.timestamp, 0.0, run_key=point.run_key))
    await writer.publish(point)


async def publish_stored_run(
    writer: TiledWriter, base_url: str, run_key: str, count: int, rng: np.random.Generator, *,
    shape: tuple[int, int] = SMALL_SHAPE,
) -> list[tuple[Point, np.ndarray]]:
    """A run as the pipeline hands it to the writer: its start, then `count` points whose frames the service
    stores (no stop); returns the points with their frames."""
    await writer.publish(RunStarted(run_key, run_key, time.time(), run_key=run_key))
    published = []
    for index in range(count):
        point, image = make_point(base_url, run_key, index, rng, shape=shape)
        await publish_stored(writer, point, image)
        published.append((point, image))
    return published


def data_dir_of(srv: EmbeddedTiledServer) -> Path:
    return srv.data_dir
