"""The live page against the real service: `latent-stream serve` (embedded Tiled, shipped bundle) fed by
`latent-stream simulate`, in headless Chromium. A simulated run of 300 frames shows all 300 points, a click
shows a frame read back from Tiled, a box selection shows a mean image; after the service restarts, the page
reconnects by itself, follows the next run live, and still reaches the first run through the run selector.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from page_support import PageProbe, screenshot

from operators.persist.server import free_port  # the one copy (the service uses it for port 0)

CLI = str(Path(sys.executable).with_name("latent-stream"))
pytestmark = pytest.mark.e2e
WAIT_MS = 180_000


@dataclass
class Service:
    """`latent-stream serve` in a subprocess, restartable on the same ports and data directory."""

    tmp: Path
    port: int
    tiled_port: int
    zmq: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 240.0) -> None:
        cmd = [CLI, "serve", "--port", str(self.port), "--tiled-port", str(self.tiled_port), "--zmq", self.zmq,
               "--data-dir", str(self.tmp / "data")]  # fmt: skip
        with open(self.tmp / "serve.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                health = httpx.get(f"{self.url}api/health", timeout=2)
                if health.status_code == 200 and health.json().get("tiled_connected"):  # frames are stored
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"serve not ready in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def simulate(self, run_id: str, frames: int, rate: float) -> subprocess.Popen[bytes]:
        cmd = [CLI, "simulate", "--zmq", self.zmq, "--frames", str(frames), "--rate", str(rate),
               "--run-id", run_id, "--log-level", "WARNING"]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path, free_port(), free_port(), f"tcp://127.0.0.1:{free_port()}")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def finish(sim: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    out, _ = sim.communicate(timeout=timeout)
    assert sim.returncode == 0, out.decode(errors="replace")


@pytest.mark.timeout(900)  # two service start-ups (model load, embedded Tiled) on a shared machine
def test_simulated_run_of_300_frames_on_the_page_then_a_restart(
    page_probe: PageProbe, service: Service
) -> None:
    page = page_probe.page
    page.goto(service.url)
    page.wait_for_function("() => window.latentStream && window.latentStream.connection() === 'open'",
                           timeout=WAIT_MS)  # fmt: skip
    # 6 Hz: full-size frames (~10 MB) must reach Tiled before the selection reads them back, on 2 shared cores
    finish(service.simulate("page-e2e-a", 300, rate=6))
    page.wait_for_function("() => window.latentStream.pointCount() === 300", timeout=WAIT_MS)
    assert page.evaluate("() => window.latentStream.runId()") == "page-e2e-a"
    # the service's own health: every frame it had to store got to Tiled so far
    not_stored = page.locator("[data-testid=health] [data-field=not-stored]")
    not_stored.wait_for(state="visible", timeout=WAIT_MS)
    assert not_stored.inner_text() == "0"
    screenshot(page, "e2e_300_points")

    # a click on a frame's point shows that frame, read back from the embedded Tiled server
    pos = page.evaluate("() => window.latentStream.pointClientPosition(150)")
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_function(
        "() => document.querySelector('[data-testid=frame-image]').dataset.loadedIndex !== undefined",
        timeout=WAIT_MS,
    )
    assert page.evaluate("() => document.querySelector('[data-testid=frame-image]').naturalWidth") > 100
    screenshot(page, "e2e_frame_after_click")

    # a box around the run's first 100 frames (long in Tiled by now; the writer may still trail the latest):
    # a mean and a std image of the (evenly sampled, bounded) selection
    box = page.evaluate(
        "() => { const ps = [...Array(100).keys()].map(i => window.latentStream.pointClientPosition(i));"
        " return {x0: Math.min(...ps.map(p => p.x)) - 3, x1: Math.max(...ps.map(p => p.x)) + 3,"
        " y0: Math.min(...ps.map(p => p.y)) - 3, y1: Math.max(...ps.map(p => p.y)) + 3}; }"
    )
    page.get_by_test_id("tool-box").click()
    page.mouse.move(box["x0"], box["y0"])
    page.mouse.down()
    page.mouse.move(box["x1"], box["y1"], steps=8)
    page.mouse.up()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=mean-image]').dataset.loadedCount !== undefined",
        timeout=WAIT_MS,
    )
    assert page.evaluate("() => window.latentStream.selectedCount()") >= 100
    assert page.evaluate("() => document.querySelector('[data-testid=std-image]').naturalWidth") > 100
    screenshot(page, "e2e_mean_after_selection")

    # the service restarts: the page notices, reconnects on its own and follows the next run live
    service.stop()
    page.wait_for_function("() => window.latentStream.connection() === 'waiting'", timeout=WAIT_MS)
    service.start()
    page.wait_for_function("() => window.latentStream.connects() >= 2", timeout=WAIT_MS)
    sim = service.simulate("page-e2e-b", 60, rate=10)
    page.wait_for_function("() => window.latentStream.runId() === 'page-e2e-b'", timeout=WAIT_MS)
    finish(sim)
    page.wait_for_function("() => window.latentStream.pointCount() === 60", timeout=WAIT_MS)

    # the first run is persisted: the run selector brings it back from the catalog (listed by its storage key)
    past = page.wait_for_function(
        "() => [...document.querySelector('[data-testid=run-select]').options].map(o => o.value)"
        ".find(v => v.startsWith('page-e2e-a-'))",
        timeout=WAIT_MS,
    ).json_value()
    page.get_by_test_id("run-select").select_option(past)
    page.wait_for_function("() => window.latentStream.pointCount() === 300", timeout=WAIT_MS)
    screenshot(page, "e2e_past_run_after_restart")
    page_probe.check_clean(expected=("ERR_CONNECTION_REFUSED",))
