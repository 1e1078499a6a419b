"""HDF5 / NeXus frame stacks, as detectors write them.

- Any (N, H, W) dataset (`dataset`, default /entry/data/data).
- An EIGER / EIGER2 master file: when `dataset` is the default and absent, the frames are the datasets
  `/entry/data/data_000001`, `data_000002`, ... (external links into the data files), read in that order.
- Compressed chunks (bitshuffle-LZ4, LZ4, ...) decode through hdf5plugin, imported before the file opens.
- `timestamps` beside the frames (what `latent-stream record` writes) is the recorded cadence;
  `/entry/instrument/detector/count_time` becomes each frame's `exposure_time`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from stream.readers.source import FrameOrigin, FrameSource, RecordedFrame, ReplayError

DEFAULT_DATASET = "/entry/data/data"
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5", ".hdf")
_EIGER_PART = re.compile(r"^data_\d{6}$")


def _eiger_parts(f: Any) -> list[Any]:
    group = f.get("/entry/data")
    if group is None:
        return []
    names = sorted(n for n in group if _EIGER_PART.match(n))
    parts = []
    for n in names:
        try:
            parts.append(group[n])  # an external link resolves here; a missing data file raises KeyError
        except KeyError as exc:
            raise ReplayError(
                f"{f.filename}: /entry/data/{n} links to a data file that is missing ({exc})"
            ) from None
    return parts


def _exposure(f: Any) -> dict[str, Any]:
    node = f.get("/entry/instrument/detector/count_time")
    if node is None or node.shape not in ((), (1,)):
        return {}
    return {"exposure_time": float(np.asarray(node[()]).reshape(-1)[0])}


def hdf5_source(path: Path, dataset: str) -> FrameSource:
    import h5py
    import hdf5plugin  # noqa: F401 - registers the bitshuffle / LZ4 filters EIGER files are compressed with

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ReplayError(f"{path}: not a readable HDF5 file ({exc})") from None
    if dataset in f:
        parts = [f[dataset]]
    elif dataset == DEFAULT_DATASET and (parts := _eiger_parts(f)):
        pass
    else:
        f.close()
        raise ReplayError(f"{path}: no dataset {dataset} (give --dataset)")
    for d in parts:
        if d.ndim != 3:
            f.close()
            raise ReplayError(f"{path}:{d.name}: expected (N, H, W), got shape {d.shape}")
    starts = np.cumsum([0] + [len(d) for d in parts])
    count = int(starts[-1])
    ts = None
    parent = parts[0].parent
    if len(parts) == 1 and "timestamps" in parent and len(parent["timestamps"]) == count:
        ts = np.asarray(parent["timestamps"], dtype=np.float64)
    frame_md = _exposure(f)

    def read(i: int) -> RecordedFrame:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        try:
            image = parts[k][i - starts[k]]
        except OSError as exc:  # a filter that is not available, a truncated chunk
            raise ReplayError(f"{path}: frame {i} unreadable ({exc})") from exc
        return RecordedFrame(i, np.ascontiguousarray(image), metadata=dict(frame_md))

    return FrameSource(
        path.stem, "hdf5", count, ts, read, {"source": str(path), "dataset": dataset}, close=f.close,
        origin=lambda i: FrameOrigin(str(path), i, dataset),
    )  # fmt: skip
