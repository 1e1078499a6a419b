"""The FastAPI app clients talk to: websockets (/lse, /ws), REST (/api/*), /metrics and the page.

`create_app` only builds the app; the composition root (stream/serve.py) owns the Hub, the
prometheus registry and the uvicorn server, and may nest its own lifespan (pipeline tasks) inside
the app's through `lifespan=`. Every request passes `access.AccessGuard` (Host, Origin, token, body
size) before any route sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect, WebSocketState

from . import frames, wire
from .access import AccessGuard, AccessPolicy, Refusals
from .clients import Client, ClientClosed
from .hub import Hub
from .wire import ModelInfo, WireFormat

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
WS_CLOSE_UNSUPPORTED = 1003
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class TiledConfig:
    """The Tiled server frames are read from; only URIs under `base_url` are ever fetched."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 30.0
    max_frame_pixels: int = frames.MAX_FRAME_PIXELS  # larger frames are refused before any download
    max_frame_bytes: int = frames.MAX_FRAME_BYTES


@runtime_checkable
class RunCatalog(Protocol):
    """Past runs persisted elsewhere (Tiled); plugged in by the persistence side.

    list_runs: newest first, each a dict with at least `run_id`, and where known `run_name`,
        `started_at`, `stopped_at` (unix seconds), `num_points`.
    run_points: the run's points as REST rows (`operators.point_row.rest_row`: the point row's fields under
        their wire names), or None for an unknown run.
    """

    async def list_runs(self, limit: int) -> list[dict[str, Any]]: ...

    async def run_points(self, run_id: str) -> list[dict[str, Any]] | None: ...


class AggregateRequest(BaseModel):
    urls: list[str] = Field(min_length=1)
    stat: Literal["mean", "std"] = "mean"
    cmap: frames.Colormap = "gray"


def _json(obj: Any, status_code: int = 200) -> Response:
    return Response(content=wire.dumps(obj), media_type="application/json", status_code=status_code)


def create_app(
    hub: Hub,
    *,
    registry: CollectorRegistry,
    model_info: ModelInfo | None = None,
    reference_embedding: np.ndarray | None = None,
    reference_clusters: np.ndarray | None = None,
    reference_frame: Callable[[int], np.ndarray] | None = None,
    tiled: TiledConfig | None = None,
    source_tiled: TiledConfig | None = None,
    token: str | None = None,
    allowed_hosts: Collection[str] = (),
    allowed_origins: Collection[str] = (),
    metrics_public: bool = False,
    max_body_bytes: int = 1 << 20,
    run_catalog: RunCatalog | None = None,
    health_extra: Callable[[], Mapping[str, Any]] | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    max_aggregate: int = 200,
    runs_limit: int = 100,
    static_dir: Path = STATIC_DIR,
) -> FastAPI:
    """Build the bridge app.

    hub: the Hub the pipeline publishes to (same event loop as the server).
    registry: rendered by GET /metrics (register the hub's and the pipeline's collectors on it).
    model_info: the bundle's model names (default: the hub's).
    reference_embedding / reference_clusters: the bundle's (N, 2) reference map and (N,) labels.
    reference_frame: reads reference point i's frame from where the bundle recorded it (blocking; raises
        IndexError / LookupError when it cannot); GET /api/reference/frame/{i} renders it. None: 404.
    tiled: where /api/frame and /api/aggregate read frames; None disables them (503).
    source_tiled: a second server frames are read from: the Tiled a ``tiled://`` source follows, whose frames'
        URIs point there (the service does not store them again).
    token: when set, every route but the page (`/`, `/static/`) requires it (`?token=` or
        `Authorization: Bearer`), /metrics too unless `metrics_public`.
    allowed_hosts: host names clients may address the service by, besides the loopback names ("*": any).
    allowed_origins: web origins ("scheme://host[:port]") whose pages may use the service, besides its own
        and loopback ones ("*": any).
    max_body_bytes: largest request body read (413 beyond, before any route parses it).
    run_catalog: past runs beyond memory (e.g. persisted in Tiled).
    health_extra: extra keys merged into GET /api/health (e.g. ingest counters).
    lifespan: the caller's own lifespan, entered inside the app's (start pipeline tasks there).
    max_aggregate: most frames one POST /api/aggregate may name (413 beyond).
    """
    model = model_info or hub.model_info
    reference_body = _reference_body(
        model, reference_embedding, reference_clusters, reference_frame is not None
    )
    started = time.time()

    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        servers = [c for c in (tiled, source_tiled) if c is not None]
        fetcher = frames.FrameFetchers([
            frames.FrameFetcher(c.base_url, c.api_key, timeout_s=c.timeout_s, max_frame_pixels=c.max_frame_pixels,
                                max_frame_bytes=c.max_frame_bytes)
            for c in servers
        ]) if servers else None  # fmt: skip
        app.state.fetcher = fetcher
        try:
            if lifespan is not None:
                async with lifespan(app):
                    yield
            else:
                yield
        finally:
            hub.close_all()
            if fetcher is not None:
                await fetcher.aclose()

    app = FastAPI(title="latent-stream bridge", lifespan=app_lifespan, docs_url=None, redoc_url=None)
    refusals = Refusals()
    registry.register(refusals)
    policy = AccessPolicy(allowed_hosts, allowed_origins, token, metrics_public, max_body_bytes)
    app.add_middleware(AccessGuard, policy=policy, refusals=refusals)

    def fetcher_of(request: Request) -> frames.FrameFetchers:
        fetcher = getattr(request.app.state, "fetcher", None)
        if fetcher is None:
            raise HTTPException(status_code=503, detail="no Tiled server configured for frames")
        return fetcher

    # -- websockets -----------------------------------------------------------------------------

    async def serve_websocket(websocket: WebSocket, endpoint: str, fmt: WireFormat, backfill: bool) -> None:
        # Register before accepting: whatever is published once the client sees the handshake is queued.
        client = hub.connect(endpoint, fmt, backfill=backfill)
        tasks: set[asyncio.Task[None]] = set()
        try:
            await websocket.accept()
            sender = asyncio.create_task(_send_loop(websocket, client))
            receiver = asyncio.create_task(_receive_loop(websocket))
            closed = asyncio.create_task(client.wait_closed())
            tasks = {sender, receiver, closed}
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            close = client.close_reason  # set when the hub closed it (slow client, shutdown)
            hub.disconnect(client)
            if close is not None and websocket.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(websocket.close(close.code, close.reason), CLOSE_TIMEOUT_S)

    async def refuse(websocket: WebSocket, code: int, reason: str) -> None:
        """Accept, then close with a code the client can read (a refused handshake only says 403)."""
        logger.warning("refused websocket %s from %s: %s", websocket.url.path, websocket.client, reason)
        await websocket.accept()
        await websocket.close(code, reason)

    @app.websocket("/lse")
    async def lse_socket(websocket: WebSocket, backfill: bool = False) -> None:
        """The Latent Space Explorer's live feed: point messages only, JSON text."""
        await serve_websocket(websocket, "lse", WireFormat.LSE_JSON, backfill)

    @app.websocket("/ws")
    async def ws_socket(websocket: WebSocket, format: str = "json", backfill: bool = True) -> None:
        """The full typed stream: backfill of the current run, then live."""
        fmt = {"json": WireFormat.WS_JSON, "msgpack": WireFormat.WS_MSGPACK}.get(format)
        if fmt is None:
            return await refuse(websocket, WS_CLOSE_UNSUPPORTED, "format must be json or msgpack")
        await serve_websocket(websocket, "ws", fmt, backfill)

    # -- REST -----------------------------------------------------------------------------------

    @app.get("/api/health")
    async def health() -> Response:
        current = hub.current.summary(current=True) if hub.current is not None else None
        body: dict[str, Any] = {
            "status": "ok",
            "uptime_s": round(time.time() - started, 3),
            "current_run": current,
            "clients": hub.client_counts(),
            "counters": {
                "points": hub.points_total,
                "connections": hub.clients_total,
                "dropped": dict(hub.dropped),
                "refused": dict(refusals.counts),
            },
            "frames_per_s": round(hub.frames_per_second(), 3),
            "stage_p50_ms": hub.stage_p50_ms(),
            "model": {"autoencoder_model": model.autoencoder_model, "dimred_model": model.dimred_model},
            "tiled": tiled.base_url if tiled else None,
        }
        if health_extra is not None:
            body.update(health_extra())
        return _json(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(content=generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/runs")
    async def runs(limit: int = Query(runs_limit, ge=1, le=10_000)) -> Response:
        listed = hub.runs()
        known = {run["run_key"] for run in listed}  # a reused run id is two runs
        body: dict[str, Any] = {"current": hub.current.run_id if hub.current else None}
        if run_catalog is not None:
            try:
                for run in await run_catalog.list_runs(limit):
                    if run.get("run_key") not in known:
                        listed.append({**run, "current": False, "active": False, "source": "catalog"})
                        known.add(run.get("run_key"))
            except Exception as exc:  # noqa: BLE001 - live runs must still be listed when the catalog fails
                logger.warning("run catalog failed to list runs: %s", exc)
                body["catalog_error"] = str(exc) or type(exc).__name__
        body["runs"] = listed[:limit]
        return _json(body)

    @app.get("/api/runs/{run_id}/points")
    async def run_points(run_id: str) -> Response:
        rows = hub.run_rows(run_id)
        if rows is None and run_catalog is not None:
            try:
                rows = await run_catalog.run_points(run_id)
            except Exception as exc:
                logger.warning("run catalog failed for run %s: %s", run_id, exc)
                raise HTTPException(status_code=502, detail=f"run catalog failed: {exc}") from exc
        if rows is None:
            raise HTTPException(status_code=404, detail=f"unknown run {run_id!r}")
        return _json(rows)

    @app.get("/api/reference")
    async def reference() -> Response:
        if reference_body is None:
            raise HTTPException(status_code=404, detail="the model bundle has no reference embedding")
        return Response(content=reference_body, media_type="application/json")

    @app.get("/api/reference/frame/{index}")
    async def reference_frame_png(index: int, cmap: frames.Colormap = "gray") -> Response:
        # Only the frames the bundle itself recorded, by their reference index: the client names no path.
        if reference_frame is None:
            raise HTTPException(status_code=404, detail="the model bundle records no reference frames")
        try:
            image = await asyncio.to_thread(reference_frame, index)
        except IndexError as exc:
            raise HTTPException(status_code=404, detail=f"no reference point {index}") from exc
        except (LookupError, OSError, ValueError) as exc:
            logger.warning("reference frame %d unreadable: %s", index, exc)
            raise HTTPException(status_code=502, detail=f"reference frame {index} is not readable") from exc
        png = await asyncio.to_thread(frames.render_frame_png, image, cmap)
        return Response(
            content=png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @app.get("/api/frame")
    async def frame(
        request: Request, url: str = Query(..., min_length=1), cmap: frames.Colormap = "gray"
    ) -> Response:
        fetcher = fetcher_of(request)
        try:
            image = await fetcher.fetch(url)
        except frames.FrameError as exc:
            raise _http_error(exc, url) from exc
        png = await asyncio.to_thread(frames.render_frame_png, image, cmap)
        return Response(
            content=png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @app.post("/api/aggregate")
    async def aggregate(request: Request, body: AggregateRequest) -> Response:
        if len(body.urls) > max_aggregate:
            raise HTTPException(
                status_code=413,
                detail=f"{len(body.urls)} frames requested; at most {max_aggregate} per request",
            )
        fetcher = fetcher_of(request)
        try:
            result = await frames.aggregate(fetcher, body.urls, body.stat)
        except frames.FrameError as exc:
            raise _http_error(exc, f"{len(body.urls)} frames") from exc

        def render() -> bytes:
            return frames.encode_png(frames.log_scale(result.image, result.valid), body.cmap)

        png = await asyncio.to_thread(render)
        counts = {"X-Frame-Count": str(result.frames), "X-Frames-Missing": str(result.missing)}
        return Response(content=png, media_type="image/png", headers=counts)

    # -- the page -------------------------------------------------------------------------------

    @app.get("/")
    async def index() -> FileResponse:
        page = static_dir / "index.html"
        if not page.is_file():
            raise HTTPException(status_code=404, detail="the live page is not installed")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")

    return app


async def _send_loop(websocket: WebSocket, client: Client) -> None:
    try:
        while True:
            for payload in await client.next_batch():
                if isinstance(payload, str):
                    await websocket.send_text(payload)
                else:
                    await websocket.send_bytes(payload)
    except ClientClosed:
        return
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # the peer went away mid-send
        logger.debug("send to %r ended: %s", client, exc)


async def _receive_loop(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, to notice when it leaves."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


def _http_error(exc: frames.FrameError, what: str) -> HTTPException:
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    logger.log(level, "frame request failed (%s): %s", what[:200], exc)
    return HTTPException(status_code=exc.status_code, detail=str(exc))


def _reference_body(
    model: ModelInfo, embedding: np.ndarray | None, clusters: np.ndarray | None, has_frames: bool = False
) -> bytes | None:
    """The reference map, encoded once: {x: [...], y: [...], cluster: [...], frames: bool} plus model names."""
    if embedding is None:
        return None
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"reference_embedding must have shape (N, 2), got {embedding.shape}")
    n = embedding.shape[0]
    if clusters is None:
        labels = np.full(n, -1, dtype=np.int64)
    else:
        labels = np.asarray(clusters, dtype=np.int64).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"reference_clusters has {labels.shape[0]} labels for {n} points")
    return wire.dumps(
        {
            "autoencoder_model": model.autoencoder_model,
            "dimred_model": model.dimred_model,
            "count": n,
            "x": np.ascontiguousarray(embedding[:, 0]),  # orjson serialises contiguous arrays only
            "y": np.ascontiguousarray(embedding[:, 1]),
            "cluster": labels,
            "frames": has_frames,  # GET /api/reference/frame/{i} serves reference point i's frame
        }
    )
