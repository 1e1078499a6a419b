"""Frames written straight into the embedded Tiled's own storage: a memory copy and the disk, not a PATCH.

The embedded server runs on this machine with its data under the service's data directory, and stores a
run's frame stack as a zarr array. Sending each 10 MB frame through HTTP cost that server ~100 ms of CPU
(request handling, a copy, the catalog's structure rewritten per frame) and topped out near 10 frames/s.
Here the writer opens the same zarr array (its path is in the array's data source), writes the frames into
it itself (Blosc-LZ4 chunks, one per frame, each file written whole then renamed into place by zarr), and
then tells Tiled the new length with one small request per batch (`PUT /api/v1/data_source/...`): the frames
are fetchable by the usual URIs, byte-identical, once that request returns. A facility Tiled elsewhere keeps
the HTTP path (writer.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np


class LocalStoreError(Exception):
    """The embedded server's array is not one this process can write (not a local zarr array)."""


@dataclass(slots=True)
class _LocalArray:
    data_source: dict[str, Any]  # as Tiled describes it; its structure is what Tiled serves
    array: Any  # zarr.Array, opened read-write
    visible: int  # frames Tiled's structure covers (slices 0 .. visible - 1)


class LocalFrameStore:
    """Runs' frame stacks (N, H, W) in the embedded Tiled's zarr storage, written from this process.

    `path` is a node's URL path below /api/v1/<route>/ (quoted); `http` carries the server's key.
    """

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._arrays: dict[str, _LocalArray] = {}

    def knows(self, path: str) -> bool:
        return path in self._arrays

    async def open(self, path: str) -> None:
        """Find the zarr array behind Tiled's node at `path` (an array Tiled created and manages)."""
        r = await self._http.get(f"{self._base}/api/v1/metadata/{path}", params={"include_data_sources": "true"})
        r.raise_for_status()
        sources = r.json()["data"]["attributes"]["data_sources"]
        if len(sources) != 1 or sources[0]["mimetype"] != "application/x-zarr":
            raise LocalStoreError(f"{path} is not one zarr array: {[s['mimetype'] for s in sources]}")
        source = sources[0]
        uri = urlsplit(source["assets"][0]["data_uri"])
        if uri.scheme != "file" or uri.netloc not in ("", "localhost"):
            raise LocalStoreError(f"{path} is stored at {uri.geturl()}, not on this machine")
        array = await asyncio.to_thread(_open_zarr, unquote(uri.path))
        self._arrays[path] = _LocalArray(source, array, int(source["structure"]["shape"][0]))

    async def write(self, path: str, first: int, images: Sequence[np.ndarray]) -> None:
        """Slices first, first + 1, ... of the stack, then Tiled's structure extended to cover them.

        Idempotent (same slices, same bytes): safe to retry.
        """
        local = self._arrays[path]
        end = first + len(images)
        await asyncio.to_thread(_write_frames, local.array, first, images)
        if end <= local.visible:
            return
        structure = {**local.data_source["structure"]}
        structure["shape"] = [end, *structure["shape"][1:]]
        structure["chunks"] = [[1] * end, *structure["chunks"][1:]]
        data_source = {**local.data_source, "structure": structure}
        r = await self._http.put(f"{self._base}/api/v1/data_source/{path}", json={"data_source": data_source})
        r.raise_for_status()
        local.data_source, local.visible = data_source, end

    def forget(self, path: str) -> None:
        """The run is closed: nothing more will be written to it."""
        self._arrays.pop(path, None)


def _open_zarr(path: str) -> Any:
    import zarr

    # Frames are never all zeros worth skipping; the check costs a pass over every frame.
    return zarr.open_array(path, mode="r+", config={"write_empty_chunks": True})


def _write_frames(array: Any, first: int, images: Sequence[np.ndarray]) -> None:
    end = first + len(images)
    if array.shape[0] < end:
        array.resize((end, *array.shape[1:]))
    for i, image in enumerate(images):
        array[first + i] = image
