"""Rebuild this directory's test files from the two original BioXTAS RAW test files (see README.md).

    python tests/data/bioxtasraw/make_subset.py SAXSLAB_TIFF VAC_007_H5

Every pixel here is a pixel the detectors recorded; only cropping, re-packing and the order differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import tifffile
from fabio.cbfimage import CbfImage

HERE = Path(__file__).resolve().parent
WINDOW = 224  # px: a square window of the calibrant image
STEPS = 24  # frames of the sliding-window scan
BEAM = (358, 267)  # the direct beam's (row, column) in saxslab_image.tiff
TRAVEL = 96  # px the window travels along each axis
CADENCE_S = 1.0


def scan_windows(image: np.ndarray) -> np.ndarray:
    """A slow detector-translation scan: the beam starts at the window's centre and drifts to near its top-left
    corner in 24 equal diagonal steps (4 px each way), so no two frames mirror each other."""
    half = WINDOW // 2
    shifts = np.linspace(0, TRAVEL, STEPS).round().astype(int)
    return np.stack([image[BEAM[0] - half + s : BEAM[0] + half + s, BEAM[1] - half + s : BEAM[1] + half + s]
                     for s in shifts])


def write_cbf_directory(frames: np.ndarray, header: str, out: Path) -> None:
    out.mkdir(exist_ok=True)
    for i, frame in enumerate(frames):
        stamp = f"# 2015-10-22T12:{i // 60:02d}:{i % 60:02d}.000\r\n"  # PILATUS header date line
        body = stamp + header.replace("\n", "\r\n")
        CbfImage(data=frame.astype(np.int32), header={"_array_data.header_contents": body}).write(
            str(out / f"calibrant_{i + 1:05d}.cbf")
        )


def write_eiger(frames: np.ndarray, out: Path, prefix: str, count_time: float) -> None:
    """An EIGER-style pair: `<prefix>_data_000001.h5` (bitshuffle-LZ4 chunks) and a NeXus master linking it."""
    data_name = f"{prefix}_data_000001.h5"
    with h5py.File(out / data_name, "w") as f:
        d = f.create_dataset("entry/data/data", data=frames, chunks=(1, *frames.shape[1:]),
                             **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        d.attrs["image_nr_low"] = np.int32(1)
        d.attrs["image_nr_high"] = np.int32(len(frames))
        f["entry"].attrs["NX_class"] = "NXentry"
        f["entry/data"].attrs["NX_class"] = "NXdata"
    with h5py.File(out / f"{prefix}_master.h5", "w") as m:
        entry = m.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data["data_000001"] = h5py.ExternalLink(data_name, "/entry/data/data")
        det = entry.create_group("instrument/detector")
        det.attrs["NX_class"] = "NXdetector"
        det["count_time"] = count_time
        det["frame_time"] = CADENCE_S


def main(saxslab_tiff: str, vac_h5: str) -> None:
    with tifffile.TiffFile(saxslab_tiff) as t:
        image = t.pages[0].asarray()
        header = str(t.pages[0].description)
    frames = scan_windows(image)
    write_cbf_directory(frames, header, HERE / "calibrant_scan_cbf")
    write_eiger(frames.astype(np.uint32), HERE, "calibrant_scan", 999.0)
    tifffile.imwrite(HERE / "calibrant_scan_multiframe.tif", frames[::3].astype(np.int32),
                     description=header, compression="zlib")
    with h5py.File(vac_h5, "r") as f:  # the real EIGER2 9M frames: a 256 x 256 corner across a module gap
        raw = f["entry/data/data"][:, 500:756, 980:1236]
    write_eiger(raw, HERE, "vac_007", 0.5)


if __name__ == "__main__":
    main(*sys.argv[1:3])
