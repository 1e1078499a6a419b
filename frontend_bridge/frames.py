"""Frames fetched back from Tiled by their URI, and rendered as log-scaled PNGs.

Only URIs on the configured Tiled server are fetched (the bridge holds the API key; it must never
become an open proxy), and only when the array's structure says the URI selects one frame of a
bounded size: nothing larger is ever downloaded. A frame costs two small requests at most: the
array's structure from `/api/v1/metadata/{path}` (cached per array; refreshed when an index lies
beyond the cached length of an appendable stack) and the raw bytes from
`/api/v1/array/full/{path}?slice=...` with `Accept: application/octet-stream` (Tiled's cheapest
encoding: no server-side image codec).

Errors from httpx and Tiled are translated into `FrameError` subclasses carrying the HTTP status
the bridge should answer with.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

import httpx
import numpy as np

from operators.tiled_layout import NodeURI, auth_headers, parse_node_uri

logger = logging.getLogger(__name__)

# The ingest's default frame bounds: any frame the service accepts can be shown.
MAX_FRAME_PIXELS = 4096 * 4096
MAX_FRAME_BYTES = MAX_FRAME_PIXELS * 8


class FrameError(Exception):
    """Base of the frame-fetching errors; `status_code` is the HTTP status to answer with."""

    status_code = 500


class FrameURLRejected(FrameError):
    """The URL is not a frame URI on the configured Tiled server."""

    status_code = 403


class BadFrameURL(FrameError):
    """The URL is on the Tiled server but cannot be read as a frame (bad slice, not an array)."""

    status_code = 422


class FrameTooLarge(BadFrameURL):
    """The URI selects one frame, but larger than the bridge renders."""


class FrameNotFound(FrameError):
    status_code = 404


class TiledFetchFailed(FrameError):
    """Tiled could not be reached, refused the bridge's key, or answered with an error."""

    status_code = 502


class TiledTimeout(FrameError):
    status_code = 504


class FrameDecodeError(FrameError):
    """Tiled's answer does not match the array's declared dtype and shape."""

    status_code = 502


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    dtype: np.dtype
    shape: tuple[int, ...]


def parse_slice(expr: str) -> tuple[int | slice, ...]:
    """Tiled's `slice` grammar: comma-separated ints or start:stop[:step]."""
    if not expr:
        return ()
    out: list[int | slice] = []
    try:
        for part in expr.split(","):
            part = part.strip()
            if ":" in part:
                bounds = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError(part)
                out.append(slice(*bounds))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise BadFrameURL(f"cannot parse slice {expr!r}") from exc
    return tuple(out)


def _dtype(data_type: dict) -> np.dtype:
    order = {"little": "<", "big": ">"}.get(data_type.get("endianness", ""), "|")
    try:
        return np.dtype(f"{order}{data_type['kind']}{data_type['itemsize']}")
    except (KeyError, TypeError) as exc:
        raise FrameDecodeError(f"unsupported Tiled data_type {data_type!r}") from exc


class FrameFetcher:
    """Fetches frames from one Tiled server by URI (async httpx, the server's API key)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 30.0,
        max_concurrency: int = 8,
        structure_cache: int = 64,
        max_frame_pixels: int = MAX_FRAME_PIXELS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Tiled base URL must be http(s)://host[:port][/prefix], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._origin = (
            parts.scheme,
            parts.hostname.lower(),
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        self._prefix = parts.path.rstrip("/") + "/"
        headers = auth_headers(api_key)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._headers = headers
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._structures: OrderedDict[str, ArrayInfo] = OrderedDict()
        self._structure_cache = structure_cache
        self._max_pixels = max_frame_pixels
        self._max_bytes = max_frame_bytes

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def parse(self, url: str) -> NodeURI:
        """Accept only frame URIs on the configured server; anything else is FrameURLRejected."""
        try:
            node = parse_node_uri(url)
            parts = urlsplit(node.base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FrameURLRejected(f"{exc}: {url!r}") from exc
        origin = (parts.scheme, (parts.hostname or "").lower(), port)
        if origin != self._origin or parts.path + "/" != self._prefix:
            raise FrameURLRejected(f"only frames on {self.base_url} can be fetched")
        if not node.path or any(seg in ("", ".", "..") for seg in node.path.split("/")):
            raise BadFrameURL(f"bad array path {node.path!r}")
        return node

    async def fetch(self, url: str) -> np.ndarray:
        """The frame at `url` as a 2-D array in its stored dtype."""
        ref = self.parse(url)
        async with self._semaphore:
            info = await self._structure(ref.path)
            key = parse_slice(ref.slice_expr)
            first = key[0] if key else None
            if isinstance(first, int) and info.shape and not -info.shape[0] <= first < info.shape[0]:
                info = await self._structure(ref.path, refresh=True)  # the stack may have grown
                if not -info.shape[0] <= first < info.shape[0]:
                    raise FrameNotFound(f"frame {first} is beyond {ref.path} (length {info.shape[0]})")
            what = f"{ref.path}?slice={ref.slice_expr}"
            out_shape = _sliced_shape(info.shape, key)
            frame_shape = _frame_shape(out_shape, what)  # checked before anything is downloaded
            expected = math.prod(out_shape) * info.dtype.itemsize
            if math.prod(frame_shape) > self._max_pixels or expected > self._max_bytes:
                raise FrameTooLarge(
                    f"{what} is a {frame_shape[0]}x{frame_shape[1]} {info.dtype} frame ({expected} bytes); "
                    f"at most {self._max_pixels} pixels and {self._max_bytes} bytes are rendered"
                )
            response = await self._get(
                f"{self.base_url}/api/v1/array/full/{quote(ref.path)}",
                params={"slice": ref.slice_expr} if ref.slice_expr else None,
                accept="application/octet-stream",
                what=f"frame {what}",
            )
        if len(response.content) != expected:
            raise FrameDecodeError(
                f"Tiled sent {len(response.content)} bytes for {what}; "
                f"expected {expected} ({info.dtype} x {out_shape})"
            )
        return np.frombuffer(response.content, dtype=info.dtype).reshape(frame_shape)

    async def _structure(self, path: str, *, refresh: bool = False) -> ArrayInfo:
        if not refresh and path in self._structures:
            self._structures.move_to_end(path)
            return self._structures[path]
        response = await self._get(
            f"{self.base_url}/api/v1/metadata/{quote(path)}", accept="application/json", what=f"array {path}"
        )
        try:
            attributes = response.json()["data"]["attributes"]
            if attributes.get("structure_family") not in (None, "array"):
                raise BadFrameURL(f"{path} is a {attributes['structure_family']}, not an array")
            structure = attributes["structure"]
            info = ArrayInfo(dtype=_dtype(structure["data_type"]), shape=tuple(structure["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameDecodeError(f"unexpected metadata from Tiled for {path}") from exc
        self._structures[path] = info
        while len(self._structures) > self._structure_cache:
            self._structures.popitem(last=False)
        return info

    async def _get(self, url: str, *, params: dict | None = None, accept: str, what: str) -> httpx.Response:
        try:
            response = await self._client.get(url, params=params, headers={**self._headers, "Accept": accept})
        except httpx.TimeoutException as exc:
            raise TiledTimeout(f"Tiled did not answer in time for {what}") from exc
        except httpx.HTTPError as exc:
            raise TiledFetchFailed(f"cannot reach Tiled at {self.base_url}: {exc}") from exc
        if response.status_code == 404:
            raise FrameNotFound(f"{what} not found in Tiled")
        if response.status_code in (401, 403):
            raise TiledFetchFailed(f"Tiled refused the bridge's API key ({response.status_code}) for {what}")
        if response.status_code == 422 or response.status_code == 400:
            raise BadFrameURL(f"Tiled rejected the request for {what}: {response.text[:200]}")
        if response.status_code >= 400:
            raise TiledFetchFailed(f"Tiled answered {response.status_code} for {what}")
        return response


def _frame_shape(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """The 2-D frame a selection of `shape` is, unit axes dropped; BadFrameURL when it is not one frame."""
    dims = [n for n in shape if n != 1]
    if len(dims) > 2 or 0 in dims:
        raise BadFrameURL(f"{what} is not one frame: it selects shape {shape}")
    if len(dims) == 2:
        return dims[0], dims[1]
    return 1, dims[0] if dims else 1


def _sliced_shape(shape: tuple[int, ...], key: tuple[int | slice, ...]) -> tuple[int, ...]:
    """Shape of `array[key]` without touching data (a zero-stride view)."""
    if len(key) > len(shape):
        raise BadFrameURL(f"slice has {len(key)} dimensions; the array has {len(shape)}")
    view = np.lib.stride_tricks.as_strided(
        np.zeros(1, dtype=np.uint8), shape=shape, strides=(0,) * len(shape)
    )
    try:
        return view[key].shape
    except IndexError as exc:
        raise FrameNotFound(f"slice out of range for shape {shape}") from exc
    except ValueError as exc:  # e.g. a zero step
        raise BadFrameURL(f"bad slice for shape {shape}: {exc}") from exc


# -- rendering ----------------------------------------------------------------------------------

Colormap = Literal["gray", "viridis", "magma"]


def valid_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels that carry counts: detector gaps and bad pixels are negative (Pilatus: -1, -2), NaN in floats."""
    if frame.dtype.kind == "f":
        return np.isfinite(frame) & (frame >= 0)
    if frame.dtype.kind == "i":
        return frame >= 0
    return np.ones(frame.shape, dtype=bool)


def log_scale(
    frame: np.ndarray, mask: np.ndarray | None = None, *, high_percentile: float = 99.9
) -> np.ndarray:
    """log1p of the counts mapped to uint8: 0 at the lowest valid value, 255 at the high percentile.

    Clipping at a high percentile rather than the maximum keeps a few hot pixels from washing out
    the image; masked pixels (gaps, bad pixels) render as 0.
    """
    mask = valid_mask(frame) if mask is None else mask
    out = np.zeros(frame.shape, dtype=np.uint8)
    if not mask.any():
        return out
    logged = np.log1p(np.where(mask, frame, 0).astype(np.float32, copy=False).clip(min=0))
    values = logged[mask]
    lo = float(values.min())
    hi = float(np.percentile(values, high_percentile))
    if hi <= lo:
        hi = float(values.max())
    if hi <= lo:
        out[mask] = 255 if lo > 0 else 0
        return out
    scaled = (logged - lo) * (255.0 / (hi - lo))
    np.clip(scaled, 0, 255, out=scaled)
    out[mask] = scaled[mask].astype(np.uint8)
    return out


def encode_png(gray: np.ndarray, cmap: Colormap = "gray") -> bytes:
    """PNG bytes of a uint8 image, optionally through a colormap."""
    import cv2  # imported here so that `import frontend_bridge` stays light

    image = gray
    if cmap != "gray":
        table = {"viridis": cv2.COLORMAP_VIRIDIS, "magma": cv2.COLORMAP_MAGMA}[cmap]
        image = cv2.applyColorMap(gray, table)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def render_frame_png(frame: np.ndarray, cmap: Colormap = "gray") -> bytes:
    return encode_png(log_scale(frame), cmap)


class FrameAccumulator:
    """Per-pixel mean and standard deviation over frames, one frame at a time (bounded memory).

    Masked pixels (gaps, bad pixels) do not count; a pixel valid in no frame stays masked.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shape: tuple[int, ...] | None = None
        self._n: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sumsq: np.ndarray | None = None

    def add(self, frame: np.ndarray) -> None:
        if self._shape is None:
            self._shape = frame.shape
            self._n = np.zeros(frame.shape, dtype=np.int32)
            self._sum = np.zeros(frame.shape, dtype=np.float64)
            self._sumsq = np.zeros(frame.shape, dtype=np.float64)
        elif frame.shape != self._shape:
            raise ValueError(f"frame shape {frame.shape} differs from the first frame's {self._shape}")
        assert self._n is not None and self._sum is not None and self._sumsq is not None
        mask = valid_mask(frame)
        values = np.where(mask, frame, 0).astype(np.float64)
        self._n += mask
        self._sum += values
        self._sumsq += values * values
        self.count += 1

    def result(self, stat: Literal["mean", "std"]) -> tuple[np.ndarray, np.ndarray]:
        """(image, valid mask) for the statistic."""
        if self._n is None or self._sum is None or self._sumsq is None:
            raise ValueError("no frames")
        valid = self._n > 0
        n = np.maximum(self._n, 1)
        mean = self._sum / n
        if stat == "mean":
            return mean, valid
        var = np.maximum(self._sumsq / n - mean * mean, 0.0)
        return np.sqrt(var), valid


@dataclass(frozen=True, slots=True)
class Aggregate:
    image: np.ndarray
    valid: np.ndarray
    frames: int  # how many frames went into the image
    missing: int  # how many named frames are not (yet) in Tiled


class FrameFetchers:
    """Several Tiled servers' fetchers behind one `parse`/`fetch`: a URI is read by the fetcher of its server.

    The service's own Tiled (the frames it stores) and, with a ``tiled://`` source, the beamline's Tiled the
    source follows (its frames are never stored twice, so their URIs point there). A URI on no configured
    server is FrameURLRejected, as with one fetcher.
    """

    def __init__(self, fetchers: Sequence[FrameFetcher]) -> None:
        if not fetchers:
            raise ValueError("at least one fetcher")
        self._fetchers = tuple(fetchers)

    def _fetcher_of(self, url: str) -> FrameFetcher:
        for fetcher in self._fetchers:
            try:
                fetcher.parse(url)
            except FrameURLRejected:
                continue
            return fetcher
        servers = " or ".join(f.base_url for f in self._fetchers)
        raise FrameURLRejected(f"only frames on {servers} can be fetched")

    def parse(self, url: str) -> NodeURI:
        return self._fetcher_of(url).parse(url)

    async def fetch(self, url: str) -> np.ndarray:
        return await self._fetcher_of(url).fetch(url)

    async def aclose(self) -> None:
        for fetcher in self._fetchers:
            await fetcher.aclose()


async def aggregate(
    fetcher: FrameFetcher | FrameFetchers, urls: Sequence[str], stat: Literal["mean", "std"], *, workers: int = 4
) -> Aggregate:
    """Fetch `urls` a few at a time and reduce them to one image and its valid mask.

    A fixed number of workers each fetch one frame and fold it in before fetching the next, so at
    most `workers` frames are in memory however many are asked for (Pilatus frames are ~10 MB).
    Frames not yet in Tiled (the writer trails the live points) are skipped and counted as missing;
    only when none is there does the request fail.
    """
    for url in urls:
        fetcher.parse(url)  # reject foreign URLs before fetching anything
    acc = FrameAccumulator()
    pending = iter(urls)  # shared: each worker takes the next URL
    fold = asyncio.Lock()

    missing = 0

    async def worker() -> None:
        nonlocal missing
        for url in pending:
            try:
                frame = await fetcher.fetch(url)
            except FrameNotFound:
                missing += 1
                continue
            async with fold:
                try:
                    await asyncio.to_thread(acc.add, frame)
                except ValueError as exc:
                    raise BadFrameURL(str(exc)) from exc

    tasks = [asyncio.create_task(worker()) for _ in range(min(workers, len(urls)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if acc.count == 0:
        raise FrameNotFound(f"none of the {len(urls)} selected frames is in Tiled yet")
    image, valid = acc.result(stat)
    return Aggregate(image, valid, frames=acc.count, missing=missing)
