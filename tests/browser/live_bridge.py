"""The real bridge app served by uvicorn in a background thread, fed in-process like the pipeline feeds it.

The pipeline publishes `RunStarted | Point | ClusterNew | RunStopped` to the Hub (the page's source) and
to the TiledWriter (where the page's frames come from) on the server's own event loop; `LiveBridge.publish`
does the same from the test thread. `restart_http()` stops and restarts the HTTP server on the same port while
the hub (the run in progress) lives on, as when the bridge is restarted under a running pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry

from frontend_bridge import Hub, ModelInfo, TiledConfig, create_app
from operators.messages import ClusterNew, Frame, Point, RunStarted, RunStopped, StageTimings
from operators.persist.server import TiledEndpoint, free_port
from operators.persist.writer import TiledWriter
from operators.tiled_layout import frame_uri

logger = logging.getLogger(__name__)
T = TypeVar("T")

MODEL = ModelInfo(autoencoder_model="cvae-test:1", dimred_model="umap-test:1")
FRAME_SHAPE = (96, 112)  # small frames keep the 2 shared cores free; the page scales them up


class BackgroundLoop:
    """An asyncio loop in its own thread, for async code driven from synchronous (Playwright) tests."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class LiveBridge:
    """One bridge (hub + app + optional Tiled writer) on 127.0.0.1:`port`."""

    def __init__(
        self,
        *,
        data_dir: Path,
        tiled: TiledEndpoint | None = None,
        token: str | None = None,
        reference: np.ndarray | None = None,
        hub_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.token = token
        self.tiled = tiled
        self.reference = reference
        self.registry = CollectorRegistry()
        self.hub = Hub(MODEL, registry=self.registry, **(hub_kwargs or {}))
        self._background = BackgroundLoop("live-bridge")
        self.loop = self._background.loop
        self.writer = TiledWriter(tiled.url, tiled.api_key, data_dir=data_dir) if tiled else None
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Future[None] | None = None
        try:
            if self.writer is not None:
                self.call(self.writer.start())
            self.start_http()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return self._background.call(coro, timeout)

    # -- the HTTP server ------------------------------------------------------------------------

    def start_http(self) -> None:
        app = create_app(
            self.hub,
            registry=self.registry,
            reference_embedding=self.reference,
            tiled=TiledConfig(self.tiled.url, self.tiled.api_key) if self.tiled else None,
            token=self.token,
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        self._server = server
        self._serve_task = asyncio.run_coroutine_threadsafe(server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not server.started:
            if self._serve_task.done():
                self._serve_task.result()  # raises why it could not start
                raise RuntimeError("uvicorn exited before it started")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bridge did not start on port {self.port}")
            time.sleep(0.02)

    def stop_http(self) -> None:
        if self._server is None or self._serve_task is None:
            return
        self._server.should_exit = True
        self._serve_task.result(30)
        self._server = None
        self._serve_task = None

    def restart_http(self, down_for: float = 0.0) -> None:
        self.stop_http()
        time.sleep(down_for)
        self.start_http()

    # -- the pipeline side ----------------------------------------------------------------------

    def publish(self, *messages: RunStarted | Frame | Point | ClusterNew | RunStopped) -> None:
        self.call(self._publish(messages))

    async def _publish(self, messages: Iterable[RunStarted | Frame | Point | ClusterNew | RunStopped]) -> None:
        for message in messages:
            if isinstance(message, Frame):  # a frame to store: the writer's frame port, as the pipeline hands it
                if self.writer is not None:
                    self.writer.store_frame(message)
                continue
            if self.writer is not None:
                await self.writer.publish(message)
            await self.hub.publish(message)

    def flush_frames(self, timeout: float = 60.0) -> None:
        """Wait until the frames published so far are readable from Tiled."""
        if self.writer is not None and not self.call(self.writer.flush(timeout), timeout + 5):
            raise TimeoutError("Tiled writer did not flush")

    def close(self) -> None:
        try:
            self.stop_http()
            if self.writer is not None:
                self.call(self.writer.stop())
        finally:
            self._background.close()


# -- a simulated scan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One structural regime of the scan: where its points sit and what its frames look like."""

    centre: tuple[float, float]
    ring_radius: float  # of the scattering ring in the frame, in pixels


PHASES = (Phase((-4.0, 1.0), 18.0), Phase((1.0, 3.5), 30.0), Phase((3.0, -2.5), 40.0))


def ring_frame(phase: Phase, index: int, rng: np.random.Generator) -> np.ndarray:
    """A detector-like frame: a powder ring on a background, counts with Poisson noise, a dead module gap."""
    h, w = FRAME_SHAPE
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h * 0.55, xx - w * 0.45)
    radius = phase.ring_radius + 2.0 * np.sin(index / 15.0)
    expected = 20.0 + 4000.0 * np.exp(-((r - radius) ** 2) / 8.0) + 200.0 / (1.0 + r / 5.0)
    frame = rng.poisson(expected).astype(np.int32)
    frame[:, w // 2 : w // 2 + 3] = -1  # module gap, masked by the bridge's renderer
    return frame


def scan(
    run_id: str, n: int, *, tiled_url: str | None, seed: int = 0, phase_len: int = 100
) -> list[RunStarted | Frame | Point | ClusterNew]:
    """A run of `n` frames moving through the phases in turn (each `phase_len` frames), as pipeline messages.

    With `tiled_url` each point is preceded by its frame, for the TiledWriter to store; without, the points
    carry no URI.
    """
    rng = np.random.default_rng(seed)
    t0 = time.time()
    out: list[RunStarted | Frame | Point | ClusterNew] = [
        RunStarted(run_id, f"scan {run_id}", t0, {"experiment_name": "browser test"}, run_key=run_id)
    ]
    for i in range(n):
        k = min(i // phase_len, len(PHASES) - 1)
        phase = PHASES[k]
        if i % phase_len == 0 and i // phase_len < len(PHASES):
            out.append(ClusterNew(run_id, k, i, t0 + i * 0.01))
        drift = (i % phase_len) / phase_len
        x = phase.centre[0] + 0.8 * drift + 0.25 * rng.standard_normal()
        y = phase.centre[1] - 0.5 * drift + 0.25 * rng.standard_normal()
        image = ring_frame(phase, i, rng) if tiled_url else None
        if image is not None:
            out.append(Frame(run_id, i, image, "", t0 + i * 0.01, 0.0, run_key=run_id))
        out.append(
            Point(
                run_id=run_id,
                index=i,
                x=float(x),
                y=float(y),
                cluster=k,
                novelty=float(rng.random() * 0.2),
                tiled_url=frame_uri(tiled_url, run_id, i) if tiled_url else "",
                timestamp=t0 + i * 0.01,
                timings=StageTimings(
                    queue=0.001, preprocess=0.002, encode=0.021, project=0.004, cluster=0.0005, total=0.031
                ),
                latent=np.zeros(8, np.float32),
                stored_by_service=image is not None, run_key=run_id,
            )
        )
    return out


def reference_map(seed: int = 1, n: int = 3000) -> np.ndarray:
    """A grey background: the reference frames around the three regimes and one the scan never visits."""
    rng = np.random.default_rng(seed)
    centres = np.array([p.centre for p in PHASES] + [(-2.0, -3.5)])
    which = rng.integers(0, len(centres), n)
    return (centres[which] + 0.9 * rng.standard_normal((n, 2))).astype(np.float32)
