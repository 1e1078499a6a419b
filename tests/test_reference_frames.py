"""What the live page may show behind a grey point: only the frames the bundle recorded, within frame bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from adapt_support import CBF_SCAN, EIGER_SCAN

from stream.readers import open_source
from stream.reference_frames import ReferenceFrames

ORIGINS = [
    {"source": str(CBF_SCAN / "calibrant_00003.cbf"), "index": 0, "dataset": ""},
    {"source": str(EIGER_SCAN), "index": 7, "dataset": "/entry/data/data"},
]


def test_a_reference_frame_is_read_from_its_recorded_origin() -> None:
    frames = ReferenceFrames(ORIGINS, max_pixels=4096 * 4096)
    np.testing.assert_array_equal(frames.read(0), open_source(str(CBF_SCAN)).read(2).image)
    np.testing.assert_array_equal(frames.read(1), open_source(str(EIGER_SCAN)).read(7).image)


@pytest.mark.parametrize("index", [2, -1])
def test_an_index_outside_the_reference_is_an_index_error(index: int) -> None:
    with pytest.raises(IndexError):
        ReferenceFrames(ORIGINS, max_pixels=4096 * 4096).read(index)


def test_a_frame_over_the_pixel_bound_or_gone_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="not a frame within bounds"):
        ReferenceFrames(ORIGINS, max_pixels=100).read(0)
    gone = [{"source": str(tmp_path / "moved.cbf"), "index": 0, "dataset": ""}]
    with pytest.raises(LookupError, match="no such file"):
        ReferenceFrames(gone, max_pixels=4096 * 4096).read(0)
