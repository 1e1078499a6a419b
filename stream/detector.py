"""Detector geometry: pixel grid, modules and the inter-module gaps.

A modular hybrid-pixel detector is a grid of identical modules separated by insensitive gaps.
`Detector` describes any such grid; `PILATUS3_2M` is the paper's detector (ALS 7.3.3):
24 modules of 487 x 195 px (W x H) in 3 columns x 8 rows, 7 px gaps between module columns
and 17 px gaps between module rows, 172 um pixels, so 3*487 + 2*7 = 1475 px wide and
8*195 + 7*17 = 1679 px high.

This module imports nothing from the project (bottom of the import graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PILATUS3_2M", "Detector"]


@dataclass(frozen=True)
class Detector:
    """A rectangular grid of identical detector modules with insensitive gaps between them.

    Sizes are in pixels, (height, width) order like numpy arrays: a frame is `shape` = (H, W),
    row 0 at the top.
    """

    name: str
    module_shape: tuple[int, int]  # (height, width) of one module in pixels
    modules: tuple[int, int]  # (rows, columns) of modules
    gaps: tuple[int, int]  # (between module rows, between module columns) in pixels
    pixel_size_m: float = 172e-6
    dtype: str = "int32"
    # Lazily filled memo for gap_mask(); excluded from eq/hash so the detector stays a value.
    _cache: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        (mh, mw), (nr, nc), (gr, gc) = self.module_shape, self.modules, self.gaps
        if min(mh, mw, nr, nc) < 1:
            raise ValueError(f"{self.name}: module shape and module counts must be >= 1")
        if min(gr, gc) < 0:
            raise ValueError(f"{self.name}: gaps must be >= 0, got {self.gaps}")
        if self.pixel_size_m <= 0:
            raise ValueError(f"{self.name}: pixel size must be > 0, got {self.pixel_size_m}")

    @property
    def height(self) -> int:
        mh, (nr, _), (gr, _) = self.module_shape[0], self.modules, self.gaps
        return nr * mh + (nr - 1) * gr

    @property
    def width(self) -> int:
        mw, (_, nc), (_, gc) = self.module_shape[1], self.modules, self.gaps
        return nc * mw + (nc - 1) * gc

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of a full frame in pixels."""
        return (self.height, self.width)

    @property
    def size_m(self) -> tuple[float, float]:
        """(height, width) of the sensitive area's bounding box in metres."""
        return (self.height * self.pixel_size_m, self.width * self.pixel_size_m)

    def module_origins(self) -> list[tuple[int, int]]:
        """(row, column) of the top-left pixel of every module, row-major."""
        (mh, mw), (nr, nc), (gr, gc) = self.module_shape, self.modules, self.gaps
        return [(r * (mh + gr), c * (mw + gc)) for r in range(nr) for c in range(nc)]

    def gap_rows(self) -> np.ndarray:
        """Indices of the pixel rows that lie entirely in a horizontal gap (between module rows)."""
        mh, nr, gr = self.module_shape[0], self.modules[0], self.gaps[0]
        return np.array([r * (mh + gr) + mh + k for r in range(nr - 1) for k in range(gr)], dtype=np.intp)

    def gap_columns(self) -> np.ndarray:
        """Indices of the pixel columns that lie entirely in a vertical gap (between module columns)."""
        mw, nc, gc = self.module_shape[1], self.modules[1], self.gaps[1]
        return np.array([c * (mw + gc) + mw + k for c in range(nc - 1) for k in range(gc)], dtype=np.intp)

    def gap_mask(self) -> np.ndarray:
        """Boolean (H, W) mask, True on insensitive gap pixels. Computed once, returned read-only."""
        mask = self._cache.get("gap_mask")
        if mask is None:
            mask = np.zeros(self.shape, dtype=bool)
            mask[self.gap_rows(), :] = True
            mask[:, self.gap_columns()] = True
            mask.flags.writeable = False  # shared between callers: nobody may edit it
            self._cache["gap_mask"] = mask
        return mask


PILATUS3_2M = Detector(
    name="PILATUS3 2M",
    module_shape=(195, 487),
    modules=(8, 3),
    gaps=(17, 7),
    pixel_size_m=172e-6,
)
