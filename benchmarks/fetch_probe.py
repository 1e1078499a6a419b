"""A client of stored frames: is each frame fetchable by its URI within a window of its point?

Used by both embedded-mode measurements (`e2e.py`, `persist.py`). Each watched frame is asked for once, `window_s`
after its point: a one-pixel slice. Only a frame that was not there yet is polled on, every `interval_s` and one at
a time, to see how late it was. Asking once is the point: each request costs the embedded Tiled ~30 ms of CPU
whatever its size, and a client that polled every frame from its point on slowed the very writer it measured.
Whole frames are checked byte-identical afterwards, untimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import httpx
import numpy as np


class FetchProbe:
    def __init__(self, api_key: str | None, window_s: float, interval_s: float = 0.5, give_up_s: float = 30.0) -> None:
        headers = {"Accept": "application/octet-stream"}
        if api_key:
            headers["Authorization"] = f"Apikey {api_key}"
        self._client = httpx.AsyncClient(timeout=10, headers=headers, trust_env=False)
        self.window_s = window_s
        self.interval_s = interval_s
        self.give_up_s = max(give_up_s, window_s)
        self.urls: dict[int, str] = {}
        self.on_time: set[int] = set()  # answered at the first ask
        self.late_s: dict[int, float] = {}  # missed the window -> point to when it did answer
        self._tasks: list[asyncio.Task[None]] = []
        self._late = asyncio.Lock()

    def watch(self, index: int, url: str, point_at: float) -> None:
        """Ask for frame `index` `window_s` after `point_at` (a `time.perf_counter()` instant)."""
        self.urls[index] = url
        self._tasks.append(asyncio.create_task(self._check(index, _pixel_url(url), point_at)))

    async def _answers(self, url: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return (await self._client.get(url)).status_code == 200
        return False

    async def _check(self, index: int, url: str, point_at: float) -> None:
        await asyncio.sleep(max(0.0, point_at + self.window_s - time.perf_counter()))
        if await self._answers(url):
            self.on_time.add(index)
            return
        async with self._late:
            while time.perf_counter() - point_at <= self.give_up_s:
                if await self._answers(url):
                    self.late_s[index] = time.perf_counter() - point_at
                    return
                await asyncio.sleep(self.interval_s)

    async def finish(self) -> None:
        """Until every watched frame answered or was given up on."""
        await asyncio.gather(*self._tasks)

    async def identical(self, urls: Mapping[int, str], frames: Mapping[int, np.ndarray]) -> int:
        """How many of the frames at `urls` (index -> URI) fetch back whole and byte-identical to `frames`."""
        ok = 0
        for index, url in sorted(urls.items()):
            expected = frames.get(index)
            with contextlib.suppress(httpx.HTTPError):
                r = await self._client.get(url)
                ok += int(r.status_code == 200 and expected is not None and r.content == expected.tobytes())
        return ok

    async def aclose(self) -> None:
        await self._client.aclose()


def _pixel_url(url: str) -> str:
    # .../primary/image?slice=<i>  ->  ?slice=<i>,0:1,0:1 (one pixel of that frame)
    return f"{url},0:1,0:1" if "slice=" in url else url
