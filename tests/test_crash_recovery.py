"""The whole service SIGKILLed mid-run loses no row its clients got; restarted, it closes the interrupted run and
stores a resent run id as a run of its own (issues 4 and 14).

One level down, tests/test_tiled_crash_recovery.py kills a bare writer. Here the real `latent-stream serve`
(embedded Tiled child, ZeroMQ ingest, /ws) is killed while frames flow, then started again on the same
data directory and ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_support import LiveService, WsClient, start_service, stop_service, until
from tiled.client import from_uri

from operators.persist.catalog import TiledRunCatalog
from stream.sender import FrameSender

pytestmark = pytest.mark.e2e

RUN_ID = "crash-e2e"
KILL_AFTER_POINTS = 20
MORE_FRAMES = 10


def _frame(i: int) -> np.ndarray:
    return np.random.default_rng(i).poisson(5.0, size=(64, 64)).astype(np.int32)


def _gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def _send_frames(sender: FrameSender, first: int, sent: list[int]) -> None:
    """Send frames from `first` on, paced so the service is mid-run when it is killed; `sent` records them."""
    i = first
    while True:
        await sender.send_event(i, _frame(i))
        sent.append(i)
        i += 1
        await asyncio.sleep(0.05)


async def test_sigkill_mid_run_loses_no_point_clients_got_and_a_resent_run_id_never_touches_the_interrupted_run(
    tmp_path: Path,
) -> None:
    first = start_service(tmp_path, log_name="serve-1.log")
    sent: list[int] = []
    try:
        tiled_pid = int((first.data_dir / "tiled-server.pid").read_text())
        async with FrameSender(first.zmq) as sender:
            async with WsClient(first.ws) as before:
                await sender.send_start(RUN_ID, "killed mid-run", sample="S1")
                feeder = asyncio.create_task(_send_frames(sender, 0, sent))
                try:
                    await until(lambda: len(before.points(RUN_ID)) >= KILL_AFTER_POINTS, 60,
                                f"{KILL_AFTER_POINTS} points before the kill")  # fmt: skip
                    os.kill(first.proc.pid, signal.SIGKILL)  # mid-run: no stop, no drain, no shutdown hooks
                    await asyncio.to_thread(first.proc.wait, 10)
                finally:
                    feeder.cancel()
                    await asyncio.gather(feeder, return_exceptions=True)
                # everything the server wrote before it died is read (then the connection drops)
                await until(lambda: before.closed, 10, "the websocket to drop after the kill")
            got = sorted(p["index"] for p in before.points(RUN_ID))
            assert len(got) >= KILL_AFTER_POINTS and len(set(got)) == len(got)
            assert not before.stopped(RUN_ID)

            # the embedded Tiled child dies with the service (PR_SET_PDEATHSIG), freeing its port
            await until(lambda: _gone(tiled_pid) and _port_closed(first.tiled_port), 15,
                        f"the embedded Tiled server (pid {tiled_pid}) to exit")  # fmt: skip

            second = await asyncio.to_thread(start_service, tmp_path, like=first, log_name="serve-2.log")
            try:
                # /api/health answers only after the writer replayed the result log: Tiled is complete now
                interrupted_key = _run_key_of(before.points(RUN_ID)[0])
                stored = await _stored_indices(second, interrupted_key)
                assert len(set(stored)) == len(stored), "a row stored twice"
                assert set(got) <= set(stored), (
                    f"published before the kill, not in Tiled: {set(got) - set(stored)}"
                )
                assert set(stored) <= set(sent)
                run = await asyncio.to_thread(_run_node, second, interrupted_key)
                assert run["latent"]["vectors"].shape[0] == len(stored)
                assert run.metadata["status"] == "open" and run.metadata["sample"] == "S1"

                # The source sends the same run id again: a run of its own, the interrupted one is closed.
                async with WsClient(second.ws) as after:
                    more = list(range(sent[-1] + 1, sent[-1] + 1 + MORE_FRAMES))
                    await sender.send_start(RUN_ID, "killed mid-run", sample="S1")
                    for i in more:
                        await sender.send_event(i, _frame(i))
                    await sender.send_stop(more[-1] + 1)
                    await until(lambda: after.stopped(RUN_ID), 60, "the resent run's stop")
                assert [p["index"] for p in after.points(RUN_ID)] == more
                resent_key = _run_key_of(after.points(RUN_ID)[0])
                assert resent_key != interrupted_key

                def closed() -> bool:
                    return _run_node(second, resent_key).metadata["status"] == "closed"

                deadline = time.monotonic() + 30
                while not await asyncio.to_thread(closed):
                    assert time.monotonic() < deadline, "the resent run was not closed in Tiled"
                    await asyncio.sleep(0.5)
                interrupted = await asyncio.to_thread(_run_node, second, interrupted_key)
                assert interrupted.metadata["status"] == "closed"
                assert interrupted.metadata["reason"] == "interrupted"
                assert await _stored_indices(second, interrupted_key) == stored  # kept as it was
                # frames whose image died with the first process are counted, not silently missing
                persist = interrupted.metadata["persist"]
                lost = persist["frames_not_written"].get("lost_in_crash", 0)
                assert persist["frames_written"] + lost == len(stored)

                resent = await asyncio.to_thread(_run_node, second, resent_key)
                assert await _stored_indices(second, resent_key) == more
                assert await _stored_indices(second, RUN_ID) == more  # the run id names its latest run
                md = resent.metadata
                assert md["run_id"] == RUN_ID and md["reason"] == "stop" and md["rows"] == MORE_FRAMES
                assert md["num_frames"] == more[-1] + 1  # as the source announced it in its stop
                assert md["persist"]["frames_written"] == MORE_FRAMES
                assert not list((second.data_dir / "results-log").glob("*.wal"))  # closed and complete
            finally:
                rc, _ = stop_service(second)
            assert rc == 0, second.log_text()[-3000:]
            assert "Traceback" not in second.log_text(), second.log_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            stop_service(first, signal.SIGKILL)


def _key(service: LiveService) -> str:
    return (service.data_dir / "tiled-api-key").read_text().strip()


def _run_key_of(point: dict[str, Any]) -> str:
    """The storage key in a point's frame URI: .../array/full/<run_key>/primary/image?slice=i."""
    return point["tiled_url"].split("/array/full/")[1].split("/")[0]


def _run_node(service: LiveService, run_key: str) -> Any:  # a tiled client node
    return from_uri(service.tiled_url, api_key=_key(service))[run_key]


async def _stored_indices(service: LiveService, run: str) -> list[int]:
    catalog = TiledRunCatalog(service.tiled_url, _key(service))
    try:
        rows = await catalog.run_points(run)
    finally:
        catalog.close()
    assert rows is not None, f"run {run} not in Tiled"
    return [r["index"] for r in rows]
