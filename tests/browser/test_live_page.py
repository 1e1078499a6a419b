"""The live page in a real headless Chromium, against the real bridge app, a real Tiled server and real
websockets; the pipeline's messages are published into the hub in-process as the pipeline would.

The page exposes `window.latentStream` (point counts, connection state, a point's screen position) so the
tests drive it like a user (mouse clicks and drags) without reading canvas pixels.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from live_bridge import PHASES, LiveBridge, scan
from page_support import PageProbe, screenshot

from operators.messages import Point, RunStopped

WAIT_MS = 30_000


def open_page(probe: PageProbe, bridge: LiveBridge, query: str = "") -> object:
    page = probe.page
    page.goto(bridge.url + query)
    page.wait_for_function(
        "() => window.latentStream && window.latentStream.connection() === 'open'", timeout=WAIT_MS
    )
    return page


def wait_points(page: object, n: int) -> None:
    page.wait_for_function(f"() => window.latentStream.pointCount() === {n}", timeout=WAIT_MS)


def stream(bridge: LiveBridge, messages: list, per_batch: int = 10, pause_s: float = 0.02) -> None:
    """Publish like a scan arriving: small batches with pauses, so the page sees live appends."""
    for start in range(0, len(messages), per_batch):
        bridge.publish(*messages[start : start + per_batch])
        time.sleep(pause_s)


def points_of(messages: list) -> list[Point]:
    return [m for m in messages if isinstance(m, Point)]


def split_at_point(messages: list, n: int) -> tuple[list, list]:
    """The messages up to and including the n-th point, and the rest."""
    seen = 0
    for i, m in enumerate(messages):
        seen += isinstance(m, Point)
        if seen == n:
            return messages[: i + 1], messages[i + 1 :]
    return messages, []


def test_streamed_scan_shows_every_point_with_clusters_and_health(
    page_probe: PageProbe, bridge: LiveBridge
) -> None:
    page = open_page(page_probe, bridge)
    messages = scan("run-live", 300, tiled_url=bridge.tiled.url)
    stream(bridge, messages)
    wait_points(page, 300)

    assert page.get_by_test_id("point-count").get_attribute("data-count") == "300"
    legend = {
        int(row.get_attribute("data-cluster")): int(row.locator(".count").inner_text().replace(",", ""))
        for row in page.get_by_test_id("legend").locator("li[data-cluster]").all()
    }
    assert legend == {0: 100, 1: 100, 2: 100}
    notices = page.get_by_test_id("notices").inner_text()
    assert "New cluster 2 appeared at frame #200" in notices
    assert "scan run-live: streaming" in page.get_by_test_id("run-status").inner_text()
    # the health panel polls /api/health: the stage medians of the published timings show up
    page.wait_for_function(
        "() => document.querySelector('[data-testid=health] [data-field=stages]').innerText.includes('encode')",
        timeout=WAIT_MS,
    )
    assert "21.0 ms" in page.get_by_test_id("health").inner_text()
    assert page.locator("[data-testid=health] [data-field=persist]").is_hidden()  # a bridge that stores nothing
    assert page.evaluate("() => window.latentStream.duplicatesDropped()") == 0
    screenshot(page, "live_scan_300_points")
    page_probe.check_clean()


def test_clicking_a_point_shows_its_frame_from_tiled(page_probe: PageProbe, bridge: LiveBridge) -> None:
    page = open_page(page_probe, bridge)
    messages = scan("run-click", 300, tiled_url=bridge.tiled.url)
    stream(bridge, messages, per_batch=50)
    wait_points(page, 300)
    bridge.flush_frames()

    target = points_of(messages)[137]
    pos = page.evaluate(f"() => window.latentStream.pointClientPosition({target.index})")
    page.mouse.click(pos["x"], pos["y"])
    image = page.get_by_test_id("frame-image")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=frame-image]').dataset.loadedIndex !== undefined",
        timeout=WAIT_MS,
    )
    # the nearest point is the one clicked, or one drawn on top of it: either way its own frame is shown
    shown = int(image.get_attribute("data-loaded-index"))
    clicked = next(p for p in points_of(messages) if p.index == shown)
    assert abs(clicked.x - target.x) < 0.2 and abs(clicked.y - target.y) < 0.2
    assert page.evaluate("() => document.querySelector('[data-testid=frame-image]').naturalWidth") == 112
    info = page.get_by_test_id("frame-info").inner_text()
    assert f"#{shown}" in info and "31.0 ms" in info and "21.0 ms" in info
    assert f"{clicked.cluster}" in page.locator("[data-field=cluster]").inner_text()
    screenshot(page, "frame_after_click")
    page_probe.check_clean()


def test_a_streamed_run_logs_no_console_error_and_no_request_fails(page_probe: PageProbe, bridge: LiveBridge) -> None:
    failed: list[str] = []  # any answer >= 400 (the favicon the page used to ask for was a 404 in the console)
    page_probe.page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page = open_page(page_probe, bridge)
    messages = scan("run-console", 200, tiled_url=bridge.tiled.url)
    bridge.publish(messages[0])  # the run starts: its notice shows
    notice = page.get_by_test_id("notices").locator(".notice").first
    notice.wait_for(timeout=WAIT_MS)
    box, plot = notice.bounding_box(), page.locator(".plot").bounding_box()
    # the notice stays clear of the plot's top half (where it hid the newest points) and lets clicks through
    assert box["y"] >= plot["y"] + plot["height"] / 2, (box, plot)
    assert notice.evaluate("n => getComputedStyle(n.parentElement).pointerEvents") == "none"
    stream(bridge, messages[1:])
    wait_points(page, 200)
    bridge.flush_frames()
    target = points_of(messages)[42]  # a click loads a frame from Tiled through the bridge
    pos = page.evaluate(f"() => window.latentStream.pointClientPosition({target.index})")
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_function(
        "() => document.querySelector('[data-testid=frame-image]').dataset.loadedIndex !== undefined",
        timeout=WAIT_MS,
    )
    page.wait_for_function(  # a health poll came back after the run
        "() => document.querySelector('[data-testid=health] [data-field=stages]').innerText.includes('encode')",
        timeout=WAIT_MS,
    )
    assert not failed, failed
    page_probe.check_clean()  # no console error, no page error


def test_box_selection_shows_mean_and_std_of_the_selected_frames(
    page_probe: PageProbe, bridge: LiveBridge
) -> None:
    page = open_page(page_probe, bridge)
    messages = scan("run-select", 300, tiled_url=bridge.tiled.url)
    stream(bridge, messages, per_batch=50)
    wait_points(page, 300)
    bridge.flush_frames()

    # a box around the second regime's cloud
    cx, cy = PHASES[1].centre
    x0, x1, y0, y1 = cx - 1.2, cx + 2.0, cy - 1.5, cy + 1.0
    expected = [p for p in points_of(messages) if x0 <= p.x <= x1 and y0 <= p.y <= y1]
    assert 50 <= len(expected) <= 120
    page.get_by_test_id("tool-box").click()
    a = page.evaluate(f"() => window.latentStream.dataToClient({x0}, {y1})")
    b = page.evaluate(f"() => window.latentStream.dataToClient({x1}, {y0})")
    page.mouse.move(a["x"], a["y"])
    page.mouse.down()
    page.mouse.move((a["x"] + b["x"]) / 2, (a["y"] + b["y"]) / 2, steps=5)
    page.mouse.move(b["x"], b["y"], steps=5)
    page.mouse.up()

    page.wait_for_function(
        "() => ['mean-image', 'std-image'].every("
        "id => document.querySelector(`[data-testid=${id}]`).dataset.loadedCount !== undefined)",
        timeout=WAIT_MS,
    )
    selected = page.evaluate("() => window.latentStream.selectedCount()")
    # pixel rounding at the box edges may take or leave a point lying exactly on the edge
    assert abs(selected - len(expected)) <= 2
    sampled = int(page.get_by_test_id("mean-image").get_attribute("data-loaded-count"))
    assert sampled == min(selected, 64)
    summary = page.get_by_test_id("selection-summary").inner_text()
    assert f"{selected} frames selected" in summary
    for test_id in ("mean-image", "std-image"):
        assert page.evaluate(f"() => document.querySelector('[data-testid={test_id}]').naturalWidth") == 112
    screenshot(page, "mean_std_after_box_selection")
    page_probe.check_clean()


def test_reconnect_after_server_restart_resumes_with_backfill(
    page_probe: PageProbe, bridge: LiveBridge
) -> None:
    page = open_page(page_probe, bridge)
    messages = scan("run-restart", 240, tiled_url=None)
    first, missed, later = messages[:120], messages[120:180], messages[180:]
    stream(bridge, first)
    n_first = len(points_of(first))
    wait_points(page, n_first)

    bridge.stop_http()
    page.wait_for_function("() => window.latentStream.connection() === 'waiting'", timeout=WAIT_MS)
    assert "Disconnected" in page.get_by_test_id("connection-status").inner_text()
    screenshot(page, "disconnected")
    bridge.publish(*missed)  # the pipeline carries on while the page's server is down
    bridge.start_http()

    n_missed = n_first + len(points_of(missed))
    page.wait_for_function("() => window.latentStream.connects() === 2", timeout=WAIT_MS)
    wait_points(page, n_missed)
    backfills = page.evaluate("() => window.latentStream.backfills()")
    assert backfills[-1]["count"] == n_missed
    assert backfills[-1]["run_id"] == "run-restart"
    # the backfill re-sent what the page had: it was dropped, not drawn twice
    assert page.evaluate("() => window.latentStream.duplicatesDropped()") == n_first

    stream(bridge, later)
    wait_points(page, len(points_of(messages)))
    assert page.evaluate("() => window.latentStream.connection()") == "open"
    screenshot(page, "resumed_after_restart")
    page_probe.check_clean(expected=("ERR_CONNECTION_REFUSED",))  # the browser logs each refused retry


def test_late_joiner_sees_the_run_so_far(page_probe: PageProbe, bridge: LiveBridge) -> None:
    messages = scan("run-late", 250, tiled_url=None)
    bridge.publish(*messages)
    page = open_page(page_probe, bridge)
    wait_points(page, 250)
    assert page.evaluate("() => window.latentStream.runId()") == "run-late"
    page_probe.check_clean()


def test_run_selector_shows_a_past_run_and_returns_to_live(page_probe: PageProbe, bridge: LiveBridge) -> None:
    past = scan("run-past", 80, tiled_url=None, seed=3)
    bridge.publish(*past, RunStopped("run-past", time.time(), 80, 80, run_key="run-past"))
    page = open_page(page_probe, bridge)
    current = scan("run-now", 40, tiled_url=None, seed=4)
    stream(bridge, current)
    wait_points(page, 40)

    select = page.get_by_test_id("run-select")
    page.wait_for_function(
        "() => [...document.querySelector('[data-testid=run-select]').options].some(o => o.value === 'run-past')",
        timeout=WAIT_MS,
    )
    select.select_option("run-past")
    wait_points(page, 80)
    assert page.evaluate("() => window.latentStream.runId()") == "run-past"
    assert "stopped" in page.get_by_test_id("run-status").inner_text()
    # live points keep arriving for the current run while a past one is shown
    bridge.publish(*scan("run-now", 60, tiled_url=None, seed=4)[41:])
    select.select_option("live")
    wait_points(page, 60)
    assert page.evaluate("() => window.latentStream.runId()") == "run-now"
    page_probe.check_clean()


def test_pause_freezes_the_plot_and_resume_catches_up(page_probe: PageProbe, bridge: LiveBridge) -> None:
    page = open_page(page_probe, bridge)
    messages = scan("run-pause", 100, tiled_url=None)
    head, tail = split_at_point(messages, 40)
    stream(bridge, head)
    wait_points(page, 40)
    page.get_by_test_id("pause").click()
    bridge.publish(*tail)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=paused-note]').innerText.includes('60 new points waiting')",
        timeout=WAIT_MS,
    )
    assert page.evaluate("() => window.latentStream.pointCount()") == 40
    page.get_by_test_id("pause").click()
    wait_points(page, 100)
    assert page.get_by_test_id("paused-note").is_hidden()
    page_probe.check_clean()


@pytest.mark.parametrize("with_token", [True, False])
def test_token_from_the_page_url_reaches_the_websocket_and_api(
    page_probe: PageProbe, tmp_path: Path, with_token: bool
) -> None:
    bridge = LiveBridge(data_dir=tmp_path, tiled=None, token="s3cret")
    try:
        bridge.publish(*scan("run-token", 20, tiled_url=None))
        page = page_probe.page
        page.goto(bridge.url + ("?token=s3cret" if with_token else ""))
        if with_token:
            wait_points(page, 20)
            page.wait_for_function(
                "() => document.querySelector('[data-testid=health]').dataset.state === 'ok'", timeout=WAIT_MS
            )
        else:
            page.wait_for_function(
                "() => window.latentStream && window.latentStream.connection() === 'waiting'", timeout=WAIT_MS
            )
            assert "token refused" in page.get_by_test_id("connection-status").get_attribute("title")
            assert page.evaluate("() => window.latentStream.pointCount()") == 0
        # this bridge has no reference map (404); without the token every API call is refused (401)
        page_probe.check_clean(expected=("404", "401"))
    finally:
        bridge.close()


def test_a_cluster_update_recolours_the_points_it_names_and_a_late_joiner_gets_them_corrected(
    page_probe: PageProbe, bridge: LiveBridge
) -> None:
    from operators.messages import ClusterNew, ClusterUpdate

    page = open_page(page_probe, bridge)
    messages = scan("run-recolour", 300, tiled_url=None)
    stream(bridge, messages, per_batch=50)
    wait_points(page, 300)
    page.get_by_test_id("color-by").select_option("cluster")
    page.wait_for_function("() => !window.latentStream.recolourPending()", timeout=WAIT_MS)
    redraws = page.evaluate("() => window.latentStream.fullRedraws()")
    assert page.evaluate("() => window.latentStream.pointCluster(150)") == 1

    # re-clustering: frames 150..199 were a phase of their own; cluster 7 is new
    moved = list(range(150, 200))
    bridge.publish(ClusterNew("run-recolour", 7, 150, time.time()),
                   ClusterUpdate("run-recolour", moved, [7] * len(moved), time.time(), run_key="run-recolour"))
    page.wait_for_function("() => window.latentStream.clusterUpdates() === 1", timeout=WAIT_MS)
    page.wait_for_function("() => !window.latentStream.recolourPending()", timeout=WAIT_MS)
    assert [page.evaluate(f"() => window.latentStream.pointCluster({i})") for i in (149, 150, 199, 200)] == [1, 7, 7, 2]
    assert page.evaluate("() => window.latentStream.fullRedraws()") > redraws  # drawn again, in the new colours
    page.wait_for_function(
        "() => document.querySelector('[data-testid=legend] li[data-cluster=\"7\"]') !== null", timeout=WAIT_MS
    )
    legend = {
        int(row.get_attribute("data-cluster")): int(row.locator(".count").inner_text().replace(",", ""))
        for row in page.get_by_test_id("legend").locator("li[data-cluster]").all()
    }
    assert legend == {0: 100, 1: 50, 7: 50, 2: 100}
    assert page.evaluate("() => window.latentStream.pointCount()") == 300
    screenshot(page, "cluster_update_recoloured")

    late = open_page(page_probe, bridge)  # the same page, reloaded: its backfill carries the corrected ids
    wait_points(late, 300)
    assert [late.evaluate(f"() => window.latentStream.pointCluster({i})") for i in (149, 150, 199, 200)] == [1, 7, 7, 2]
    page_probe.check_clean()
