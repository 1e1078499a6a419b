"""`latent-stream demo` (the README's first command): its scans reach the page and every frame is stored."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service_support import CLI, free_port
from tiled.client import from_uri

pytestmark = pytest.mark.e2e

FRAMES = 60  # ~590 MB of frames: more than the writer may hold (512 MiB) while Tiled is not up


def _stored_frames(url: str, key: str, run_key: str) -> int:
    try:
        return int(from_uri(url, api_key=key)[run_key]["primary"]["image"].shape[0])
    except KeyError:  # the run's frame array is not created yet
        return 0


def test_the_demo_stores_every_frame_of_its_first_scan_even_though_tiled_starts_after_the_model(
    tmp_path: Path,
) -> None:
    port, tiled_port, data_dir = free_port(), free_port(), tmp_path / "data"
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CLI, "demo", "--frames", str(FRAMES), "--rate", "20", "--port", str(port),
             "--tiled-port", str(tiled_port), "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "scan sim-" not in log.read_text(errors="replace"):  # the first scan was streamed
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=10).json()["runs"]
        first = runs[-1]["run_key"]  # where the run is stored
        key = (data_dir / "tiled-api-key").read_text().strip()
        stored, deadline = 0, time.monotonic() + 60
        while stored < FRAMES and time.monotonic() < deadline:  # the writer writes a moment after the points
            stored = _stored_frames(f"http://127.0.0.1:{tiled_port}", key, first)
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    text = log.read_text(errors="replace")
    assert stored == FRAMES, text[-3000:]
    assert "not written to Tiled" not in text
    assert rc == 0, text[-3000:]
