"""``latent-stream serve`` end to end: real subprocess, real ZeroMQ, real websockets, embedded Tiled."""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import CLI, LiveService, WsClient
from service_support import start_service as _start_service
from service_support import stop_service as _stop_service
from service_support import until as _until

from stream.protocol import encode_event
from stream.sender import FrameSender

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = _start_service(tmp_path_factory.mktemp("serve"))
    yield live
    _stop_service(live)


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
    start = next(m for m in client.messages if m.get("type") == "run_start" and m["run_id"] == run_id)
    assert start["run_key"].startswith(f"{run_id}-")  # where the run is stored: the id plus a suffix of its own
    base = f"http://127.0.0.1:{service.tiled_port}/api/v1/array/full/{start['run_key']}/primary/image?slice="
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
            # Start metadata travels in every run_start event: 40 runs of 60 KB overflow the stalled socket's
            # buffers (one start may carry at most 64 KiB).
            for k in range(40):
                await sender.send_start(f"{run_id}-filler-{k}", "filler", padding="x" * 60_000)
                await sender.send_stop(0)
            await sender.send_start(run_id, "one client stalls")
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
        rc, seconds = _stop_service(live, signal.SIGINT, group=True)  # Ctrl-C reaches the terminal's job
    finally:
        sim.kill()
        sim.wait()
    log = live.log_text()
    assert rc == 0, log[-3000:]
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "Traceback" not in log, log[-3000:]
    assert "dropped" in log or "stopped" in log
    # the embedded Tiled server did not die with the Ctrl-C: it outlived the writer's drain
    assert "All connection attempts failed" not in log and "giving up on" not in log, log[-3000:]


def test_sigterm_stops_an_idle_service_cleanly(tmp_path: Path) -> None:
    live = _start_service(tmp_path)
    rc, seconds = _stop_service(live, signal.SIGTERM)
    assert rc == 0 and seconds < 10, live.log_text()[-3000:]
    assert "Traceback" not in live.log_text()
