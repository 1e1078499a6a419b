"""Recorded scans replay over ZeroMQ, every frame in order, from each supported source (issue 4)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from stream.protocol import Event, Start, Stop, decode
from stream.record import SMALL_DETECTOR, write_scan
from stream.replay import ReplayError, open_source, replay_source

N_FRAMES = 6


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic scan: frames (N, H, W) int32 and their recorded times (s)."""
    from stream.synthetic import generate_scan

    frames = list(
        generate_scan("film_formation", N_FRAMES, seed=3, detector=SMALL_DETECTOR, frame_period_s=0.05)
    )
    return np.stack([f.image for f in frames]), np.array([f.t for f in frames])


def _free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


async def _receive_run(address: str, sender: asyncio.Task, timeout: float = 60.0) -> list:
    """Connect a real PULL socket and collect start, events, stop of one run."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    got = []
    try:
        while True:
            msg = decode(await asyncio.wait_for(sock.recv(), timeout))
            got.append(msg)
            if isinstance(msg, Stop):
                break
        await asyncio.wait_for(sender, timeout)
    finally:
        sock.close(linger=0)
        ctx.term()
    return got


def _assert_every_frame_in_order(got: list, frames: np.ndarray) -> list[Event]:
    assert isinstance(got[0], Start) and isinstance(got[-1], Stop)
    events = got[1:-1]
    assert all(isinstance(e, Event) for e in events)
    assert [e.frame_number for e in events] == list(range(len(frames)))
    for e, frame in zip(events, frames, strict=True):
        np.testing.assert_array_equal(e.image, frame)
    assert got[-1].num_frames == len(frames)
    return events


def _write_cbf_edf(directory: Path, frames: np.ndarray, kind: str) -> None:
    import fabio.cbfimage
    import fabio.edfimage

    directory.mkdir()
    for i, frame in enumerate(frames):
        cls = fabio.cbfimage.CbfImage if kind == "cbf" else fabio.edfimage.EdfImage
        cls(data=frame).write(str(directory / f"img_{i:04d}.{kind}"))


@pytest.mark.parametrize("kind", ["tiff", "cbf", "edf", "hdf5", "npy"])
async def test_replay_delivers_every_frame_of_a_recorded_scan_in_order(kind, scan, tmp_path) -> None:
    frames, times = scan
    if kind == "tiff":
        source = tmp_path / "tiffs"
        write_scan(source, zip(frames, times), len(frames))
    elif kind in ("cbf", "edf"):
        source = tmp_path / kind
        _write_cbf_edf(source, frames, kind)
    else:
        source = tmp_path / ("scan.nxs" if kind == "hdf5" else "scan.npy")
        write_scan(source, zip(frames, times), len(frames))
    src = open_source(str(source))
    assert src.count == N_FRAMES
    address = _free_address()
    reports_dir = tmp_path / "reports"
    sender = asyncio.create_task(
        replay_source(src, address, rate=0, run_id=f"run-{kind}", report_dir=reports_dir, progress=False)
    )
    got = await _receive_run(address, sender)
    if src.close:
        src.close()
    events = _assert_every_frame_in_order(got, frames)
    assert got[0].run_id == f"run-{kind}"
    assert all(e.tiled_url == "" for e in events)  # files: the service stores the frames
    report = json.loads((reports_dir / f"run-{kind}.json").read_text())
    assert report["sent"] == N_FRAMES and report["first_index"] == 0 and report["last_index"] == N_FRAMES - 1


async def test_recorded_timestamps_set_the_cadence_at_the_given_speed(scan, tmp_path) -> None:
    frames, times = scan
    source = tmp_path / "scan.npy"
    write_scan(source, zip(frames, times), len(frames))
    src = open_source(str(source))
    np.testing.assert_allclose(src.timestamps, times)
    address = _free_address()
    t0 = time.monotonic()
    # recorded period 0.05 s at speed 0.5 -> 0.1 s between frames: at least 0.5 s for 6 frames
    sender = asyncio.create_task(
        replay_source(src, address, speed=0.5, run_id="paced", report_dir=tmp_path, progress=False)
    )
    got = await _receive_run(address, sender)
    _assert_every_frame_in_order(got, frames)
    assert time.monotonic() - t0 >= 0.1 * (N_FRAMES - 1)


async def test_loop_replays_the_scan_as_consecutive_runs(scan, tmp_path) -> None:
    frames, times = scan
    source = tmp_path / "scan.npy"
    write_scan(source, zip(frames, times), len(frames))
    src = open_source(str(source))
    address = _free_address()
    sender = asyncio.create_task(
        replay_source(src, address, rate=0, loops=2, run_id="soak", report_dir=tmp_path, progress=False)
    )
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    runs: list[list] = []
    try:
        while len(runs) < 2 or not isinstance(runs[-1][-1], Stop):
            msg = decode(await asyncio.wait_for(sock.recv(), 30))
            if isinstance(msg, Start):
                runs.append([])
            runs[-1].append(msg)
        reports = await asyncio.wait_for(sender, 30)
    finally:
        sock.close(linger=0)
        ctx.term()
    assert [r.run_id for r in reports] == ["soak-1", "soak-2"]
    assert [run[0].run_id for run in runs] == ["soak-1", "soak-2"]
    for run in runs:
        _assert_every_frame_in_order(run, frames)


def test_speed_without_recorded_timestamps_is_a_clear_error(scan, tmp_path) -> None:
    from stream.replay import replay

    frames, _ = scan
    np.save(tmp_path / "bare.npy", frames)
    app_runner = CliRunner()
    import typer

    app = typer.Typer()
    app.command()(replay)
    result = app_runner.invoke(app, [str(tmp_path / "bare.npy"), "--speed", "2"])
    assert result.exit_code != 0
    assert "no recorded timestamps" in result.output
    with pytest.raises(ReplayError, match="no such file"):
        open_source(str(tmp_path / "missing.h5"))
    with pytest.raises(ReplayError, match="no dataset"):
        write_scan(tmp_path / "s.h5", zip(frames, np.arange(len(frames))), len(frames))
        open_source(str(tmp_path / "s.h5"), dataset="/entry/other")
