"""Clicking a grey reference point of an adapted bundle shows the frame it was fitted on (real CBF frames)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn
from live_bridge import MODEL, BackgroundLoop, free_port
from page_support import PageProbe, screenshot
from prometheus_client.core import CollectorRegistry

from frontend_bridge.app import create_app
from frontend_bridge.hub import Hub
from operators.bundle import ModelBundle
from stream.reference_frames import reference_frames_of

WAIT_MS = 30_000


@pytest.fixture
def reference_page_url(adapted_bundle) -> Iterator[tuple[str, ModelBundle]]:
    """The bridge as serve wires it for an adapted bundle: its reference map and its recorded frames."""
    bundle = ModelBundle.load(adapted_bundle[0])
    frames = reference_frames_of(bundle, max_pixels=4096 * 4096)
    assert frames is not None
    registry = CollectorRegistry()
    app = create_app(Hub(MODEL, registry=registry), registry=registry, reference_embedding=bundle.reference_embedding,
                     reference_clusters=bundle.reference_clusters, reference_frame=frames.read)  # fmt: skip
    port = free_port()
    background = BackgroundLoop("reference-page")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.run_coroutine_threadsafe(server.serve(), background.loop)
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "the bridge did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/", bundle
    finally:
        server.should_exit = True
        task.result(30)
        background.close()


def test_clicking_a_reference_point_shows_the_frame_it_was_fitted_on(
    page_probe: PageProbe, reference_page_url: tuple[str, ModelBundle]
) -> None:
    url, bundle = reference_page_url
    ref = bundle.reference_embedding
    # the point farthest from the others, so the click cannot land on a neighbour
    gaps = np.linalg.norm(ref[:, None] - ref[None], axis=-1) + np.eye(len(ref)) * 1e9
    target = int(gaps.min(1).argmax())
    page = page_probe.page
    page.goto(url)
    page.wait_for_function(
        f"() => window.latentStream.referenceClientPosition({target}) !== null", timeout=WAIT_MS
    )
    page.wait_for_timeout(300)  # the first render fits the view to the reference map
    pos = page.evaluate(f"() => window.latentStream.referenceClientPosition({target})")
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_function(
        "() => document.querySelector('[data-testid=frame-image]').dataset.loadedReference !== undefined",
        timeout=WAIT_MS,
    )
    image = page.get_by_test_id("frame-image")
    assert int(image.get_attribute("data-loaded-reference")) == target
    # the frame shown is the recorded one: a 224 x 224 CBF window, drawn at its own size
    assert page.evaluate("() => document.querySelector('[data-testid=frame-image]').naturalWidth") == 224
    assert f"#{target}" in page.get_by_test_id("frame-info").inner_text()
    assert "Reference frame" in page.get_by_test_id("frame-status").inner_text()
    screenshot(page, "reference_frame_after_click")
    page_probe.check_clean()
