"""Detector files as beamlines write them, read from real frames (tests/data/bioxtasraw, GPL-3, see its README)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq
import zmq.asyncio
from adapt_support import CBF_SCAN, EIGER2_VAC, EIGER_SCAN, REAL_DATA

from stream.protocol import Event, Start, Stop, decode
from stream.readers import ReplayError, open_source, read_origin
from stream.replay import replay_source


def _frames(source: str | Path) -> np.ndarray:
    src = open_source(str(source))
    try:
        return np.stack([f.image for f in src])
    finally:
        if src.close is not None:
            src.close()


def test_an_eiger2_file_with_bitshuffle_lz4_chunks_reads_as_recorded() -> None:
    src = open_source(str(EIGER2_VAC))
    frames = [src.read(i) for i in range(src.count)]
    src.close()
    assert src.count == 2 and frames[0].image.shape == (256, 256) and frames[0].image.dtype == np.uint32
    gaps = frames[0].image == np.iinfo(np.uint32).max  # EIGER2 marks module gaps with 2**32 - 1
    assert 0 < gaps.mean() < 0.5 and frames[0].image[~gaps].max() > 0
    assert frames[1].metadata == {"exposure_time": 0.5}  # /entry/instrument/detector/count_time


def test_a_nexus_master_reads_its_frames_through_the_external_link() -> None:
    with h5py.File(EIGER_SCAN) as f:
        assert isinstance(f["entry/data"].get("data_000001", getlink=True), h5py.ExternalLink)
    through_master = _frames(EIGER_SCAN)
    direct = _frames(REAL_DATA / "calibrant_scan_data_000001.h5")
    assert through_master.shape == (24, 224, 224)
    np.testing.assert_array_equal(through_master, direct)


def test_a_master_whose_data_file_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "lonely_master.h5").write_bytes(EIGER_SCAN.read_bytes())
    with pytest.raises(ReplayError, match="links to a data file that is missing"):
        open_source(str(tmp_path / "lonely_master.h5"))


def test_cbf_headers_keep_exposure_time_and_timestamps_as_metadata() -> None:
    src = open_source(str(CBF_SCAN))
    first, second = src.read(0), src.read(1)
    assert first.metadata["exposure_time"] == 999.0 and first.metadata["exposure_period"] == 1032.3
    assert second.metadata["timestamp"] - first.metadata["timestamp"] == 1.0
    assert first.image.dtype == np.int32 and (first.image < 0).any()  # PILATUS gap pixels (-1) survive


def test_cbf_hdf5_and_multipage_tiff_copies_of_a_scan_read_identically() -> None:
    cbf = _frames(CBF_SCAN)
    # the EIGER-style copy is uint32 like an EIGER's, so PILATUS gap pixels (-1, -2) wrap as EIGER marks them
    np.testing.assert_array_equal(cbf.astype(np.uint32), _frames(EIGER_SCAN))
    np.testing.assert_array_equal(cbf[::3], _frames(REAL_DATA / "calibrant_scan_multiframe.tif"))


def test_every_frame_can_be_read_again_from_its_origin() -> None:
    for source in (CBF_SCAN, EIGER_SCAN, REAL_DATA / "calibrant_scan_multiframe.tif"):
        src = open_source(str(source))
        origin = src.origin_of(5)
        np.testing.assert_array_equal(read_origin(origin).image, src.read(5).image)
        if src.close is not None:
            src.close()


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


async def test_replaying_real_cbf_frames_sends_every_frame_with_its_header_metadata(tmp_path: Path) -> None:
    address = _free_address()
    src = open_source(str(CBF_SCAN))
    sender = asyncio.create_task(replay_source(src, address, rate=0, run_id="cbf", report_dir=tmp_path,
                                               progress=False))  # fmt: skip
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    events: list[Event] = []
    try:
        async with asyncio.timeout(60):
            while True:
                msg = decode(await sock.recv())
                if isinstance(msg, Event):
                    events.append(msg)
                elif isinstance(msg, Stop):
                    break
                else:
                    assert isinstance(msg, Start)
        await sender
    finally:
        sock.close(0)
        ctx.term()
    assert [e.frame_number for e in events] == list(range(24))
    np.testing.assert_array_equal(events[3].image, src.read(3).image)
    assert events[3].metadata["exposure_time"] == 999.0 and "timestamp" in events[3].metadata
