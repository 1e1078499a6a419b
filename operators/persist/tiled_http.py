"""The data of a run (frames, latent vectors, table rows) to Tiled as plain async PATCHes.

One kept-alive connection, on the event loop: the Tiled client copies each frame (tobytes), is synchronous
(a worker thread per call) and re-reads node metadata on every lookup; that cost ~110 ms of CPU per 10 MB
frame in this process (benchmarks/persist.py). Every write here is idempotent (same slices, same bytes),
except a table append, which the writer guards (it reads back which rows landed before retrying).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from operators.persist.schema import APACHE_ARROW_FILE
from operators.tiled_layout import auth_headers


class TiledHttp:
    """PATCHes below `root` of the Tiled server at `base_url`."""

    def __init__(self, base_url: str, api_key: str | None, *, root: str = "", timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._root = [p for p in root.strip("/").split("/") if p]
        headers = auth_headers(api_key)
        self.client = httpx.AsyncClient(
            headers=headers, timeout=timeout, trust_env=False,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        )  # fmt: skip

    def path(self, *parts: str) -> str:
        """A node's path below /api/v1/<route>/, quoted."""
        return "/".join(quote(p, safe="") for p in (*self._root, *parts))

    async def patch_frames(self, run_key: str, first: int, images: Sequence[np.ndarray]) -> None:
        """Slices first, first + 1, ... of /<run_key>/primary/image in one request."""
        frames = [np.ascontiguousarray(im) for im in images]

        async def body() -> AsyncIterator[memoryview]:  # the frames' own buffers in turn: no copy here
            for f in frames:
                yield memoryview(f).cast("B")

        shape = ",".join(map(str, (len(frames), *frames[0].shape)))
        await self._patch(f"array/full/{self.path(run_key, 'primary', 'image')}",
                          {"offset": str(first), "shape": shape, "extend": "true"}, body(),
                          sum(f.nbytes for f in frames), "application/octet-stream")  # fmt: skip

    async def patch_vectors(self, run_key: str, first_row: int, vectors: np.ndarray) -> None:
        """Rows first_row, ... of /<run_key>/latent/vectors ((n, D) float32)."""
        vec = np.ascontiguousarray(vectors, dtype=np.float32)
        await self._patch(f"array/full/{self.path(run_key, 'latent', 'vectors')}",
                          {"offset": str(first_row), "shape": ",".join(map(str, vec.shape)), "extend": "true"},
                          vec.tobytes(), vec.nbytes, "application/octet-stream")  # fmt: skip

    async def append_table(self, run_key: str, table: str, arrow_file: bytes) -> None:
        """Rows (one Arrow IPC file, schema.arrow_file) appended to /<run_key>/latent/<table>."""
        await self._patch(f"table/partition/{self.path(run_key, 'latent', table)}", {"partition": "0"},
                          arrow_file, len(arrow_file), APACHE_ARROW_FILE)  # fmt: skip

    async def _patch(self, route: str, params: dict[str, str], body: Any, length: int, media_type: str) -> None:
        r = await self.client.patch(
            f"{self.base_url}/api/v1/{route}", params=params, content=body,
            headers={"Content-Type": media_type, "Content-Length": str(length)},
        )  # fmt: skip
        r.raise_for_status()

    async def aclose(self) -> None:
        await self.client.aclose()
