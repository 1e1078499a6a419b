"""DECTRIS SIMPLON stream v2 messages -> `stream.protocol` ``Start | Event | Stop`` (a `stream.ingest.WireDecoder`).

- ``start`` opens a series: the run id is ``series_unique_id``, the run's metadata every start field but the
  per-pixel tables (``pixel_mask``, ``flatfield``, ``countrate_correction_lookup_table``); the chosen channel's
  ``pixel_mask`` and the ``saturation_value`` are kept for the series' frames.
- ``image``: the chosen channel's frame (default: the first of ``channels``), ``image_id`` its index. Pixels
  whose mask is non-zero or that reach ``saturation_value`` are set to 2**32 - 1 in a uint32 frame, the value an
  EIGER writes into pixels it masks itself, which preprocessing drops like PILATUS gaps (operators/preprocess.py:
  at or above its saturation).
- ``end`` closes the series with ``number_of_images`` of its start as the frames announced.

Bad input raises `ProtocolError` with a reason (the ingest counts it); sizes are checked before anything is
decompressed. One decoder per connection, used from one thread at a time.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.protocol import DEFAULT_LIMITS, Event, Limits, ProtocolError, Start, Stop, WireMessage
from stream.sources.stream2_cbor import Compressed, MultiDimArray, TypedArray, array_values, loads

log = logging.getLogger(__name__)

NODATA = np.uint32(2**32 - 1)  # what a masked pixel reads in a stream v2 frame handed to compute
IMAGE_DTYPES = frozenset({np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4")})  # stream v2's image_dtype values
_PIXEL_TABLES = frozenset({"pixel_mask", "flatfield", "countrate_correction_lookup_table"})
_TIMES = ("start_time", "stop_time", "real_time")  # Rational [numerator, denominator]
# A MultiDimArray nests 3 levels below its key (tag 40 -> [dims, typed array] -> dims).
_ARRAY_DEPTH = 3


@dataclass(frozen=True, slots=True)
class _Series:
    unique_id: str
    channel: str
    shape: tuple[int, int]  # (H, W)
    dtype: np.dtype[Any]
    mask: np.ndarray | None  # bool (H, W), True where the detector's pixel mask says the pixel is bad
    saturation: int | None
    number_of_images: int | None


class Stream2Decoder:
    """Stateful: images are checked against (and masked with) the open series' start."""

    def __init__(self, channel: str | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.channel = channel
        self.limits = limits
        self._series: _Series | None = None

    def decode(self, payload: bytes | memoryview) -> WireMessage:
        limits = self.limits
        if len(payload) > limits.max_message_bytes:
            raise ProtocolError("oversized", f"{len(payload)} bytes exceed {limits.max_message_bytes}")
        doc, other_bytes = loads(payload, max_items=limits.max_metadata_bytes,
                                 max_depth=limits.max_metadata_depth + _ARRAY_DEPTH)  # fmt: skip
        if not isinstance(doc, dict):
            raise ProtocolError("malformed", f"expected a map, got {type(doc).__name__}")
        if other_bytes > limits.max_metadata_bytes:
            raise ProtocolError("oversized_metadata",
                                f"{other_bytes} bytes besides arrays exceed {limits.max_metadata_bytes}")  # fmt: skip
        kind = doc.get("type")
        if kind == "image":
            return self._image(doc)
        if kind == "start":
            return self._start(doc)
        if kind == "end":
            return self._end(doc)
        if kind is None:
            raise ProtocolError("missing_field", "type")
        raise ProtocolError("unknown_msg_type", repr(kind)[:64])

    def _start(self, doc: dict[str, Any]) -> Start:
        unique_id = _required(doc, "series_unique_id", str)
        channels = _required(doc, "channels", list)
        if not channels or not all(isinstance(c, str) for c in channels):
            raise ProtocolError("bad_field", "channels must be a non-empty list of names")
        channel = self.channel or channels[0]
        if channel not in channels:
            raise ProtocolError("bad_field", f"channel {channel!r:.40} is not one of the series' {len(channels)}")
        dtype_name = _required(doc, "image_dtype", str)
        try:
            dtype = np.dtype(dtype_name).newbyteorder("<")
        except TypeError:
            raise ProtocolError("bad_dtype", repr(dtype_name)[:40]) from None
        if dtype not in IMAGE_DTYPES:
            raise ProtocolError("bad_dtype", f"image_dtype {dtype_name!r:.20} is not uint8/16/32")
        shape = (_count(doc, "image_size_y", 1 << 20), _count(doc, "image_size_x", 1 << 20))
        pixels = shape[0] * shape[1]
        # Frames are handed on as uint32: bound their size as that.
        if pixels == 0 or pixels > self.limits.max_pixels or pixels * 4 > self.limits.max_bytes:
            raise ProtocolError("oversized", f"{shape[0]}x{shape[1]} exceeds the configured frame limits")
        number = doc.get("number_of_images")
        if number is not None:
            number = _count(doc, "number_of_images", self.limits.max_frame_number + 1)
        saturation = doc.get("saturation_value")
        if saturation is not None and (type(saturation) is not int or saturation < 0):
            raise ProtocolError("bad_field", "saturation_value must be a non-negative integer")
        mask = self._pixel_mask(doc.get("pixel_mask"), channel, shape)
        self._series = _Series(unique_id, channel, shape, dtype, mask, saturation, number)
        metadata = {k: _plain(v) for k, v in doc.items() if k not in _PIXEL_TABLES and k != "type"}
        metadata = {k: v for k, v in metadata.items() if v is not _DROP}
        metadata.update(source="stream2", channel=channel, pixel_mask_applied=mask is not None)
        name = doc.get("detector_description") if isinstance(doc.get("detector_description"), str) else "DECTRIS"
        series_id = doc.get("series_id")
        log.info("stream v2 series %s (%s x %s %s, channel %s, pixel mask %s)", unique_id, shape[1], shape[0],
                 dtype.name, channel, "applied" if mask is not None else "absent")  # fmt: skip
        return Start(run_id=unique_id, run_name=f"{name} series {series_id}", tiled_url="", metadata=metadata)

    def _pixel_mask(self, masks: Any, channel: str, shape: tuple[int, int]) -> np.ndarray | None:
        if masks is None:
            return None  # header_detail "basic" leaves it out: saturation and NODATA are still masked
        if not isinstance(masks, dict) or not isinstance(masks.get(channel), MultiDimArray):
            raise ProtocolError("bad_field", f"pixel_mask must map channel {channel!r:.40} to an array")
        array = masks[channel]
        if array.shape != shape:
            raise ProtocolError("bad_shape", f"pixel mask {array.shape} for frames {shape}")
        if array.array.dtype.kind not in "ui":
            raise ProtocolError("bad_dtype", f"pixel mask of {array.array.dtype.str}")
        values = array_values(array, max_bytes=self.limits.max_bytes)
        return values != 0 if values.any() else None

    def _image(self, doc: dict[str, Any]) -> Event:
        series = self._series
        if series is None:
            raise ProtocolError("no_active_run", "image arrived outside a series")
        _same_series(doc, series)
        index = _count(doc, "image_id", self.limits.max_frame_number)
        data = doc.get("data")
        array = data.get(series.channel) if isinstance(data, dict) else None
        if not isinstance(array, MultiDimArray):
            raise ProtocolError("missing_field", f"data.{series.channel[:40]}")
        if array.shape != series.shape:
            raise ProtocolError("bad_shape", f"{array.shape} for a {series.shape} series")
        if array.array.dtype.newbyteorder("<") != series.dtype:
            raise ProtocolError("bad_dtype", f"{array.array.dtype.str} for a {series.dtype.name} series")
        image = array_values(array, max_bytes=self.limits.max_bytes)
        metadata = {k: doc[k] for k in _TIMES if _is_rational(doc.get(k))}
        return Event(frame_number=index, image=_masked(image, series), tiled_url="", metadata=metadata)

    def _end(self, doc: dict[str, Any]) -> Stop:
        series = self._series
        if series is None:
            raise ProtocolError("no_active_run", "end arrived outside a series")
        _same_series(doc, series)
        self._series = None
        return Stop(num_frames=series.number_of_images)


def _masked(image: np.ndarray, series: _Series) -> np.ndarray:
    """A uint32 frame (a fresh, read-only array) with masked and saturated pixels at NODATA."""
    frame = image.astype(np.uint32, copy=not image.flags.writeable or image.dtype != np.uint32)
    if series.mask is not None:
        frame[series.mask] = NODATA
    if series.saturation is not None:
        frame[frame >= series.saturation] = NODATA
    frame.flags.writeable = False
    return frame


def _same_series(doc: dict[str, Any], series: _Series) -> None:
    unique_id = doc.get("series_unique_id")
    if unique_id is not None and unique_id != series.unique_id:
        raise ProtocolError("wrong_series", f"message of series {unique_id!r:.40} in series {series.unique_id}")


def _required(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if value is None:
        raise ProtocolError("missing_field", key)
    if not isinstance(value, kind):
        raise ProtocolError("bad_field", f"{key} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _count(doc: dict[str, Any], key: str, maximum: int) -> int:
    value = _required(doc, key, int)
    if isinstance(value, bool) or not 0 <= value <= maximum:
        raise ProtocolError("bad_field", f"{key} must be an integer in [0, {maximum}], got {value!r:.40}")
    return int(value)


def _is_rational(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(n) is int for n in value)


_DROP = object()


def _plain(value: Any) -> Any:
    """A start field as run metadata (JSON-able): dates as ISO strings; arrays and byte strings left out."""
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, bytes | TypedArray | MultiDimArray | Compressed):
        return _DROP
    if isinstance(value, dict):
        kept = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, list):
        return [v for v in map(_plain, value) if v is not _DROP]
    return value
