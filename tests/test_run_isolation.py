"""What one sender does to one run never reaches another run's stored data, nor stops storage (issue 14).

Run ids are sender data: reused, "a/b", "victim%2Fprimary", 300 characters long. Each run is stored under
its own key (operators.persist.keys); a request Tiled fails on is dropped after a few tries instead of
holding up the runs behind it; and a result log a restart cannot replay is set aside, never a reason to
fail the start.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from tiled.client import from_uri
from tiled_support import make_point, publish_stored, tiled_server_fixture

from operators.messages import RunStarted, RunStopped
from operators.persist.keys import SLUG_CHARS, is_safe_key, run_key
from operators.persist.result_log import SET_ASIDE_DIR
from operators.persist.server import EmbeddedTiledServer
from operators.persist.writer import TiledWriter

tiled_server = tiled_server_fixture()

ODD_RUN_IDS = ["a/b", "victim%2Fprimary", "x" * 300, "line\nbreak", "", "..", "../../etc", "ünïcode"]


@pytest.mark.parametrize("run_id", ODD_RUN_IDS)
def test_every_run_id_becomes_a_safe_storage_key_of_bounded_length(run_id: str) -> None:
    key = run_key(run_id)
    assert is_safe_key(key) and len(key) <= SLUG_CHARS + 9
    assert run_key(run_id) != key  # each run gets its own


async def _fetch(srv: EmbeddedTiledServer, url: str) -> bytes | None:
    assert srv.endpoint is not None
    headers = {**srv.endpoint.headers, "Accept": "application/octet-stream"}
    async with httpx.AsyncClient(headers=headers, trust_env=False, timeout=30) as http:
        r = await http.get(url)
    return r.content if r.status_code == 200 else None


async def test_a_reused_run_id_keeps_both_runs_frames_fetchable_by_their_own_uris(
    tiled_server: EmbeddedTiledServer, tmp_path: Path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(14)
    sent: dict[str, bytes] = {}
    keys = []
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path) as writer:
        for run_id in ["scan-1", "scan-1", "victim", "victim%2Fprimary", *ODD_RUN_IDS]:
            key = run_key(run_id)
            keys.append((run_id, key))
            await writer.publish(RunStarted(run_id, f"name of {run_id!r}", time.time(), run_key=key))
            for i in range(2):
                point, image = make_point(ep.url, key, i, rng)
                point.run_id = run_id
                await publish_stored(writer, point, image)
                sent[point.tiled_url] = image.tobytes()
            await writer.publish(RunStopped(run_id, time.time(), 2, 2, run_key=key))
        assert await writer.flush(timeout=120)
        stats = writer.stats()
    assert stats.frames_written == len(sent) and not stats.frames_not_written

    fetched = await asyncio.gather(*(_fetch(tiled_server, url) for url in sent))
    assert fetched == list(sent.values())  # every frame under its own URI, byte for byte
    root = from_uri(ep.url, api_key=ep.api_key)
    for run_id, key in keys:  # the sender's id and name stay in each run's metadata, nothing else's
        md = root[key].metadata
        assert (md["run_id"], md["run_name"], md["status"]) == (run_id, f"name of {run_id!r}", "closed")
        assert len(root[key]["latent"]["points"].read()) == 2


async def test_a_frame_number_sent_twice_keeps_the_first_frame_stored(
    tiled_server: EmbeddedTiledServer, tmp_path: Path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(3)
    key = run_key("resend")
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path) as writer:
        await writer.publish(RunStarted("resend", "resend", time.time(), run_key=key))
        first, image = make_point(ep.url, key, 0, rng)
        again, image_again = make_point(ep.url, key, 0, rng)
        await publish_stored(writer, first, image)
        await publish_stored(writer, again, image_again)
        assert await writer.flush(timeout=60)
        stats = writer.stats()
    assert stats.frames_not_written == {"duplicate_index": 1} and stats.rows_written == 2
    assert await _fetch(tiled_server, first.tiled_url) == image.tobytes()


async def test_a_run_with_an_absurd_frame_number_does_not_delay_the_next_runs_frames(
    tiled_server: EmbeddedTiledServer, tmp_path: Path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    rng = np.random.default_rng(12)
    # max_frame_index is lifted so that Tiled itself fails on the frame (HTTP 500 for 10**12)
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path, max_frame_index=10**13) as writer:
        bad = run_key("absurd")
        await writer.publish(RunStarted("absurd", "absurd", time.time(), run_key=bad))
        await publish_stored(writer, *make_point(ep.url, bad, 10**12, rng))
        await writer.publish(RunStopped("absurd", time.time(), None, 1, run_key=bad))
        good = run_key("next")
        await writer.publish(RunStarted("next", "next", time.time(), run_key=good))
        points = [make_point(ep.url, good, i, rng) for i in range(3)]
        for point, image in points:
            await publish_stored(writer, point, image)
        await writer.publish(RunStopped("next", time.time(), 3, 3, run_key=good))
        # before: the 500 was retried as an outage for give_up_after (300 s) while "next" waited
        assert await writer.flush(timeout=60), "the next run's frames waited behind the failing one"
        assert writer.run_counts(bad)["frames_not_written"] == {"failed_by_tiled": 1}
        assert writer.run_counts(good)["frames_written"] == 3
    for point, image in points:
        assert await _fetch(tiled_server, point.tiled_url) == image.tobytes()


def test_frame_numbers_above_the_storage_bound_are_counted_not_stored(tmp_path: Path) -> None:
    async def main() -> dict[str, int]:
        writer = TiledWriter("http://127.0.0.1:9", None, data_dir=tmp_path, max_frame_index=1000)
        key = run_key("far")
        await writer.publish(RunStarted("far", "far", time.time(), run_key=key))
        await publish_stored(writer, *make_point("http://127.0.0.1:9", key, 10**9, np.random.default_rng(0)))
        return writer.run_counts(key)["frames_not_written"]

    assert asyncio.run(main()) == {"index_out_of_range": 1}


def _write_log(path: Path, *records: object) -> None:
    path.write_bytes(b"".join(msgpack.packb(r, use_bin_type=True) for r in records))


def _legacy_point(run_id: str, row: int) -> dict[str, object]:
    """A point record as versions before run keys wrote it (no run_key: stored under the raw run id)."""
    return {"t": "point", "run_id": run_id, "row": row, "index": row, "x": 0.0, "y": 0.0, "cluster": 0,
            "novelty": 0.0, "timestamp": time.time(), "processing_time": 0.01, "encode_time": 0.005,
            "project_time": 0.001, "tiled_url": "", "stored_by_service": False,
            "latent": np.zeros(512, np.float32).tobytes()}  # fmt: skip


def leave_logs_of_failed_runs(results_log: Path) -> list[str]:
    """The result logs earlier failures left behind; returns their file names."""
    results_log.mkdir(parents=True, exist_ok=True)
    # a run Tiled refused as a key ("a/b"), written by the version that stored runs under raw ids
    start = {"t": "start", "run_id": "a/b", "run_name": "a/b", "started_at": time.time(), "metadata": {}}
    _write_log(results_log / ("x" + b"a/b".hex() + ".wal"), start, _legacy_point("a/b", 0))
    # an id that would have written into another run's node
    _write_log(
        results_log / ("x" + b"victim%2Fprimary".hex() + ".wal"), {**start, "run_id": "victim%2Fprimary"}
    )
    # bytes that are no log at all, and records that are not maps
    (results_log / "garbage.wal").write_bytes(b"\xc1" * 64)
    _write_log(results_log / "not-maps.wal", [1, 2, 3], "text")
    # a point record without its fields
    _write_log(results_log / "short.wal", {"t": "point", "run_id": "short", "row": 0})
    return sorted(p.name for p in results_log.glob("*.wal"))


async def test_a_writer_restarted_on_logs_it_cannot_replay_sets_them_aside_and_writes(
    tiled_server: EmbeddedTiledServer, tmp_path: Path
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    left = leave_logs_of_failed_runs(tmp_path / "results-log")
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path) as writer:  # before: start() raised
        assert writer.connected
        assert writer.stats().logs_set_aside == len(left)
        key = run_key("after")
        await writer.publish(RunStarted("after", "after", time.time(), run_key=key))
        point, image = make_point(ep.url, key, 0, np.random.default_rng(1))
        await publish_stored(writer, point, image)
        await writer.publish(RunStopped("after", time.time(), 1, 1, run_key=key))
        assert await writer.flush(timeout=60)
    assert await _fetch(tiled_server, point.tiled_url) == image.tobytes()
    assert sorted(p.name for p in (tmp_path / "results-log" / SET_ASIDE_DIR).iterdir()) == left
    assert not list((tmp_path / "results-log").glob("*.wal"))

    # and the next start finds nothing left to trip over
    async with TiledWriter(ep.url, ep.api_key, data_dir=tmp_path) as again:
        assert again.stats().logs_set_aside == 0
