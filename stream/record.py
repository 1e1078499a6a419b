"""``latent-stream record OUTPUT``: save a synthetic scan to disk, so replay has something real-shaped.

Formats (by OUTPUT): a directory -> one TIFF per frame (`frame_00000.tif`...) + `timestamps.npy`;
`*.h5` / `*.nxs` -> NeXus-style HDF5, frames at /entry/data/data (N, H, W) with
/entry/data/timestamps beside them; `*.npy` -> an (N, H, W) stack + `<stem>.timestamps.npy`.
Timestamps are seconds since the scan started (the synthetic frame period).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from stream.detector import PILATUS3_2M, Detector

log = logging.getLogger(__name__)

# A small detector of the same modular kind, for tests and quick rehearsals.
SMALL_DETECTOR = Detector(name="small test detector", module_shape=(20, 30), modules=(2, 2), gaps=(3, 2))
DETECTORS = {"pilatus": PILATUS3_2M, "small": SMALL_DETECTOR}

Format = Literal["tiff", "hdf5", "npy"]


def format_of(output: Path) -> Format:
    suffix = output.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".h5", ".hdf5", ".nxs"):
        return "hdf5"
    if suffix:
        raise ValueError(f"{output}: give a directory (TIFF), a .h5/.nxs file or a .npy file")
    return "tiff"


def write_scan(output: Path, frames: Iterable[tuple[np.ndarray, float]], count: int) -> Format:
    """Write (image, t) pairs to `output` in the format its name says; returns the format."""
    fmt = format_of(output)
    times = np.zeros(count, dtype=np.float64)
    if fmt == "tiff":
        import tifffile

        output.mkdir(parents=True, exist_ok=True)
        n = 0
        for n, (image, t) in enumerate(frames):
            tifffile.imwrite(output / f"frame_{n:05d}.tif", image)
            times[n] = t
        np.save(output / "timestamps.npy", times[: n + 1] if count else times)
    elif fmt == "npy":
        output.parent.mkdir(parents=True, exist_ok=True)
        stack = None
        for n, (image, t) in enumerate(frames):
            if stack is None:
                stack = np.lib.format.open_memmap(
                    output, mode="w+", dtype=image.dtype, shape=(count, *image.shape)
                )
            stack[n] = image
            times[n] = t
        if stack is not None:
            stack.flush()
            del stack
        np.save(output.with_name(output.stem + ".timestamps.npy"), times)
    else:
        import h5py

        output.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(output, "w") as f:
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            dset = None
            for n, (image, t) in enumerate(frames):
                if dset is None:
                    dset = data.create_dataset("data", shape=(count, *image.shape), dtype=image.dtype,
                                               chunks=(1, *image.shape))  # fmt: skip
                dset[n] = image
                times[n] = t
            ts = data.create_dataset("timestamps", data=times)
            ts.attrs["units"] = "s"
    return fmt


def record(
    output: Annotated[
        Path, typer.Argument(help="A directory (TIFF frames), a .h5/.nxs file or a .npy file.")
    ],
    frames: Annotated[int, typer.Option(min=1, help="Frames in the scan.")] = 50,
    scenario: Annotated[
        str, typer.Option(help="Synthetic scenario (stream.synthetic.SCENARIOS).")
    ] = "film_formation",
    seed: Annotated[int, typer.Option(help="Random seed of the scan.")] = 0,
    period: Annotated[float, typer.Option(help="Seconds between frames (the recorded timestamps).")] = 0.1,
    detector: Annotated[str, typer.Option(help="pilatus (1679 x 1475) or small (43 x 62).")] = "pilatus",
) -> None:
    """Save a synthetic scan to disk with per-frame timestamps, for `latent-stream replay`."""
    from stream.synthetic import generate_scan

    if detector not in DETECTORS:
        raise typer.BadParameter(f"detector must be one of {sorted(DETECTORS)}")
    try:
        format_of(output)
        scan = generate_scan(scenario, frames, seed=seed, detector=DETECTORS[detector], frame_period_s=period)
        fmt = write_scan(output, ((f.image, f.t) for f in scan), frames)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"recorded {frames} {scenario} frame(s) to {output} ({fmt})")
