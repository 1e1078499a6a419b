"""A writer SIGKILLed mid-run loses no published row; a restart continues the run or closes it (issue 4)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from tiled.client import from_uri
from tiled_support import make_point, publish_stored, publish_stored_run, tiled_server_fixture

from operators.messages import RunStopped
from operators.persist.server import EmbeddedTiledServer
from operators.persist.writer import TiledWriter

tiled_server = tiled_server_fixture()

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    from tiled_support import make_point, publish_stored
    from operators.messages import RunStarted
    from operators.persist.writer import TiledWriter

    async def main(url, key, data_dir):
        w = TiledWriter(url, key, data_dir=data_dir)
        await w.start()
        print("ready", flush=True)
        sys.stdin.readline()  # the test stops Tiled first
        rng = np.random.default_rng(7)
        await w.publish(RunStarted("run-crash", "crash", time.time(), {"sample": "S1"}, run_key="run-crash"))
        for i in range(30):
            await publish_stored(w, *make_point(url, "run-crash", i, rng))
            print(f"published {i}", flush=True)  # the row went out to clients: it must survive
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:4]))
    """
)


async def test_sigkill_mid_run_loses_no_published_row_and_the_run_continues(
    tiled_server: EmbeddedTiledServer, tmp_path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    data_dir = tmp_path / "service"
    tests_dir = os.path.dirname(__file__)
    child = subprocess.Popen(  # noqa: ASYNC220 - a one-off spawn in a test
        [sys.executable, "-c", CHILD, ep.url, ep.api_key, str(data_dir), tests_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    published = 0
    try:
        assert (await asyncio.to_thread(child.stdout.readline)).startswith("ready")
        # Tiled is down while the service publishes: rows can only survive through the result log
        await tiled_server.stop()
        child.stdin.write("go\n")
        child.stdin.flush()
        while published < 30:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, "child exited early"
            if line.startswith("published"):
                published += 1
        os.kill(child.pid, signal.SIGKILL)  # mid-run: no stop, no drain
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await tiled_server.start()

    # A restarted service: the writer replays the result log, then the source continues the run.
    rng = np.random.default_rng(99)
    writer = TiledWriter(ep.url, ep.api_key, data_dir=data_dir)
    await writer.start()
    run = from_uri(ep.url, api_key=ep.api_key)["run-crash"]
    table = run["latent"]["points"].read()
    assert sorted(table["index"]) == list(range(published))  # no published row lost, none twice
    assert run.metadata["status"] == "open" and run.metadata["sample"] == "S1"
    for i in range(published, published + 5):
        await publish_stored(writer, *make_point(ep.url, "run-crash", i, rng))
    await writer.publish(
        RunStopped("run-crash", time.time(), num_frames=published + 5, processed=published + 5, run_key="run-crash")
    )
    assert await writer.flush(timeout=120)
    stats = writer.stats()
    await writer.stop()

    run = from_uri(ep.url, api_key=ep.api_key)["run-crash"]
    table = run["latent"]["points"].read()
    assert list(table.sort_values("row")["index"]) == list(range(published + 5))
    assert list(table.sort_values("row")["row"]) == list(range(published + 5))
    assert run["latent"]["vectors"].shape == (published + 5, 512)
    assert run.metadata["status"] == "closed"
    # frames that died with the process are counted, with the reason, not silently missing
    assert stats.frames_not_written.get("lost_in_crash", 0) + stats.frames_written >= published
    assert not list((data_dir / "results-log").glob("*.wal"))  # closed and complete: log dropped


async def test_a_recovered_open_run_is_closed_cleanly_when_the_writer_stops(
    tiled_server: EmbeddedTiledServer, tmp_path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(5)
    first = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path)
    await first.start()
    await publish_stored_run(first, ep.url, "run-abandoned", 4, rng)
    assert await first.flush(timeout=60)
    first._result_log.close()  # abandoned without stop(), like a killed process; its log stays
    first._task.cancel()

    second = TiledWriter(ep.url, ep.api_key, data_dir=tmp_path)
    await second.start()
    await second.stop()
    run = from_uri(ep.url, api_key=ep.api_key)["run-abandoned"]
    assert run.metadata["status"] == "closed" and run.metadata["reason"] == "interrupted"
    assert len(run["latent"]["points"].read()) == 4
