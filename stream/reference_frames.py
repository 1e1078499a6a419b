"""Reference frames for the live page: reference point i's frame, read again from where the bundle recorded it.

The bridge's GET /api/reference/frame/{i} calls `ReferenceFrames.read(i)`; only the (source, index, dataset)
entries of the bundle's checksummed `reference_sources` are ever opened, so a client cannot name a path.
"""

from __future__ import annotations

import logging

import numpy as np

from stream.readers import FrameOrigin, ReplayError, read_origin

log = logging.getLogger(__name__)


class ReferenceFrames:
    """read(i) -> the raw frame of reference point i (IndexError: no such point; LookupError: unreadable)."""

    def __init__(self, origins: list[dict], *, max_pixels: int, api_key: str | None = None) -> None:
        self._origins = [FrameOrigin.from_dict(o) for o in origins]
        self._max_pixels = max_pixels
        self._api_key = api_key  # for origins on a Tiled server (serve's reference_api_key)

    def __len__(self) -> int:
        return len(self._origins)

    def read(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self._origins):
            raise IndexError(i)
        origin = self._origins[i]
        try:
            image = read_origin(origin, api_key=self._api_key).image
        except (ReplayError, OSError) as exc:
            raise LookupError(f"{origin.source}[{origin.index}]: {exc}") from exc
        if image.ndim != 2 or image.size > self._max_pixels:
            raise LookupError(
                f"{origin.source}[{origin.index}]: shape {image.shape} is not a frame within bounds"
            )
        return image


def reference_frames_of(bundle: object, *, max_pixels: int, api_key: str | None = None) -> ReferenceFrames | None:
    """The bundle's reference frames, or None when it does not record where they came from."""
    origins = getattr(bundle, "reference_sources", None)
    if not origins:
        return None
    log.info("reference frames: %d recorded sources in the bundle", len(origins))
    return ReferenceFrames(origins, max_pixels=max_pixels, api_key=api_key)
