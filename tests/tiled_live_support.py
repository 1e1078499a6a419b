"""Real parts for the ``tiled://`` source tests: Redis, ``tiled serve`` with Redis streaming, a TCP proxy that can
cut connections, and a bluesky RunEngine whose ``TiledWriter`` registers a simulated area detector's HDF5 frames.

``tiled serve config`` is what beamlines run (Redis as the streaming cache, a SQLite catalog, the detector's files
registered from a readable directory). tiled 0.2.20's ``tiled serve catalog --cache`` fails (an import only made
on its ``--temp`` path), so the server is configured by file.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from operators.persist.server import free_port

API_KEY = "tiledLiveTestKey0123456789"
CONTAINER = "raw"
_BIN = Path(sys.executable).parent


def _wait(
    condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """A private redis-server on 127.0.0.1 (no persistence); yields its ``redis://`` URI."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def answers() -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    try:
        _wait(answers, "redis-server", proc, timeout=20)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class TiledServe:
    """``tiled serve config`` in a child process: a SQLite catalog with a writable container, Redis streaming."""

    def __init__(self, work: Path, redis_uri: str) -> None:
        self.work = work
        self.detector_dir = work / "detector"  # where the simulated detector writes; the server may read it
        self.detector_dir.mkdir(exist_ok=True)
        (work / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = work / "tiled.yml"
        self.config.write_text(
            f"""authentication:
  single_user_api_key: {API_KEY}
trees:
  - path: /
    tree: catalog
    args:
      uri: sqlite:///{work}/catalog.db
      writable_storage: ["{work}/data", "duckdb:///{work}/tables.duckdb"]
      readable_storage: ["{self.detector_dir}"]
      init_if_not_exists: true
streaming_cache:
  uri: {redis_uri}
"""
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                str(_BIN / "tiled"),
                "serve",
                "config",
                str(self.config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=open(self.work / "tiled.log", "ab"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, "tiled serve", self._proc)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)
            self._proc = None

    def client(self) -> Any:
        from tiled.client import from_uri

        return from_uri(self.url, api_key=API_KEY)


class ConnectionCutter:
    """A TCP proxy on 127.0.0.1 in front of Tiled whose connections the test can cut (a dropped websocket and
    HTTP: what a network outage does) while the writer keeps writing to Tiled directly."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self, *, refuse: bool = False) -> None:
        """Close every connection now; with ``refuse``, new ones too until `restore`."""
        self._open = not refuse
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self._open = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


class BlueskyBeamline:
    """A RunEngine with bluesky-tiled-plugins' TiledWriter (one StreamDatum per request) and ophyd-async's
    SimBlobDetector (240 x 320 uint8 frames written to HDF5, registered in Tiled as (N, 1, H, W)).

    `run` (blocking: call it in a thread) counts ``frames``; before writing each frame listed in ``pauses`` it
    waits until the test, having seen `paused`, calls `resume` (the test does something mid-run).
    """

    def __init__(self, tiled: TiledServe) -> None:
        self.tiled = tiled
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._released = False

    async def wait_paused(self) -> None:
        await asyncio.to_thread(self.paused.wait)

    def resume(self) -> None:
        self.paused.clear()
        self._resume.set()

    def release(self) -> None:
        """No more pauses (a failed test must not leave the RunEngine's thread waiting)."""
        self._released = True
        self._resume.set()

    def run(self, frames: int, *, pauses: tuple[int, ...] = (), md: dict[str, Any] | None = None) -> str:
        """Blocking: the whole run. Returns its start uid."""
        import bluesky.plan_stubs as bps
        import bluesky.preprocessors as bpp
        from bluesky import RunEngine
        from bluesky_tiled_plugins import TiledWriter
        from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
        from ophyd_async.sim import SimBlobDetector

        engine = RunEngine({}, context_managers=[])  # no signal handlers: not the main thread
        engine.subscribe(TiledWriter(self.tiled.client()[CONTAINER], batch_size=1))
        with init_devices():
            det = SimBlobDetector(StaticPathProvider(UUIDFilenameProvider(), self.tiled.detector_dir))

        def plan() -> Generator[Any, Any, str]:
            @bpp.stage_decorator([det])
            @bpp.run_decorator(md={"plan_name": "count", "sample": "blobs", **(md or {})})
            def inner() -> Generator[Any, Any, None]:
                for i in range(frames):
                    if i in pauses and not self._released:
                        self._resume.clear()
                        self.paused.set()
                        self._resume.wait()
                    yield from bps.trigger_and_read([det])

            return (yield from inner())

        (uid,) = engine(plan())
        return str(uid)


def make_container(tiled: TiledServe) -> None:
    tiled.client().create_container(CONTAINER)
