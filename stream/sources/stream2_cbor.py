"""Bounded CBOR for DECTRIS stream v2: typed arrays, multi-dimensional arrays and compressed byte strings.

Decoding is cbor2's; this module bounds it and gives the three stream v2 tags small value objects
(dectris/documentation: stream_v2/README.md, cbor/dectris-compression-tag.md; RFC 8746):

- RFC 8746 typed arrays (tags 64-87 but 76): `TypedArray(dtype, data)`, ``data`` bytes or `Compressed`;
- tag 40 (row-major) / 1040 (column-major) multi-dimensional arrays: `MultiDimArray(shape, array, column_major)`;
- tag 56500 ``[algorithm, element size, bytes]``: `Compressed`, decompressed only by `array_values`, after the
  size its header states was checked against the caller's bound.

Before cbor2 builds anything, `_scan` walks the item headers once: exactly one item, only the tags above and
tag 0 (RFC 8949 date/time strings, which stream v2 uses), at most ``max_items`` items (cbor2 has no hook on
arrays: a message of empty arrays must not become gigabytes of Python objects), nesting at most ``max_depth``,
and it returns the message's bytes besides its byte-string contents (the caller bounds them like metadata).

Bitshuffle-LZ4 ("bslz4") is decompressed by the ``bitshuffle`` package, "lz4" by DECTRIS's
``dectris-compression`` where installed; the block framing is checked first (bitshuffle trusts each block's
stated length, so a lying one would make it read past the payload).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

from stream.protocol import ProtocolError

TAG_DATETIME = 0
TAG_MULTIDIM_ROW_MAJOR = 40
TAG_MULTIDIM_COLUMN_MAJOR = 1040
TAG_COMPRESSED = 56500
# RFC 8746 section 2.1: tag -> numpy dtype (uint8 clamped is plain uint8 here; 76 is reserved; no float128)
TYPED_ARRAY_DTYPES: dict[int, np.dtype[Any]] = {
    tag: np.dtype(code)
    for tag, code in {
        64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
        72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
        80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
    }.items()
}  # fmt: skip
TYPED_ARRAY_TAGS = {dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype: tag
                    for tag, dtype in TYPED_ARRAY_DTYPES.items() if tag != 68}  # fmt: skip
_ALLOWED_TAGS = frozenset({TAG_DATETIME, TAG_MULTIDIM_ROW_MAJOR, TAG_MULTIDIM_COLUMN_MAJOR, TAG_COMPRESSED,
                           *TYPED_ARRAY_DTYPES})  # fmt: skip
_BSLZ4_HEADER = struct.Struct(">QI")  # uncompressed bytes, block bytes (the HDF5 bitshuffle filter framing)
_BSHUF_BLOCK_MULT = 8  # bitshuffle blocks are multiples of 8 elements; the last size % 8 are stored raw
_MAX_BLOCK_BYTES = 1 << 24


@dataclass(frozen=True, slots=True)
class Compressed:
    """A byte string as DECTRIS compresses it (tag 56500), still compressed."""

    algorithm: str
    elem_size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TypedArray:
    dtype: np.dtype[Any]
    data: bytes | Compressed


@dataclass(frozen=True, slots=True)
class MultiDimArray:
    shape: tuple[int, ...]
    array: TypedArray
    column_major: bool = False


def loads(payload: bytes | memoryview, *, max_items: int, max_depth: int) -> tuple[Any, int]:
    """(decoded item, bytes besides byte-string contents). Raises `ProtocolError` (malformed, oversized_metadata,
    bad_field)."""
    other_bytes = _scan(payload, max_items, max_depth)
    try:
        return cbor2.loads(payload, tag_hook=_tag_hook, allow_indefinite=False, strict_hashable_types=True,
                           max_depth=max_depth + 1), other_bytes  # fmt: skip
    except cbor2.CBORDecodeError as exc:
        if isinstance(exc.__cause__, ProtocolError):
            raise exc.__cause__ from None
        raise ProtocolError("malformed", f"not CBOR: {type(exc).__name__}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a bad date/time string behind tag 0
        raise ProtocolError("malformed", f"bad CBOR value: {type(exc).__name__}") from None


def _scan(payload: bytes | memoryview, max_items: int, max_depth: int) -> int:
    """Walk one CBOR item's headers without building it; see the module docstring."""
    view = memoryview(payload).cast("B")
    end, pos, items, byte_strings = len(view), 0, 0, 0
    open_items = [1]  # items still to read per open container; the outermost holds the message
    while open_items:
        if open_items[-1] == 0:
            open_items.pop()
            continue
        open_items[-1] -= 1
        items += 1
        if items > max_items:
            raise ProtocolError("oversized_metadata", f"more than {max_items} CBOR items")
        if pos >= end:
            raise ProtocolError("malformed", "CBOR ends inside an item")
        major, info = view[pos] >> 5, view[pos] & 0x1F
        pos += 1
        if info < 24:
            value = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > end:
                raise ProtocolError("malformed", "CBOR ends inside a header")
            value = int.from_bytes(view[pos : pos + size], "big")
            pos += size
        else:
            raise ProtocolError("malformed", "indefinite-length or reserved CBOR item")
        if major in (2, 3):  # byte / text string
            if value > end - pos:
                raise ProtocolError("malformed", "CBOR string longer than the message")
            pos += value
            byte_strings += value if major == 2 else 0
        elif major in (4, 5):  # array / map: every item takes at least one byte
            count = value * (2 if major == 5 else 1)
            if count > end - pos:
                raise ProtocolError("malformed", "CBOR container longer than the message")
            if len(open_items) > max_depth:
                raise ProtocolError("oversized_metadata", f"CBOR nested deeper than {max_depth} levels")
            open_items.append(count)
        elif major == 6:
            if value not in _ALLOWED_TAGS:
                raise ProtocolError("bad_field", f"CBOR tag {value} is not part of stream v2")
            open_items.append(1)
    if pos != end:
        raise ProtocolError("malformed", f"{end - pos} bytes after the CBOR item")
    return end - byte_strings


def _tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Any:
    value = tag.value
    if tag.tag == TAG_COMPRESSED:
        if not (isinstance(value, list | tuple) and len(value) == 3 and isinstance(value[0], str)
                and isinstance(value[1], int) and isinstance(value[2], bytes)):  # fmt: skip
            raise ProtocolError("bad_field", "tag 56500 must be [algorithm, element size, bytes]")
        return Compressed(value[0], value[1], value[2])
    dtype = TYPED_ARRAY_DTYPES.get(tag.tag)
    if dtype is not None:
        if not isinstance(value, bytes | Compressed):
            raise ProtocolError("bad_field", f"typed array (tag {tag.tag}) must hold a byte string")
        return TypedArray(dtype, value)
    if tag.tag in (TAG_MULTIDIM_ROW_MAJOR, TAG_MULTIDIM_COLUMN_MAJOR):
        if not (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], list | tuple)
                and all(type(n) is int and n >= 0 for n in value[0]) and isinstance(value[1], TypedArray)):  # fmt: skip
            raise ProtocolError("bad_field", "a multi-dimensional array must be [[dims...], typed array]")
        return MultiDimArray(tuple(value[0]), value[1], tag.tag == TAG_MULTIDIM_COLUMN_MAJOR)
    raise ProtocolError("bad_field", f"CBOR tag {tag.tag} is not part of stream v2")


def array_values(array: MultiDimArray, *, max_bytes: int) -> np.ndarray:
    """The array's values, decompressed, in its shape (C order); ``max_bytes`` checked before decompressing.

    Raises `ProtocolError`: oversized, size_mismatch, unsupported_compression, decompress_error.
    """
    dtype, data = array.array.dtype, array.array.data
    count = int(np.prod(array.shape, dtype=np.int64)) if array.shape else 1
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise ProtocolError("oversized", f"{array.shape} {dtype.str} exceeds {max_bytes} bytes")
    if isinstance(data, Compressed):
        flat = _decompress(data, dtype, count)
    elif len(data) != nbytes:
        raise ProtocolError("size_mismatch", f"{len(data)} bytes for {array.shape} {dtype.str} ({nbytes})")
    else:
        flat = np.frombuffer(data, dtype)
    if array.column_major:
        return np.ascontiguousarray(flat.reshape(array.shape[::-1]).T)
    return flat.reshape(array.shape)


def _decompress(compressed: Compressed, dtype: np.dtype[Any], count: int) -> np.ndarray:
    if compressed.algorithm == "bslz4":
        return _bslz4(compressed, dtype, count)
    if compressed.algorithm == "lz4":
        try:
            from dectris.compression import decompress  # DECTRIS's own codec, where installed
        except ImportError:
            raise ProtocolError("unsupported_compression", "lz4 needs the dectris-compression package") from None
        if len(compressed.data) < 12 or _BSLZ4_HEADER.unpack_from(compressed.data)[0] != count * dtype.itemsize:
            raise ProtocolError("size_mismatch", "lz4 header does not state the array's size")
        try:
            return np.frombuffer(decompress(compressed.data, "lz4"), dtype, count)
        except Exception as exc:  # noqa: BLE001 - any failure of the codec is bad input here
            raise ProtocolError("decompress_error", f"lz4: {type(exc).__name__}") from None
    raise ProtocolError("unsupported_compression", repr(compressed.algorithm)[:40])


def _bslz4(compressed: Compressed, dtype: np.dtype[Any], count: int) -> np.ndarray:
    import bitshuffle  # the bitshuffle authors' codec (as in the HDF5 filter DECTRIS uses)

    data, size = compressed.data, dtype.itemsize
    if compressed.elem_size != size:
        raise ProtocolError("bad_dtype", f"bslz4 element size {compressed.elem_size} for {dtype.str}")
    if len(data) < _BSLZ4_HEADER.size:
        raise ProtocolError("malformed", "bslz4 payload shorter than its header")
    total, block_bytes = _BSLZ4_HEADER.unpack_from(data)
    if total != count * size:
        raise ProtocolError("size_mismatch", f"bslz4 header states {total} bytes for {count * size}")
    if block_bytes == 0 or block_bytes > _MAX_BLOCK_BYTES or block_bytes % (size * _BSHUF_BLOCK_MULT):
        raise ProtocolError("malformed", f"bslz4 block size {block_bytes}")
    block = block_bytes // size
    _check_blocks(data, count, block, size)
    try:
        payload = np.frombuffer(data, np.uint8, offset=_BSLZ4_HEADER.size)
        return bitshuffle.decompress_lz4(payload, (count,), dtype, block)
    except Exception as exc:  # noqa: BLE001 - the codec raises plain exceptions for corrupt blocks
        raise ProtocolError("decompress_error", f"bslz4: {type(exc).__name__}") from None


def _check_blocks(data: bytes, count: int, block: int, size: int) -> None:
    """Every stated block length stays inside the payload, and the raw tail ends it exactly."""
    lengths = [block] * (count // block)
    partial = count % block - count % _BSHUF_BLOCK_MULT
    if partial:
        lengths.append(partial)
    pos, end = _BSLZ4_HEADER.size, len(data)
    for _ in lengths:
        if pos + 4 > end:
            raise ProtocolError("decompress_error", "bslz4 payload ends before its last block")
        pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
    if pos + (count % _BSHUF_BLOCK_MULT) * size != end:
        raise ProtocolError("decompress_error", "bslz4 block lengths do not add up to the payload")
