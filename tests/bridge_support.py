"""Helpers for the bridge tests: a real uvicorn server on 127.0.0.1, pipeline messages, a websocket reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from frontend_bridge import Hub, ModelInfo, create_app
from operators.messages import ClusterNew, Point, RunStarted, RunStopped, StageTimings
from stream.serve import bridge_server_config

MODEL = ModelInfo(autoencoder_model="cvae-test:1.0", dimred_model="umap-test:1.0")
TILED_BASE = "http://127.0.0.1:8000"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    ws: str  # ws://127.0.0.1:PORT
    hub: Hub
    registry: CollectorRegistry


@contextlib.asynccontextmanager
async def serve_app(app: Any, config: uvicorn.Config | None = None) -> AsyncIterator[str]:
    """Run `app` with uvicorn in the current event loop on a random 127.0.0.1 port; yields host:port.

    config: how uvicorn serves it; by default exactly as the service does.
    """
    sock = free_socket()
    server = uvicorn.Server(config or bridge_server_config(app, "127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@contextlib.asynccontextmanager
async def bridge(
    server_config: Callable[[Any], uvicorn.Config] | None = None, **kwargs: Any
) -> AsyncIterator[Served]:
    """A hub plus the bridge app, served for real. kwargs split between Hub(...) and create_app(...).

    server_config: the uvicorn config for the app (default: the service's own).
    """
    hub_keys = {"max_points", "max_past_points", "max_runs", "lse_queue", "ws_queue", "backfill_chunk"}
    registry = CollectorRegistry()
    hub = Hub(MODEL, registry=registry, **{k: v for k, v in kwargs.items() if k in hub_keys})
    app = create_app(hub, registry=registry, **{k: v for k, v in kwargs.items() if k not in hub_keys})
    async with serve_app(app, server_config(app) if server_config else None) as hostport:
        yield Served(base=f"http://{hostport}", ws=f"ws://{hostport}", hub=hub, registry=registry)


def frame_url(run_id: str, index: int, base: str = TILED_BASE) -> str:
    return f"{base}/api/v1/array/full/{run_id}/primary/image?slice={index}"


def run_started(run_id: str = "run-a", name: str = "scan A", **metadata: Any) -> RunStarted:
    return RunStarted(run_id=run_id, run_key=run_id, run_name=name, started_at=time.time(), metadata=metadata)


def point(run_id: str, index: int, *, cluster: int = 0, url: str | None = None) -> Point:
    rng = np.random.default_rng(index)
    return Point(
        run_id=run_id,
        run_key=run_id,
        index=index,
        x=np.float32(rng.standard_normal()),  # projectors hand out numpy scalars
        y=np.float32(rng.standard_normal()),
        cluster=cluster,
        novelty=float(rng.random()),
        tiled_url=frame_url(run_id, index) if url is None else url,
        timestamp=time.time(),
        timings=StageTimings(
            queue=0.001, preprocess=0.002, encode=0.02, project=0.004, cluster=1e-4, total=0.03
        ),
        latent=np.zeros(512, dtype=np.float32),
        stored_by_service=False,
    )


def cluster_new(run_id: str, cluster: int, index: int) -> ClusterNew:
    return ClusterNew(run_id=run_id, cluster=cluster, index=index, timestamp=time.time())


def run_stopped(run_id: str, processed: int) -> RunStopped:
    return RunStopped(run_id=run_id, run_key=run_id, stopped_at=time.time(), num_frames=processed, processed=processed)


async def receive(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """One message, decoded from JSON text or msgpack binary."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    if isinstance(raw, bytes):
        return msgpack.unpackb(raw, raw=False)
    return json.loads(raw)


async def receive_until(ws: ClientConnection, predicate: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Messages up to and including the first one matching `predicate`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        message = await receive(ws, max(deadline - time.monotonic(), 0.01))
        out.append(message)
        if predicate(message):
            return out


async def close_code(ws: ClientConnection, timeout: float = 10.0) -> int | None:
    """Read until the server closes the connection; the close code it sent."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    return None


__all__ = [
    "MODEL",
    "Served",
    "bridge",
    "close_code",
    "cluster_new",
    "connect",
    "frame_url",
    "point",
    "receive",
    "receive_until",
    "run_started",
    "run_stopped",
    "serve_app",
]
