"""Shared helpers for the end-to-end tests: ``latent-stream serve`` as a subprocess and a recording /ws client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import pytest
import websockets

from operators.persist.server import free_port  # the one copy (the service uses it for port 0)

CLI = str(Path(sys.executable).with_name("latent-stream"))


@dataclass
class LiveService:
    proc: subprocess.Popen[bytes]
    port: int
    tiled_port: int
    zmq: str
    log: Path
    data_dir: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def tiled_url(self) -> str:
        return f"http://127.0.0.1:{self.tiled_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    tmp: Path,
    timeout: float = 240.0,
    *,
    like: LiveService | None = None,
    log_name: str = "serve.log",
    extra_args: tuple[str, ...] = (),
    wait_for_tiled: bool = True,
) -> LiveService:
    """Start `latent-stream serve` and wait for /api/health.

    `like`: a previous (stopped or killed) service whose ports, ZeroMQ address and data directory are reused.
    `extra_args`: more `serve` options (e.g. an external `--tiled`).
    `wait_for_tiled`: also wait until it writes to Tiled (points flow earlier; frames it stores would wait).
    """
    if like is None:
        port, tiled_port, zmq = free_port(), free_port(), f"tcp://127.0.0.1:{free_port()}"
        data_dir = tmp / "data"
    else:
        port, tiled_port, zmq, data_dir = like.port, like.tiled_port, like.zmq, like.data_dir
    log = tmp / log_name
    cmd = [CLI, "serve", "--port", str(port), "--tiled-port", str(tiled_port),
           "--zmq", zmq, "--data-dir", str(data_dir), *extra_args]  # fmt: skip
    with open(log, "wb") as out:
        # its own process group, as a job started from a terminal: a Ctrl-C can be sent to the whole group
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)  # fmt: skip
    service = LiveService(proc, port, tiled_port, zmq, log, data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode} during start-up:\n{service.log_text()[-4000:]}")
        try:
            health = httpx.get(f"{service.http}/api/health", timeout=2)
            if health.status_code == 200 and (health.json().get("tiled_connected") or not wait_for_tiled):
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_service(service)
    pytest.fail(f"serve not ready in {timeout} s:\n{service.log_text()[-4000:]}")


def stop_service(
    service: LiveService, sig: int = signal.SIGINT, timeout: float = 20.0, *, group: bool = False
) -> tuple[int, float]:
    """Signal the service (`group`: its whole process group, as a terminal's Ctrl-C does) and wait for it
    (SIGKILL after `timeout`). Returns (exit code, seconds taken)."""
    t0 = time.monotonic()
    if service.proc.poll() is None:
        if group:
            os.killpg(service.proc.pid, sig)
        else:
            service.proc.send_signal(sig)
    try:
        rc = service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        service.proc.kill()
        service.proc.wait()
        rc = -9
    return rc, time.monotonic() - t0


@dataclass
class WsClient:
    """A websocket client that reads everything into `messages`."""

    url: str
    messages: list[dict] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _ws: websockets.ClientConnection | None = None

    async def __aenter__(self) -> Self:
        self._ws = await websockets.connect(self.url, max_size=None)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            self.messages.append(json.loads(raw))

    @property
    def closed(self) -> bool:
        """The server went away (or the client closed) and everything it sent has been read."""
        return self._task is not None and self._task.done()

    async def __aexit__(self, *exc: object) -> None:
        assert self._ws is not None and self._task is not None
        await self._ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def points(self, run_id: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "point" and m["run_id"] == run_id]

    def stopped(self, run_id: str) -> bool:
        return any(m.get("type") == "run_stop" and m["run_id"] == run_id for m in self.messages)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")
