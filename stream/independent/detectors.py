"""Detector geometries the training generator never renders: a PILATUS 1M and an EIGER2 X 4M.

Described here on their own (not with `stream.detector`) so that nothing about the family depends on the
project's detector model. What the preprocessor needs is only the frame itself: gap and bad pixels carry the
value the detector writes there, which it masks without knowing the geometry (a negative count for a PILATUS,
2**32 - 1 for an EIGER2, above any saturation limit).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DETECTORS", "EIGER2_4M", "PILATUS_1M", "DetectorGeometry"]


@dataclass(frozen=True)
class DetectorGeometry:
    """A grid of identical modules with insensitive gaps; sizes in pixels, (rows, columns) order."""

    name: str
    module_px: tuple[int, int]  # (height, width) of one module
    modules: tuple[int, int]  # (rows, columns) of modules
    gaps_px: tuple[int, int]  # (between module rows, between module columns)
    pixel_m: float
    dtype: str
    gap_value: int  # what the detector writes into gap pixels
    bad_value: int  # ... and into its bad (dead, noisy) pixels
    max_count: int  # counter limit
    bad_fraction: float = 2e-4
    _cache: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        (mh, mw), (nr, nc), (gr, gc) = self.module_px, self.modules, self.gaps_px
        return (nr * mh + (nr - 1) * gr, nc * mw + (nc - 1) * gc)

    def module_index(self) -> np.ndarray:
        """(H, W) int16: the module each pixel belongs to, -1 in the gaps."""
        (mh, mw), (gr, gc) = self.module_px, self.gaps_px
        h, w = self.shape
        rows, cols = np.arange(h), np.arange(w)
        mr = np.where(rows % (mh + gr) < mh, rows // (mh + gr), -1)
        mc = np.where(cols % (mw + gc) < mw, cols // (mw + gc), -1)
        idx = mr[:, None] * self.modules[1] + mc[None, :]
        idx[(mr[:, None] < 0) | (mc[None, :] < 0)] = -1
        return idx.astype(np.int16)

    def module_gains(self) -> np.ndarray:
        """float32 gain per module (flat-field differences of +-3 %, fixed per detector), then 1 for gaps."""
        rng = np.random.default_rng(zlib.crc32(self.name.encode()) + 1)
        return np.append(rng.uniform(0.97, 1.03, self.modules[0] * self.modules[1]), 1.0).astype(np.float32)

    def pixel_status(self) -> np.ndarray:
        """(H, W) uint8, read-only: 0 sensitive, 1 gap, 2 bad pixel. Bad pixels are the detector's own, the
        same in every run (seeded by its name)."""
        status = self._cache.get("status")
        if status is None:
            status = np.where(self.module_index() < 0, 1, 0).astype(np.uint8)
            rng = np.random.default_rng(zlib.crc32(self.name.encode()))
            n_bad = int(self.bad_fraction * status.size)
            flat = status.reshape(-1)
            bad = rng.choice(np.flatnonzero(flat == 0), n_bad, replace=False)
            flat[bad] = 2
            status.flags.writeable = False
            self._cache["status"] = status
        return status


# 5 rows x 2 columns of 487 x 195 px (W x H) modules, 7 px between columns, 17 px between rows: 981 x 1043 px
PILATUS_1M = DetectorGeometry(
    name="PILATUS 1M",
    module_px=(195, 487),
    modules=(5, 2),
    gaps_px=(17, 7),
    pixel_m=172e-6,
    dtype="int32",
    gap_value=-1,
    bad_value=-2,
    max_count=2**20 - 1,
)
# 4 rows x 2 columns of 1028 x 512 px (W x H) modules, 12 px between columns, 38 px between rows:
# 2068 x 2162 px
EIGER2_4M = DetectorGeometry(
    name="EIGER2 X 4M",
    module_px=(512, 1028),
    modules=(4, 2),
    gaps_px=(38, 12),
    pixel_m=75e-6,
    dtype="uint32",
    gap_value=2**32 - 1,
    bad_value=2**32 - 1,
    max_count=2**32 - 2,
)
DETECTORS = (PILATUS_1M, EIGER2_4M)
