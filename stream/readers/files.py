"""Frame files: TIFF (multi-page too), CBF and EDF, one file or a directory of them sorted by name.

A PILATUS header (CBF `_array_data.header_contents`, a TIFF's ImageDescription) is kept as per-frame metadata:
`exposure_time` and `exposure_period` (s), and `timestamp` (epoch seconds, from the header's ISO date line,
read as UTC since the header names no zone).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import numpy as np

from stream.readers.source import FrameOrigin, FrameSource, RecordedFrame, ReplayError, optional_timestamps

FRAME_SUFFIXES = (".tif", ".tiff", ".cbf", ".edf")
TIFF_SUFFIXES = (".tif", ".tiff")

_DATE = re.compile(r"^#\s*(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?)\s*$")
_SECONDS = re.compile(r"^#\s*(Exposure_time|Exposure_period)\s+([-+0-9.eE]+)\s*s\b")


def pilatus_header_metadata(text: str) -> dict[str, Any]:
    """exposure_time / exposure_period / timestamp from a PILATUS mini-header; {} when it has none."""
    out: dict[str, Any] = {}
    for line in text.replace("\r", "\n").split("\n"):
        line = line.strip()
        if m := _SECONDS.match(line):
            out[m.group(1).lower()] = float(m.group(2))
        elif m := _DATE.match(line):
            when = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
            out["timestamp"] = when.timestamp()
    return out


def _tiff_pages(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as t:
        return len(t.pages)


def _read_tiff(path: Path, page: int) -> RecordedFrame:
    import tifffile

    with tifffile.TiffFile(path) as t:
        p = t.pages[page]
        image = p.asarray()
        description = str(getattr(p, "description", "") or "")
    return RecordedFrame(page, np.ascontiguousarray(image), metadata=pilatus_header_metadata(description))


def _read_fabio(path: Path) -> RecordedFrame:
    import fabio

    with fabio.open(str(path)) as img:
        image = np.ascontiguousarray(img.data)
        header = dict(img.header)
    md = pilatus_header_metadata(str(header.get("_array_data.header_contents", "")))
    if "ExposureTime" in header and "exposure_time" not in md:  # EDF convention (ESRF)
        try:
            md["exposure_time"] = float(str(header["ExposureTime"]).split()[0])
        except ValueError:
            pass
    return RecordedFrame(0, image, metadata=md)


def _file_frames(path: Path) -> list[tuple[Path, int]]:
    """(file, index in file) for each frame of one file: every page of a TIFF, one frame otherwise."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return [(path, page) for page in range(_tiff_pages(path))]
    return [(path, 0)]


def _frames_source(name: str, kind: str, frames: list[tuple[Path, int]], ts: np.ndarray | None,
                   source: Path) -> FrameSource:  # fmt: skip
    def read(i: int) -> RecordedFrame:
        f, page = frames[i]
        try:
            rf = _read_tiff(f, page) if f.suffix.lower() in TIFF_SUFFIXES else _read_fabio(f)
        except (OSError, ValueError, IndexError) as exc:
            raise ReplayError(f"{f}: unreadable frame {page} ({exc})") from exc
        rf.index = i
        return rf

    def origin(i: int) -> FrameOrigin:
        f, page = frames[i]
        return FrameOrigin(str(f), page)

    return FrameSource(name, kind, len(frames), ts, read, {"source": str(source)}, origin=origin)


def directory_source(path: Path) -> FrameSource:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ReplayError(f"{path}: no {'/'.join(FRAME_SUFFIXES)} frames")
    frames = [frame for f in files for frame in _file_frames(f)]
    ts = optional_timestamps(path / "timestamps.npy", len(frames))
    return _frames_source(path.name, "directory", frames, ts, path)


def frame_file_source(path: Path) -> FrameSource:
    frames = _file_frames(path)
    ts = optional_timestamps(path.with_name(path.stem + ".timestamps.npy"), len(frames))
    return _frames_source(path.stem, "file", frames, ts, path)
