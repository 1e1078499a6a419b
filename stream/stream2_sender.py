"""The sending side of DECTRIS SIMPLON stream v2, made from the public spec (dectris/documentation: stream_v2).

One CBOR map per ZeroMQ message from a BOUND PUSH socket (as a DCU on port 31001): ``start`` (series set-up
with the per-channel ``pixel_mask``), one ``image`` per frame (each channel a tag-40 multi-dimensional array of
an RFC 8746 typed array, bitshuffle-LZ4 compressed under tag 56500 by the ``bitshuffle`` package), ``end``.

`Stream2FrameSender` has `stream.sender.FrameSender`'s verbs (``send_start`` / ``send_event`` / ``send_stop``),
so ``simulate`` and ``replay`` speak stream v2 with ``--format stream2``. With ``detector="eiger2_4m"`` it sends
every frame on an EIGER2 X 4M's grid (2162 x 2068 uint32; gaps and bad pixels in the pixel mask and set to
2**32 - 1, as the detector does with its mask applied).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import struct
from typing import Any

import cbor2
import numpy as np
import zmq
import zmq.asyncio

from stream.bound_socket import BoundSocket
from stream.sources.stream2_cbor import TAG_COMPRESSED, TAG_DATETIME, TAG_MULTIDIM_ROW_MAJOR, TYPED_ARRAY_TAGS

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "threshold_1"
BLOCK_BYTES = 8192  # DECTRIS's bslz4 block size
EIGER_NODATA = 2**32 - 1
EIGER2_4M_SATURATION = 2**31 - 1  # beyond any count this simulation makes


def multidim(array: np.ndarray, *, compress: bool = True) -> cbor2.CBORTag:
    """A tag-40 multi-dimensional array of a little-endian typed array, bslz4-compressed unless told not to."""
    values = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    tag = TYPED_ARRAY_TAGS[values.dtype if values.dtype.itemsize > 1 else np.dtype(values.dtype.str[1:])]
    data: Any = values.tobytes()
    if compress:
        data = cbor2.CBORTag(TAG_COMPRESSED, ["bslz4", values.itemsize, bslz4(values)])
    return cbor2.CBORTag(TAG_MULTIDIM_ROW_MAJOR, [list(values.shape), cbor2.CBORTag(tag, data)])


def bslz4(values: np.ndarray) -> bytes:
    """Bitshuffle-LZ4 with the HDF5 filter framing DECTRIS uses: >Q uncompressed bytes, >I block bytes, blocks."""
    import bitshuffle

    flat = np.ascontiguousarray(values).reshape(-1)
    blocks = bitshuffle.compress_lz4(flat, BLOCK_BYTES // flat.itemsize)
    return struct.pack(">QI", flat.nbytes, BLOCK_BYTES) + blocks.tobytes()


def encode_start(
    series_unique_id: str,
    *,
    series_id: int,
    shape: tuple[int, int],
    dtype: str = "uint32",
    channels: tuple[str, ...] = (DEFAULT_CHANNEL,),
    number_of_images: int | None,
    pixel_mask: np.ndarray | None = None,
    saturation_value: int | None = None,
    **extra: Any,
) -> bytes:
    """A start message; ``pixel_mask`` (uint32, non-zero = masked) is sent for every channel."""
    doc: dict[str, Any] = {
        "type": "start",
        "arm_date": cbor2.CBORTag(TAG_DATETIME, datetime.datetime.now(datetime.UTC).isoformat()),
        "channels": list(channels),
        "image_dtype": dtype,
        "image_size_x": shape[1],
        "image_size_y": shape[0],
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "pixel_mask_enabled": pixel_mask is not None,
        **extra,
    }
    if number_of_images is not None:
        doc["number_of_images"] = number_of_images
    if saturation_value is not None:
        doc["saturation_value"] = saturation_value
    if pixel_mask is not None:
        mask = multidim(pixel_mask.astype(np.uint32))
        doc["pixel_mask"] = dict.fromkeys(channels, mask)
    return cbor2.dumps(doc)


def encode_image(
    series_unique_id: str, image_id: int, images: dict[str, np.ndarray], *, series_id: int, compress: bool = True,
    **extra: Any,
) -> bytes:  # fmt: skip
    """An image message with one array per channel."""
    doc = {
        "type": "image",
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "image_id": image_id,
        "data": {channel: multidim(image, compress=compress) for channel, image in images.items()},
        **extra,
    }
    return cbor2.dumps(doc)


def encode_end(series_unique_id: str, *, series_id: int) -> bytes:
    return cbor2.dumps({"type": "end", "series_id": series_id, "series_unique_id": series_unique_id})


_WIRE_DTYPES = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"))  # stream v2's image_dtype values


def _as_wire_dtype(image: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """A frame in the series' dtype; other dtypes (e.g. a PILATUS's int32) become uint32 with negative
    (gap / bad) pixels at 2**32 - 1, as an EIGER marks the pixels it masks."""
    if image.dtype.newbyteorder("<") == dtype.newbyteorder("<"):
        return image
    out = np.clip(image, 0, EIGER_NODATA - 1).astype(np.uint32)
    out[image < 0] = EIGER_NODATA
    return out


class Eiger2Grid:
    """Frames of any size put on an EIGER2 X 4M's pixel grid, with its gaps and bad pixels masked."""

    def __init__(self) -> None:
        from stream.independent.detectors import EIGER2_4M

        self.shape = EIGER2_4M.shape
        self.pixel_mask = EIGER2_4M.pixel_status().astype(np.uint32)  # 1 gap, 2 bad pixel (DECTRIS bits 0/1)
        self._masked = self.pixel_mask != 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        counts = np.clip(frame, 0, None).astype(np.float32)  # PILATUS gaps (-1, -2) read as empty here
        resized = cv2.resize(counts, (self.shape[1], self.shape[0]), interpolation=cv2.INTER_LINEAR)
        out = np.rint(resized).astype(np.uint32)
        out[self._masked] = EIGER_NODATA
        return out


class Stream2FrameSender(BoundSocket):
    """`stream.sender.FrameSender`'s verbs over stream v2 (PUSH only: stream v2 has no PUB)."""

    def __init__(
        self,
        address: str,
        *,
        detector: str | None = "eiger2_4m",
        channels: tuple[str, ...] = (DEFAULT_CHANNEL,),
        number_of_images: int | None = None,
        sndhwm: int = 16,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if detector not in (None, "eiger2_4m"):
            raise ValueError(f"unknown stream v2 detector {detector!r}; known: eiger2_4m")
        super().__init__(address, zmq.PUSH, sndhwm=sndhwm, context=context)
        self.channels = channels
        self.number_of_images = number_of_images  # announced in each start, when known
        self.pattern = "push"
        self._grid = Eiger2Grid() if detector else None
        self._series: tuple[str, int] | None = None  # (unique id, series id)
        self._dtype = np.dtype(np.uint32)

    async def wait_for_subscriber(self, timeout: float | None = None) -> bool:
        return True  # PUSH: a send waits for the receiver

    async def send_raw(self, payload: bytes) -> None:
        await self.socket.send(payload, copy=False)

    async def send_start(self, run_id: str, run_name: str = "", *, width: int = 0, height: int = 0,
                         data_type: str = "", number_of_images: int | None = None, **extra: Any) -> None:  # fmt: skip
        """Arm a series; ``width`` / ``height`` / ``data_type`` are the frames' (ignored on the EIGER2 grid)."""
        series_id = (self._series[1] + 1) if self._series else 1
        self._series = (run_id, series_id)
        shape, dtype, mask = (height, width), "uint32", None
        if self._grid is not None:
            shape, mask = self._grid.shape, self._grid.pixel_mask
        elif data_type and np.dtype(data_type).newbyteorder("<") in _WIRE_DTYPES:
            dtype = np.dtype(data_type).name
        self._dtype = np.dtype(dtype)
        user_data = {"run_name": run_name, **{k: v for k, v in extra.items() if isinstance(v, str | int | float)}}
        await self.send_raw(encode_start(
            run_id, series_id=series_id, shape=shape, dtype=dtype, channels=self.channels,
            number_of_images=self.number_of_images if number_of_images is None else number_of_images,
            pixel_mask=mask,
            saturation_value=EIGER2_4M_SATURATION if self._grid is not None else None,
            detector_description="EIGER2 X 4M (simulated)" if self._grid is not None else "stream v2 (simulated)",
            user_data=user_data,
        ))  # fmt: skip

    async def send_event(self, frame_number: int, image: np.ndarray, **extra: Any) -> None:
        if self._series is None:
            raise RuntimeError("send_start first")
        # Regridding and compressing a 4M frame take tens of ms (cv2, bitshuffle release the GIL): off the loop.
        payload = await asyncio.to_thread(self._image_message, frame_number, image)
        await self.send_raw(payload)

    def _image_message(self, frame_number: int, image: np.ndarray) -> bytes:
        assert self._series is not None
        frame = self._grid(image) if self._grid is not None else _as_wire_dtype(image, self._dtype)
        unique_id, series_id = self._series
        return encode_image(unique_id, frame_number, dict.fromkeys(self.channels, frame), series_id=series_id)

    async def send_stop(self, num_frames: int | None, **extra: Any) -> None:
        if self._series is None:
            raise RuntimeError("send_start first")
        await self.send_raw(encode_end(self._series[0], series_id=self._series[1]))
