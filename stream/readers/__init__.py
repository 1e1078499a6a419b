"""Recorded scans as frame sources: what `replay` sends and `adapt` fits on.

`open_source(SOURCE)` takes:
- a directory of TIFF (multi-page too) / CBF / EDF frames, sorted by name, or one such file;
- an HDF5 / NeXus file (`dataset`, default /entry/data/data), one frame per leading index; an EIGER master
  file whose frames sit in `/entry/data/data_NNNNNN` external links is read across its data files, and
  bitshuffle-LZ4 / LZ4 chunks decode through hdf5plugin;
- a .npy stack (N, H, W);
- a Tiled URI of a frame stack (`http://HOST:PORT/api/v1/array/full/<path>` or `/api/v1/metadata/<path>`).

Every frame knows where it came from (`FrameSource.origin(i)`: the file or URI, the dataset, the index in
it), so `open_source(origin.source, dataset=origin.dataset).read(origin.index)` reads it again.
"""

from __future__ import annotations

from pathlib import Path

from stream.readers.files import FRAME_SUFFIXES, directory_source, frame_file_source
from stream.readers.hdf5 import DEFAULT_DATASET, HDF5_SUFFIXES, hdf5_source
from stream.readers.source import FrameOrigin, FrameSource, RecordedFrame, ReplayError, npy_source
from stream.readers.tiled import tiled_source

__all__ = [
    "DEFAULT_DATASET",
    "FRAME_SUFFIXES",
    "FrameOrigin",
    "FrameSource",
    "RecordedFrame",
    "ReplayError",
    "open_source",
    "read_origin",
]


def open_source(source: str, *, dataset: str = DEFAULT_DATASET, api_key: str | None = None) -> FrameSource:
    """Open any supported recorded scan (see module doc)."""
    if source.startswith(("http://", "https://")):
        return tiled_source(source, api_key)
    path = Path(source)
    if path.is_dir():
        return directory_source(path)
    if not path.exists():
        raise ReplayError(f"{source}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return npy_source(path)
    if suffix in HDF5_SUFFIXES:
        return hdf5_source(path, dataset)
    if suffix in FRAME_SUFFIXES:
        return frame_file_source(path)
    raise ReplayError(f"{source}: not a frame directory or file, HDF5/NeXus file, .npy stack or Tiled URI")


def read_origin(origin: FrameOrigin, *, api_key: str | None = None) -> RecordedFrame:
    """Read one frame again from where it was recorded."""
    src = open_source(origin.source, dataset=origin.dataset or DEFAULT_DATASET, api_key=api_key)
    try:
        if not 0 <= origin.index < src.count:
            raise ReplayError(f"{origin.source}: frame {origin.index} out of range (0..{src.count - 1})")
        return src.read(origin.index)
    finally:
        if src.close is not None:
            src.close()
