"""``serve --workers 2`` end to end: the service starts its own local Ray instance (127.0.0.1) with two worker
processes; real ZeroMQ, real websockets, the embedded Tiled. And ``--workers 1`` never imports Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import CLI, LiveService, WsClient, start_service, stop_service, until

from stream.sender import FrameSender

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = start_service(tmp_path_factory.mktemp("workers"), extra_args=("--workers", "2", "--device", "cpu"))
    yield live
    rc, _ = stop_service(live)
    assert rc == 0 and "error while stopping" not in live.log_text(), live.log_text()[-3000:]


def _health(service: LiveService) -> dict:
    return httpx.get(f"{service.http}/api/health", timeout=5).json()


def _accounted(health: dict) -> tuple[float, float]:
    ingest = health["ingest"]
    handled = sum(sum(ingest[k].values()) for k in ("processed", "rejected", "dropped"))
    return ingest["received"], handled


async def test_300_full_size_frames_at_20_hz_on_two_workers_give_300_points_in_frame_order(
    service: LiveService,
) -> None:
    run_id = "pool-300"
    async with WsClient(service.ws) as client:
        sim = await asyncio.create_subprocess_exec(
            CLI, "simulate", "--zmq", service.zmq, "--frames", "300", "--rate", "20", "--run-id", run_id,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        await until(lambda: client.stopped(run_id), 120, "300 points and the run's stop")
        out, _ = await sim.communicate()
        assert sim.returncode == 0, out.decode()
    assert [p["index"] for p in client.points(run_id)] == list(range(300))
    health = _health(service)
    workers = health["workers"]
    assert len(workers) == 2 and {w["state"] for w in workers} == {"alive"}, workers
    assert all(w["frames"] > 0 and w["pid"] != os.getpid() for w in workers), workers  # both computed
    assert health["ingest"]["processed"]["event"] == 300
    received, handled = _accounted(health)
    assert received == handled
    # the frames stayed in the service and reached its Tiled writer by their own path
    await until(lambda: _health(service)["persist"]["frames_written"] >= 300, 60, "300 frames stored")
    assert _health(service)["persist"]["frames_not_written"] == {}


async def test_a_worker_killed_mid_run_comes_back_and_every_frame_is_a_point_or_counted_worker_lost(
    service: LiveService,
) -> None:
    run_id, frames = "pool-kill", 160
    before = _health(service)["ingest"]["dropped"].get("worker_lost", 0)
    victim = _health(service)["workers"][0]
    rng = np.random.default_rng(7)
    async with WsClient(service.ws) as client, FrameSender(service.zmq) as sender:
        await sender.send_start(run_id)
        for i in range(frames):
            await sender.send_event(i, rng.poisson(5.0, size=(256, 240)).astype(np.int32))
            if i == 40:
                await until(lambda: len(client.points(run_id)) >= 20, 60, "the run's first points")
                os.kill(victim["pid"], signal.SIGKILL)  # mid-run: frames keep coming at 20 Hz
            await asyncio.sleep(0.05)
        await sender.send_stop(frames)
        await until(lambda: client.stopped(run_id), 120, "the run's stop")

    indices = [p["index"] for p in client.points(run_id)]
    assert indices == sorted(set(indices))  # in frame order, none twice
    health = _health(service)
    lost = health["ingest"]["dropped"].get("worker_lost", 0) - before
    assert len(indices) + lost == frames
    received, handled = _accounted(health)
    assert received == handled

    async def back() -> bool:
        w = _health(service)["workers"][0]
        return w["state"] == "alive" and w["pid"] != victim["pid"]

    for _ in range(600):  # Ray restarts the worker (a new process loads the model again)
        if await back():
            break
        await asyncio.sleep(0.2)
    revived = _health(service)["workers"][0]
    assert revived["state"] == "alive" and revived["pid"] != victim["pid"] and revived["restarts"] == 1, revived


def test_one_worker_stays_in_process_without_importing_ray(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import asyncio, os, sys
        from stream.config import ServeSettings
        from stream.serve import Service

        async def main():
            settings = ServeSettings(port=0, tiled="http://127.0.0.1:9", data_dir=sys.argv[1],
                                     zmq="tcp://127.0.0.1:9")
            service = Service(settings)
            task = asyncio.create_task(service.run(handle_signals=False))
            await asyncio.wait_for(service.ready.wait(), 120)
            health = service._health()
            service.request_stop()
            await task
            print("ray" in sys.modules, health["workers"][0]["node"], flush=True)
            os._exit(0)  # as the CLI ends: a thread left connecting to the unreachable Tiled must not hold it

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "in-process"], out.stderr[-3000:]
