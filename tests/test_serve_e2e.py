"""``latent-stream serve`` end to end: real subprocess, real ZeroMQ, real websockets, embedded Tiled."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from stream.protocol import encode_event
from stream.sender import FrameSender

CLI = str(Path(sys.executable).with_name("latent-stream"))
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LiveService:
    proc: subprocess.Popen[bytes]
    port: int
    tiled_port: int
    zmq: str
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start_service(tmp: Path, timeout: float = 240.0) -> LiveService:
    port, tiled_port, zmq_port = _free_port(), _free_port(), _free_port()
    log = tmp / "serve.log"
    cmd = [CLI, "serve", "--port", str(port), "--tiled-port", str(tiled_port),
           "--zmq", f"tcp://127.0.0.1:{zmq_port}", "--data-dir", str(tmp / "data")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    service = LiveService(proc, port, tiled_port, f"tcp://127.0.0.1:{zmq_port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode} during start-up:\n{service.log_text()[-4000:]}")
        try:
            if httpx.get(f"{service.http}/api/health", timeout=2).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop_service(service)
    pytest.fail(f"serve not ready in {timeout} s:\n{service.log_text()[-4000:]}")


def _stop_service(service: LiveService, sig: int = signal.SIGINT, timeout: float = 20.0) -> tuple[int, float]:
    t0 = time.monotonic()
    service.proc.send_signal(sig)
    try:
        rc = service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        service.proc.kill()
        service.proc.wait()
        rc = -9
    return rc, time.monotonic() - t0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = _start_service(tmp_path_factory.mktemp("serve"))
    yield live
    _stop_service(live)


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

    async def __aexit__(self, *exc: object) -> None:
        assert self._ws is not None and self._task is not None
        await self._ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def points(self, run_id: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "point" and m["run_id"] == run_id]

    def stopped(self, run_id: str) -> bool:
        return any(m.get("type") == "run_stop" and m["run_id"] == run_id for m in self.messages)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def _counters(service: LiveService) -> dict[str, dict[str, float]]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{service.http}/metrics")).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("latent_stream_received", "latent_stream_processed", "latent_stream_rejected",
                           "latent_stream_dropped", "latent_stream_lost_upstream"):
            out[family.name.removeprefix("latent_stream_")] = {
                ",".join(s.labels.values()) or "": s.value for s in family.samples if s.name.endswith("_total")
            }
    return out


def _total(counters: dict[str, dict[str, float]], name: str) -> float:
    return sum(counters.get(name, {}).values())


def _small_frame(i: int) -> np.ndarray:
    return np.random.default_rng(i).poisson(5.0, size=(256, 240)).astype(np.int32)


async def test_200_full_size_frames_at_10_hz_become_200_points_and_the_counters_add_up(
    service: LiveService,
) -> None:
    run_id = "e2e-200"
    async with WsClient(service.ws) as client:
        sim = await asyncio.create_subprocess_exec(
            CLI, "simulate", "--zmq", service.zmq, "--frames", "200", "--rate", "10", "--run-id", run_id,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        await _until(lambda: client.stopped(run_id), 120, "200 points and the run's stop")
        sim_out, _ = await sim.communicate()
        assert sim.returncode == 0, sim_out.decode()

    points = client.points(run_id)
    assert [p["index"] for p in points] == list(range(200))
    base = f"http://127.0.0.1:{service.tiled_port}/api/v1/array/full/{run_id}/primary/image?slice="
    for p in points:
        assert len(p["feature_vector"]) == 2 and all(math.isfinite(v) for v in p["feature_vector"])
        assert isinstance(p["cluster"], int)
        assert p["tiled_url"] == f"{base}{p['index']}"
        assert 0 < p["autoencoder_time"] <= p["total_processing_time"] and 0 < p["dimred_time"]
    stop = next(m for m in client.messages if m.get("type") == "run_stop" and m["run_id"] == run_id)
    assert stop["processed"] == 200 and stop["num_frames"] == 200

    counters = await _counters(service)
    assert _total(counters, "received") == (
        _total(counters, "processed") + _total(counters, "rejected") + _total(counters, "dropped")
    )
    assert counters["lost_upstream"][""] == 0


async def test_bad_messages_are_rejected_with_counted_reasons_while_good_frames_keep_flowing(
    service: LiveService,
) -> None:
    run_id = "e2e-bad"
    before = await _counters(service)
    bad = {
        "malformed": b"\x92\x01 this is not one msgpack map",
        "unknown_msg_type": msgpack.packb({"msg_type": "calibrate", "run_id": run_id}),
        "size_mismatch": msgpack.packb({"msg_type": "event", "frame_number": 99, "tiled_url": "",
                                        "image": {"array": {"data": b"\x00" * 1000, "dtype": "int32",
                                                            "shape": [256, 240]}}}),
        "non_finite": encode_event(99, np.full((64, 64), np.nan, dtype=np.float32)),
        "oversized": msgpack.packb({"msg_type": "event", "frame_number": 99, "tiled_url": "",
                                    "image": {"array": {"data": b"\x00" * 64, "dtype": "int32",
                                                        "shape": [5000, 5000]}}}),
    }
    async with WsClient(service.ws) as client, FrameSender(service.zmq) as sender:
        await sender.send_start(run_id, "bad input")
        for i, payload in enumerate(bad.values()):
            await sender.send_event(i, _small_frame(i))
            await sender.send_raw(payload)
        await sender.send_event(len(bad), _small_frame(len(bad)))
        await sender.send_stop(len(bad) + 1)
        await _until(lambda: client.stopped(run_id), 60, "the bad-input run's stop")

    assert [p["index"] for p in client.points(run_id)] == list(range(len(bad) + 1))
    after = await _counters(service)
    for reason in bad:
        assert after["rejected"].get(reason, 0) - before["rejected"].get(reason, 0) == 1, reason
    assert _total(after, "received") == (
        _total(after, "processed") + _total(after, "rejected") + _total(after, "dropped")
    )


async def test_a_late_client_gets_the_runs_backfill_then_live_points(service: LiveService) -> None:
    run_id = "e2e-late"
    async with WsClient(service.ws) as early, FrameSender(service.zmq) as sender:
        await sender.send_start(run_id, "late joiner")
        for i in range(10):
            await sender.send_event(i, _small_frame(i))
        await _until(lambda: len(early.points(run_id)) == 10, 60, "10 points on the early client")
        async with WsClient(service.ws) as late:
            await _until(lambda: len(late.points(run_id)) == 10, 30, "the late client's backfill")
            for i in range(10, 15):
                await sender.send_event(i, _small_frame(i))
            await sender.send_stop(15)
            await _until(lambda: late.stopped(run_id), 60, "the run's stop on the late client")
    kinds = [m["type"] for m in late.messages]
    assert kinds.index("backfill_start") < kinds.index("backfill_end") < kinds.index("run_stop")
    assert [p["index"] for p in late.points(run_id)] == list(range(15))
    assert [p["index"] for p in early.points(run_id)] == list(range(15))


async def test_a_client_that_stops_reading_does_not_hold_back_the_others(service: LiveService) -> None:
    run_id = "e2e-stalled"
    # A raw client that completes the websocket handshake and then never reads, with a tiny receive window.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", service.port))
    stalled.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        async with WsClient(service.ws) as reader, FrameSender(service.zmq) as sender:
            # Start metadata travels in the run_start event: 2 MB alone overflows the stalled socket's buffers.
            await sender.send_start(run_id, "one client stalls", padding="x" * 2_000_000)
            for i in range(120):
                await sender.send_event(i, _small_frame(i))
            await sender.send_stop(120)
            await _until(lambda: reader.stopped(run_id), 120, "every point on the reading client")
        assert [p["index"] for p in reader.points(run_id)] == list(range(120))
    finally:
        stalled.close()


def test_ctrl_c_stops_the_service_mid_scan_within_seconds_without_a_traceback(tmp_path: Path) -> None:
    live = _start_service(tmp_path)
    sim = subprocess.Popen([CLI, "simulate", "--zmq", live.zmq, "--frames", "1000", "--rate", "20"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{live.http}/api/health").json()["counters"]["points"] < 5:  # mid-scan
            assert time.monotonic() < deadline, live.log_text()[-3000:]
            time.sleep(0.2)
        rc, seconds = _stop_service(live, signal.SIGINT)
    finally:
        sim.kill()
        sim.wait()
    log = live.log_text()
    assert rc == 0, log[-3000:]
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "Traceback" not in log, log[-3000:]
    assert "dropped" in log or "stopped" in log


def test_sigterm_stops_an_idle_service_cleanly(tmp_path: Path) -> None:
    live = _start_service(tmp_path)
    rc, seconds = _stop_service(live, signal.SIGTERM)
    assert rc == 0 and seconds < 10, live.log_text()[-3000:]
    assert "Traceback" not in live.log_text()
