"""Fixtures for the live-page tests: Debian's Chromium driven by Playwright's client (no browser download),
a real Tiled server for the frames, and the real bridge app fed in-process.

Chromium: `apt-get update && apt-get install -y chromium` (the Makefile's `browser` target). Without it the
tests skip locally, and fail in CI (CI set), where the page must be tested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from live_bridge import BackgroundLoop, LiveBridge, reference_map
from page_support import PageProbe, screenshot

from operators.persist.server import EmbeddedTiledServer, TiledEndpoint

CHROMIUM = Path(os.environ.get("LATENT_STREAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = (
        f"Chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y chromium`"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run the browser tests)", pytrace=False)
    pytest.skip(message)


# Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main thread while it
# is open, and every pytest-asyncio test collected after the browser tests would fail to start its own loop.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page_probe(browser: object, request: pytest.FixtureRequest) -> Iterator[PageProbe]:
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    probe = PageProbe(page)

    def route(r: object) -> None:
        host = urlsplit(r.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            probe.external_requests.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page.on("pageerror", lambda exc: probe.errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and probe.errors.append(f"console: {msg.text}"))
    try:
        yield probe
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            screenshot(page, f"FAILED-{request.node.name}")
        context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledEndpoint]:
    """One real Tiled server (a child process) for the frames of every page test."""
    # Its own long-lived loop thread: Playwright's sync client keeps a loop running in this one, and the
    # Tiled child is tied to the thread that started it (it dies with its parent).
    loop = BackgroundLoop("page-tiled")
    srv = EmbeddedTiledServer(tmp_path_factory.mktemp("page-tiled"), port=0)
    try:
        yield loop.call(srv.start(), timeout=120)
        loop.call(srv.stop())
    finally:
        loop.close()


@pytest.fixture
def bridge(tiled: TiledEndpoint, tmp_path: Path) -> Iterator[LiveBridge]:
    live = LiveBridge(data_dir=tmp_path, tiled=tiled, reference=reference_map())
    try:
        yield live
    finally:
        live.close()
