"""The ingest wire format: one msgpack map per ZeroMQ message, dispatched on ``msg_type``.

Compatible with the ALS arroyo tools (see ARCHITECTURE.md, "Ingest wire format"):

- ``{"msg_type": "start", "run_name", "run_id", "width", "height", "data_type", "tiled_url", ...}``
- ``{"msg_type": "event", "image": {"array": {"data", "dtype", "shape"}}, "frame_number", "tiled_url", ...}``
- ``{"msg_type": "stop", "num_frames"}``

`decode` turns bytes into typed `Start` / `Event` / `Stop` and raises `ProtocolError` with a short
``reason`` (used as the metric label) for anything it cannot trust. The image of an `Event` is a
read-only numpy view on the bytes msgpack produced: no further copy. Size limits are checked on the
raw message length and on ``dtype x shape`` before any array is built.

Everything but an event's pixel bytes is metadata (sender strings, extra keys) and is bounded by `Limits`:
while msgpack unpacks (its per-container limits and an object budget: a small message of empty arrays must
not become a gigabyte of Python objects), then in packed size and nesting depth (websocket clients receive
start metadata as JSON).

This module has no project imports (see docs/internals.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# Pilatus 2M (1679 x 1475) with ample room; both limits are configurable per decoder call.
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = DEFAULT_MAX_PIXELS * 8
# 2**31 - 1: 24 days of a 1 kHz detector; 2**63 and beyond do not even fit the int64 columns downstream.
DEFAULT_MAX_FRAME_NUMBER = 2**31 - 1
# ALS and bluesky start documents are a few KiB; this also bounds an event's bytes besides its pixels.
DEFAULT_MAX_METADATA_BYTES = 64 * 1024
DEFAULT_MAX_METADATA_DEPTH = 32

_ALLOWED_KINDS = frozenset("iuf")  # signed/unsigned integers and floats; no bool/complex/object/str

REJECT_REASONS = (
    "malformed",
    "unknown_msg_type",
    "missing_field",
    "bad_field",
    "bad_dtype",
    "bad_shape",
    "size_mismatch",
    "oversized",
    "non_finite",
    "oversized_metadata",
)


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``reason`` is a short, stable label (a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Start:
    run_id: str  # empty when the source did not give one
    run_name: str
    tiled_url: str
    metadata: dict[str, Any] = field(default_factory=dict)  # every other key, kept as sent


@dataclass(frozen=True, slots=True)
class Event:
    frame_number: int
    image: np.ndarray  # (H, W), read-only view on the received bytes
    tiled_url: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stop:
    num_frames: int | None
    metadata: dict[str, Any] = field(default_factory=dict)


WireMessage = Start | Event | Stop


@dataclass(frozen=True, slots=True)
class Limits:
    """What a message may be. Checked before any copy of the pixel data.

    ``max_metadata_bytes`` bounds a message's bytes other than an event's pixel bytes, and (each msgpack
    object taking at least one byte) the number of objects it unpacks to.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    reject_non_finite: bool = True
    max_frame_number: int = DEFAULT_MAX_FRAME_NUMBER
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    max_metadata_depth: int = DEFAULT_MAX_METADATA_DEPTH

    @property
    def max_message_bytes(self) -> int:
        """The longest message that can be accepted: the largest frame plus its metadata."""
        return self.max_bytes + self.max_metadata_bytes


DEFAULT_LIMITS = Limits()


def decode(payload: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> WireMessage:
    """Parse one ZeroMQ message. Raises `ProtocolError` with a reason label."""
    if len(payload) > limits.max_message_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes exceed {limits.max_message_bytes}")
    doc = _unpack(payload, limits)
    if not isinstance(doc, dict):
        raise ProtocolError("malformed", f"expected a map, got {type(doc).__name__}")
    _check_metadata(doc, len(payload), limits)
    msg_type = doc.get("msg_type")
    if msg_type == "event":
        return _decode_event(doc, limits)
    if msg_type == "start":
        return _decode_start(doc)
    if msg_type == "stop":
        return _decode_stop(doc, limits)
    if msg_type is None:
        raise ProtocolError("missing_field", "msg_type")
    raise ProtocolError("unknown_msg_type", repr(msg_type)[:64])


class _ObjectBudget(Exception):
    """Raised from inside msgpack's hooks when a message unpacks to more objects than its budget."""


class _Budget:
    """msgpack hooks that count the objects of each completed container, raising once ``left`` runs out."""

    def __init__(self, objects: int) -> None:
        self.left = objects

    def _spend(self, objects: int) -> None:
        self.left -= objects
        if self.left < 0:
            raise _ObjectBudget

    def list_hook(self, items: list[Any]) -> list[Any]:
        self._spend(len(items))
        return items

    def object_hook(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        self._spend(2 * len(mapping))
        return mapping


def _unpack(payload: bytes | memoryview, limits: Limits) -> Any:
    """msgpack with every container, string and object count bounded while it unpacks, not after."""
    budget = _Budget(limits.max_metadata_bytes)
    small = limits.max_metadata_bytes
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=False,
            list_hook=budget.list_hook, object_hook=budget.object_hook,
            max_str_len=small, max_array_len=small, max_map_len=small, max_ext_len=small,
            max_bin_len=max(limits.max_bytes, small),
        )  # fmt: skip
    except _ObjectBudget:
        raise ProtocolError(
            "oversized_metadata", f"more than {limits.max_metadata_bytes} msgpack objects"
        ) from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError...
        # msgpack reports a container or string over its max_*_len as a plain ValueError "N exceeds max_..."
        if type(exc) is ValueError and "exceeds max_" in str(exc):
            raise ProtocolError("oversized_metadata", str(exc)) from None
        raise ProtocolError("malformed", f"not msgpack: {type(exc).__name__}") from None


def _check_metadata(doc: dict[Any, Any], message_bytes: int, limits: Limits) -> None:
    """Everything but an event's pixel bytes fits ``max_metadata_bytes`` and ``max_metadata_depth``."""
    is_event = doc.get("msg_type") == "event"
    data = _pixel_bytes(doc) if is_event else None
    size = message_bytes - (len(data) if data is not None else 0)
    if size > limits.max_metadata_bytes:
        raise ProtocolError(
            "oversized_metadata", f"{size} bytes besides the pixels exceed {limits.max_metadata_bytes}"
        )
    keys = {k: v for k, v in doc.items() if not (is_event and k == "image")}
    if not _within_depth(keys, limits.max_metadata_depth):
        raise ProtocolError("oversized_metadata", f"nested deeper than {limits.max_metadata_depth} levels")


def _pixel_bytes(doc: dict[Any, Any]) -> bytes | None:
    image = doc.get("image")
    array = image.get("array") if isinstance(image, dict) else None
    data = array.get("data") if isinstance(array, dict) else None
    return data if isinstance(data, bytes) else None


def _within_depth(doc: dict[Any, Any], limit: int) -> bool:
    """Whether no container lies deeper than ``limit`` (``doc`` is level 1); iterative: msgpack nests 1024."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if level > limit:
            return False
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return True


def _str_field(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"{key} must be a string, got {type(value).__name__}")
    return value


def _counting_number(value: Any, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _decode_start(doc: dict[str, Any]) -> Start:
    run_id = doc.get("run_id")
    # ALS tools sometimes send numeric run ids; a string form is what URIs need.
    if isinstance(run_id, int | float) and not isinstance(run_id, bool):
        run_id = str(run_id)
        doc = {**doc, "run_id": run_id}
    meta = {k: v for k, v in doc.items() if k not in ("msg_type", "run_id", "run_name", "tiled_url")}
    return Start(
        run_id=_str_field(doc, "run_id"),
        run_name=_str_field(doc, "run_name"),
        tiled_url=_str_field(doc, "tiled_url"),
        metadata=meta,
    )


def _decode_stop(doc: dict[str, Any], limits: Limits) -> Stop:
    num = doc.get("num_frames")
    if num is not None and not _counting_number(num, limits.max_frame_number + 1):
        most = limits.max_frame_number + 1
        raise ProtocolError("bad_field", f"num_frames must be an integer in [0, {most}], got {num!r:.40}")
    meta = {k: v for k, v in doc.items() if k not in ("msg_type", "num_frames")}
    return Stop(num_frames=num, metadata=meta)


def _decode_event(doc: dict[str, Any], limits: Limits) -> Event:
    frame_number = doc.get("frame_number")
    if frame_number is None:
        raise ProtocolError("missing_field", "frame_number")
    if not _counting_number(frame_number, limits.max_frame_number):
        most = limits.max_frame_number
        got = f"{frame_number!r:.40}"
        raise ProtocolError("bad_field", f"frame_number must be an integer in [0, {most}], got {got}")
    try:
        array = doc["image"]["array"]
        data, dtype_name, shape = array["data"], array["dtype"], array["shape"]
    except (KeyError, TypeError):
        raise ProtocolError("missing_field", "image.array.{data,dtype,shape}") from None
    if not isinstance(data, bytes | bytearray):
        raise ProtocolError("bad_field", f"image.array.data must be bytes, got {type(data).__name__}")
    if not isinstance(dtype_name, str):
        raise ProtocolError("bad_dtype", f"dtype must be a string, got {type(dtype_name).__name__}")
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        raise ProtocolError("bad_dtype", repr(dtype_name)[:40]) from None
    if dtype.kind not in _ALLOWED_KINDS:
        raise ProtocolError("bad_dtype", f"{dtype.str} is not a numeric detector dtype")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ProtocolError("bad_shape", f"shape must be [H, W] positive integers, got {shape!r:.60}")
    height, width = shape
    pixels = height * width
    if pixels > limits.max_pixels or pixels * dtype.itemsize > limits.max_bytes:
        raise ProtocolError("oversized", f"{height}x{width} {dtype.str} exceeds the configured frame limits")
    if len(data) != pixels * dtype.itemsize:
        raise ProtocolError(
            "size_mismatch", f"{len(data)} bytes for {height}x{width} {dtype.str} ({pixels * dtype.itemsize})"
        )
    image = np.frombuffer(data, dtype=dtype).reshape(height, width)  # read-only when data is bytes
    if limits.reject_non_finite and dtype.kind == "f" and not np.isfinite(image).all():
        raise ProtocolError("non_finite", "frame contains NaN or inf")
    meta = {k: v for k, v in doc.items() if k not in ("msg_type", "image", "frame_number", "tiled_url")}
    return Event(frame_number=frame_number, image=image, tiled_url=_str_field(doc, "tiled_url"), metadata=meta)


def encode_start(
    run_id: str,
    run_name: str = "",
    *,
    width: int = 0,
    height: int = 0,
    data_type: str = "",
    tiled_url: str = "",
    **extra: Any,
) -> bytes:
    """A start document as the ALS tools send it. ``extra`` keys travel as metadata."""
    return msgpack.packb(
        {
            "msg_type": "start",
            "run_name": run_name,
            "run_id": run_id,
            "width": width,
            "height": height,
            "data_type": data_type,
            "tiled_url": tiled_url,
            **extra,
        }
    )


def encode_event(frame_number: int, image: np.ndarray, *, tiled_url: str = "", **extra: Any) -> bytes:
    """An event document carrying one (H, W) frame."""
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) frame, got shape {image.shape}")
    frame = np.ascontiguousarray(image)
    # "int32" style names are what the ALS tools send; byte order is spelled out only when not native.
    dtype_name = frame.dtype.name if frame.dtype.isnative else frame.dtype.str
    return msgpack.packb(
        {
            "msg_type": "event",
            "image": {
                "array": {"data": memoryview(frame).cast("B"), "dtype": dtype_name, "shape": list(frame.shape)}
            },
            "frame_number": int(frame_number),
            "tiled_url": tiled_url,
            **extra,
        }
    )


def encode_stop(num_frames: int | None, **extra: Any) -> bytes:
    return msgpack.packb({"msg_type": "stop", "num_frames": num_frames, **extra})
