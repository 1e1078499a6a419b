"""`latent-stream serve` always comes back: a data directory left by odd runs never stops a restart (issue 14).

Before, the result log of a run Tiled refused as a key ("a/b") failed the writer at every start: the service
exited 1 on every restart until someone deleted the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import LiveService, WsClient, start_service, stop_service, until
from test_run_isolation import leave_logs_of_failed_runs

from operators.persist.result_log import SET_ASIDE_DIR
from stream.sender import FrameSender

pytestmark = pytest.mark.e2e

ODD_ID = "a/b\nforged log line"


def _frame(i: int) -> np.ndarray:
    return np.random.default_rng(i).poisson(5.0, size=(64, 64)).astype(np.int32)


def _key(service: LiveService) -> str:
    return (service.data_dir / "tiled-api-key").read_text().strip()


async def _fetch(service: LiveService, url: str) -> bytes:
    headers = {"Authorization": f"Apikey {_key(service)}", "Accept": "application/octet-stream"}
    async with httpx.AsyncClient(headers=headers, trust_env=False, timeout=30) as http:
        r = await http.get(url)
    r.raise_for_status()
    return r.content


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        r = await http.get(url)
    r.raise_for_status()
    return r


async def _fetchable(service: LiveService, url: str) -> bool:
    try:
        return bool(await _fetch(service, url))
    except httpx.HTTPStatusError:
        return False


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_a_restart_on_a_data_dir_left_by_odd_runs_comes_up_and_serves(tmp_path: Path) -> None:
    left = leave_logs_of_failed_runs(tmp_path / "data" / "results-log")
    first = start_service(tmp_path, log_name="serve-1.log")  # before: exit 1 during start-up
    try:
        assert sorted(p.name for p in (first.data_dir / "results-log" / SET_ASIDE_DIR).iterdir()) == left
        metrics = (await _get(f"{first.http}/metrics")).text
        assert f"latent_stream_persist_logs_set_aside_total {float(len(left))}" in metrics

        # it serves, a run with an odd id included, and dies mid-run leaving that run's log behind
        async with FrameSender(first.zmq) as sender, WsClient(first.ws) as client:
            await sender.send_start(ODD_ID, "odd")
            for i in range(3):
                await sender.send_event(i, _frame(i))
            await until(lambda: len(client.points(ODD_ID)) == 3, 60, "3 points of the odd run")
        urls = [p["tiled_url"] for p in client.points(ODD_ID)]
        assert all("/array/full/a_b_forged_log_line-" in url for url in urls)  # a key made from the odd id
        for i, url in enumerate(urls):
            await until_async(lambda u=url: _fetchable(first, u), 30, f"frame {i} stored")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        stop_service(first, signal.SIGKILL)

    second = start_service(tmp_path, like=first, log_name="serve-2.log")
    try:
        for i, url in enumerate(urls):  # the odd run was recovered under its key, its frames where they were
            assert await _fetch(second, url) == _frame(i).tobytes()
        run_key = urls[0].split("/array/full/")[1].split("/")[0]
        rows = (await _get(f"{second.http}/api/runs/{run_key}/points")).json()
        assert [r["index"] for r in rows] == [0, 1, 2]
    finally:
        rc, _ = stop_service(second)
    assert rc == 0, second.log_text()[-3000:]
    # the sender's newline never reached the log as a line of its own
    assert not any(line.startswith("forged log line") for line in first.log_text().splitlines())
