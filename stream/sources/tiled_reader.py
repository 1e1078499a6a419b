"""HTTP reads of the bluesky layout in a Tiled container, for the ``tiled://`` source (tiled_live.py).

bluesky-tiled-plugins' ``TiledWriter`` writes each run as:

  /<PATH>/<start uid>                  container, metadata {"start": {...}} and, once over, {"stop": {...}}
  /<PATH>/<start uid>/<stream>         one container per event stream ("primary", ...)
  /<PATH>/<start uid>/<stream>/<key>   an array per data key; an area detector's frames are registered from
                                       its files, (N, H, W) or (N, 1, H, W), and grow as the run goes on

What is in Tiled is the truth the source follows: websocket messages only say *when* to look again (they are
at-most-once), so every read here is of the current state. Frames are read a few at a time by slice, never a
whole run, and a response longer than the slice it asked for is cut off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from stream.protocol import Limits, ProtocolError

log = logging.getLogger(__name__)

_ALLOWED_KINDS = frozenset("iuf")  # as stream.protocol: integers and floats only
_PREFERRED_STREAM = "primary"
# Frames uncompressed: compressing detector frames costs the server more than the bytes cost a beamline network.
_RAW = {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}


def node_path(*segments: str) -> str:
    """URL path of a node from its segments (a segment may hold any character)."""
    return "/".join(quote(part, safe="") for segment in segments for part in segment.split("/") if part)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One bluesky run node: its start document and, once the run is over, its stop document."""

    uid: str
    path: str  # node path below the server, e.g. "raw/<uid>"
    start: dict[str, Any]
    stop: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ImageArray:
    """The array a run's frames are appended to; ``frames`` is how many it holds now."""

    path: str  # "raw/<uid>/primary/det"
    stream: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any] | None  # None: not a plain numeric dtype

    @property
    def frames(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def frame_shape(self) -> tuple[int, int]:
        height, width = self.shape[-2:]
        return height, width

    def problem(self, limits: Limits) -> ProtocolError | None:
        """Why no frame of this array can be accepted (checked before any frame is read), or None."""
        if self.dtype is None or self.dtype.kind not in _ALLOWED_KINDS:
            return ProtocolError("bad_dtype", f"{self.path}: not a numeric detector dtype")
        if (
            not (len(self.shape) == 3 or (len(self.shape) == 4 and self.shape[1] == 1))
            or min(self.shape[1:]) < 1
        ):
            return ProtocolError(
                "bad_shape", f"{self.path}: shape {self.shape} is not (N, H, W) or (N, 1, H, W)"
            )
        height, width = self.frame_shape
        if height * width > limits.max_pixels or height * width * self.dtype.itemsize > limits.max_bytes:
            return ProtocolError(
                "oversized", f"{self.path}: {height}x{width} {self.dtype.str} exceeds the limits"
            )
        return None

    def slice_of(self, index: int) -> str:
        """Tiled's ``slice`` for frame ``index`` alone: (H, W), without the singleton frames-per-point axis."""
        return f"{index},0" if len(self.shape) == 4 else str(index)


class TiledRunReader:
    """Reads runs, their image array and frames from the container at ``path`` on ``base_url``.

    ``client`` carries the API key header; nothing here logs it. Raises ``httpx.HTTPError`` when Tiled cannot be
    read (the caller tries again later).
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, path: str, field: str | None) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.path = path.strip("/")
        self.field = field

    def frame_url(self, array: ImageArray, index: int) -> str:
        """The frame's own Tiled URI: it fetches exactly that (H, W) frame (no API key in it)."""
        return f"{self.base_url}/api/v1/array/full/{node_path(array.path)}?slice={array.slice_of(index)}"

    def run_url(self, run: RunInfo) -> str:
        return f"{self.base_url}/api/v1/metadata/{node_path(run.path)}"

    def stream_url(self, path: str) -> str:
        """The websocket that reports changes of the node at ``path``."""
        ws_base = "wss" + self.base_url[5:] if self.base_url.startswith("https") else "ws" + self.base_url[4:]
        return f"{ws_base}/api/v1/stream/single/{node_path(path)}?envelope_format=msgpack"

    async def recent_runs(self, limit: int) -> list[RunInfo]:
        """The ``limit`` newest runs (by start time), newest first."""
        items = await self._search(self.path, [("sort", "-start.time"), ("page[limit]", str(limit))])
        runs = []
        for item in items:
            run = _run_of(self.path, item)
            if run is not None:
                runs.append(run)
        return runs

    async def run(self, run: RunInfo) -> RunInfo:
        """``run`` as it is now (its stop document appears when it ends)."""
        response = await self.client.get(f"{self.base_url}/api/v1/metadata/{node_path(run.path)}")
        response.raise_for_status()
        fresh = _run_of(self.path, response.json()["data"])
        return fresh if fresh is not None else run

    async def image_array(self, run: RunInfo) -> ImageArray | list[str] | None:
        """The run's image array; the candidates' paths when there are several (``field`` must choose); None
        while the run has none yet."""
        streams = [item["id"] for item in await self._search(run.path, [("fields", "structure_family")])
                   if item["attributes"].get("structure_family") == "container"]  # fmt: skip
        streams.sort(key=lambda name: name != _PREFERRED_STREAM)
        candidates: list[ImageArray] = []
        for stream in streams:
            for item in await self._search(
                f"{run.path}/{stream}", [("fields", "structure_family"), ("fields", "structure")]
            ):
                array = _array_of(f"{run.path}/{stream}", stream, item)
                if array is None:
                    continue
                if self.field is not None:
                    if item["id"] == self.field:
                        return array
                elif len(array.shape) in (3, 4):
                    candidates.append(array)
            if candidates:  # the preferred stream's image arrays win
                break
        if len(candidates) > 1:
            return [array.path for array in candidates]
        return candidates[0] if candidates else None

    async def refresh(self, array: ImageArray) -> ImageArray:
        """``array`` with its current shape."""
        response = await self.client.get(f"{self.base_url}/api/v1/metadata/{node_path(array.path)}")
        response.raise_for_status()
        fresh = _array_of(array.path.rsplit("/", 1)[0], array.stream, response.json()["data"])
        return fresh if fresh is not None else array

    async def read(self, array: ImageArray, start: int, stop: int) -> bytes:
        """The raw bytes of frames ``start``..``stop - 1``; at most their expected size is read."""
        assert array.dtype is not None
        height, width = array.frame_shape
        expected = (stop - start) * height * width * array.dtype.itemsize
        url = f"{self.base_url}/api/v1/array/full/{node_path(array.path)}"
        params = {"slice": f"{start}:{stop}"}
        chunks: list[bytes] = []
        size = 0
        async with self.client.stream("GET", url, params=params,
                                      headers=_RAW) as response:  # fmt: skip
            response.raise_for_status()
            async for chunk in response.aiter_bytes():  # decoded, should the server compress anyway
                size += len(chunk)
                if size > expected:
                    raise ProtocolError(
                        "size_mismatch", f"{array.path}[{start}:{stop}]: more than {expected} bytes"
                    )
                chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) != expected:
            raise ProtocolError(
                "size_mismatch", f"{array.path}[{start}:{stop}]: {len(data)} of {expected} bytes"
            )
        return data

    async def _search(self, path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        response = await self.client.get(f"{self.base_url}/api/v1/search/{node_path(path)}",
                                         params=[("omit_links", "true"), *params])  # fmt: skip
        response.raise_for_status()
        data = response.json().get("data")
        return data if isinstance(data, list) else []


def _run_of(container: str, item: dict[str, Any]) -> RunInfo | None:
    """A run from a Tiled node item, or None when the node is not a bluesky run."""
    metadata = (item.get("attributes") or {}).get("metadata") or {}
    start, stop = metadata.get("start"), metadata.get("stop")
    if not isinstance(start, dict) or not isinstance(start.get("uid"), str):
        return None
    return RunInfo(uid=start["uid"], path=f"{container}/{item['id']}", start=start,
                   stop=stop if isinstance(stop, dict) else None)  # fmt: skip


def _array_of(parent: str, stream: str, item: dict[str, Any]) -> ImageArray | None:
    attributes = item.get("attributes") or {}
    if attributes.get("structure_family") != "array":
        return None
    structure = attributes.get("structure") or {}
    shape = structure.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        return None
    return ImageArray(path=f"{parent}/{item['id']}", stream=stream, shape=tuple(shape),
                      dtype=_dtype(structure.get("data_type")))  # fmt: skip


def _dtype(data_type: Any) -> np.dtype[Any] | None:
    """numpy dtype of Tiled's ``data_type`` (a builtin dtype: kind, itemsize, endianness); None otherwise."""
    if not isinstance(data_type, dict) or "fields" in data_type:
        return None
    kind, itemsize = data_type.get("kind"), data_type.get("itemsize")
    if not isinstance(kind, str) or kind not in _ALLOWED_KINDS or itemsize not in (1, 2, 4, 8):
        return None
    order = {"little": "<", "big": ">"}.get(data_type.get("endianness", ""), "|")
    return np.dtype(f"{order}{kind}{itemsize}")
