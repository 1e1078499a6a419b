"""``latent-stream serve``: the composition root of the live path.

One explicit lifecycle (`Service.run`):

  start: model bundle (load + warm-up), the embedded Tiled server's launch and the Tiled client modules,
         concurrently -> Tiled writer -> websocket hub + FastAPI app on uvicorn -> pipeline -> ZeroMQ ingest.
         Frames are taken as soon as the model is warm: the embedded Tiled server finishes starting in
         the background (~10 s on 2 cores) while the writer holds what is published meanwhile, so the
         first point does not wait for it. An unreachable Tiled is waited for; an embedded one that cannot
         start, or a Tiled that refuses the writer (wrong API key), stops the service with its error.
  stop (SIGINT / SIGTERM / `Service.request_stop`), in reverse:
         ingest (socket closed) -> pipeline drains for ``drain_timeout`` then is cancelled; what is left
         is counted as dropped{shutdown} and the open run is closed (reason "shutdown")
         -> Tiled writer drains briefly -> uvicorn -> embedded Tiled -> ZeroMQ context

Heavy modules (onnxruntime, the bundle, tiled, uvicorn) are imported inside `Service.run`, so
``latent-stream --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import zmq.asyncio
from prometheus_client import CollectorRegistry

from operators.metrics import PipelineMetrics
from stream.config import ServeSettings

if TYPE_CHECKING:
    import uvicorn

    from frontend_bridge.hub import Hub
    from frontend_bridge.wire import ModelInfo
    from operators.persist.writer import TiledWriter

log = logging.getLogger(__name__)

# Shutdown budget of the HTTP server (seconds); the pipeline's and the writer's are settings.
_UVICORN_STOP_S = 3.0
# Slow websocket clients are the hub's to handle (drop-oldest on /lse, 1013 on /ws). A keepalive pong
# waits behind everything a slow client has not read yet, so a pong deadline would close it before the
# hub's policy acts: pings only keep idle connections open through firewalls, and no deadline is set.
WS_PING_INTERVAL_S = 20.0
WS_MAX_MESSAGE_BYTES = 64 * 1024  # clients send nothing the service reads; larger messages close with 1009
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class ServeError(RuntimeError):
    """The service could not start (port in use, bad bundle, Tiled not reachable...)."""


class Service:
    """The beamtime service. ``await Service(settings).run()`` serves until stopped."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.ready = asyncio.Event()  # set once every part is started
        self.url = f"http://{settings.host}:{settings.port}"
        self.tiled_url = settings.tiled_base_url
        self.tiled_api_key: str | None = settings.tiled_api_key
        self._stop = asyncio.Event()
        self._cleanups: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self._writer: TiledWriter | None = None
        self._workers: Callable[[], list[dict[str, Any]]] = list  # /api/health's workers

    async def wait_persisting(self) -> None:
        """Until the service is ready and writing to Tiled: the embedded server is up ~10 s after the model
        on 2 cores, and frames the service must store wait in a bounded buffer meanwhile (a scan started
        at once would lose its first frames to it, counted as buffer_full)."""
        await self.ready.wait()
        assert self._writer is not None  # made before ready is set
        await self._writer.wait_connected()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start everything, serve until a stop is requested, then stop everything in reverse order.

        Raises ServeError when a part fails to start or fails while serving (after stopping the rest).
        """
        loop = asyncio.get_running_loop()
        failed = ""
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            tasks = await self._start()
            self.ready.set()
            log.info("serving on %s (websockets %s/ws and %s/lse, frames from %s)",
                     self.url, self.url.replace("http", "ws", 1), self.url.replace("http", "ws", 1),
                     self.settings.source_spec.describe())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    failure = task.exception()
                    known = isinstance(failure, ServeError)  # says what to fix: no traceback
                    log.error("%s failed; shutting down", task.get_name(), exc_info=None if known else failure)
                    failed = f"{task.get_name()} failed: {failure}"
        finally:
            await self._shutdown()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if failed:
            raise ServeError(failed)

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: already stopping", signal.Signals(sig).name)
            return
        log.info("%s received: stopping", signal.Signals(sig).name)
        self._stop.set()

    def _on_stop(self, what: str, cleanup: Callable[[], Awaitable[Any]]) -> None:
        self._cleanups.append((what, cleanup))

    async def _shutdown(self) -> None:
        for what, cleanup in reversed(self._cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("error while stopping %s", what)
        self._cleanups.clear()
        log.info("stopped; counters %s", self.metrics.snapshot())

    async def _start(self) -> list[asyncio.Task[Any]]:
        s = self.settings
        _check_port_free(s.host, s.port)
        from operators.persist.private_files import make_private_dir
        from operators.persist.schema import preload_client_modules

        try:
            make_private_dir(s.data_dir)  # the key, the catalog, the frames and the result log live there
        except OSError as exc:
            raise ServeError(f"cannot use the data directory {s.data_dir}: {exc}") from exc

        bundle, (self.tiled_url, self.tiled_api_key, tiled_ready), _ = await _all_or_nothing(
            self._load_bundle(), self._launch_tiled(), asyncio.to_thread(preload_client_modules)
        )

        # -- persistence (publisher): frames that came without a tiled_url, points, latents ------------
        from operators.persist.metrics import WriterCollector

        writer = self._writer = make_writer(s, self.tiled_url, self.tiled_api_key)
        writer_task = writer.start_soon(tiled_ready)
        self.registry.register(WriterCollector(writer))
        self._on_stop("tiled writer", lambda: writer.stop(drain_timeout=s.persist_drain_timeout))

        # -- the bridge (publisher + app) ------------------------------------------------------------
        from frontend_bridge.app import TiledConfig, create_app
        from frontend_bridge.wire import ModelInfo
        from operators.persist.catalog import TiledRunCatalog

        hub = make_hub(s, ModelInfo(bundle.autoencoder_model, bundle.dimred_model), self.registry)
        self.metrics.set_clients_source(lambda: float(sum(hub.client_counts().values())))
        app = create_app(
            hub,
            registry=self.registry,
            reference_embedding=bundle.reference_embedding,
            reference_clusters=bundle.reference_clusters,
            reference_frame=_reference_frame_reader(bundle, s.max_frame_pixels, s.reference_api_key),  # frames behind the grey points
            tiled=TiledConfig(self.tiled_url, self.tiled_api_key, max_frame_pixels=s.max_frame_pixels,
                              max_frame_bytes=s.max_frame_bytes),
            source_tiled=self._source_tiled(),  # a tiled:// source's frames stay where bluesky wrote them
            token=s.token,
            allowed_hosts=self._allowed_hosts(),
            allowed_origins=s.allowed_origins,
            metrics_public=s.metrics_public,
            health_extra=self._health,
            run_catalog=TiledRunCatalog(self.tiled_url, self.tiled_api_key),  # past runs from Tiled
            max_aggregate=s.max_aggregate,
        )

        # -- compute ---------------------------------------------------------------------------------
        from operators.pipeline import LivePipeline

        assert s.queue_policy is not None  # resolved by the settings validator
        compute = {"tiled_base_url": self.tiled_url, "max_batch": s.max_batch, "queue_size": s.queue_size,
                   "queue_bytes": s.queue_bytes, "policy": s.queue_policy, "publish_timeout": s.publish_timeout,
                   "frame_sink": writer.store_frame}  # frames to store: their own path
        if s.embedded_tiled and s.persist_wait > 0:  # this machine's disk: slow down rather than drop frames
            compute["storage_room"] = functools.partial(writer.wait_for_room, s.persist_wait)
        if s.workers > 1:  # preprocess/encode/project on Ray workers (operators/workers/)
            pipeline = await self._pooled_pipeline(bundle, compute)
        else:  # in-process, without Ray
            from operators.workers.sequencer import in_process_worker

            pipeline = LivePipeline(bundle, self.metrics, **compute)
            self._workers = lambda: in_process_worker(bundle, self.metrics)
        pipeline.add_publisher(hub)
        pipeline.add_publisher(writer)

        # -- HTTP / websockets -----------------------------------------------------------------------
        server_task = await self._start_uvicorn(app)

        pipeline_task = asyncio.create_task(pipeline.run(), name="pipeline")
        self._on_stop("pipeline", lambda: self._stop_pipeline(pipeline, pipeline_task))

        # -- frames in (last to start, first to stop) ------------------------------------------------
        from stream.sources import SourceContext, SourceURLError, build_source

        context = zmq.asyncio.Context()
        self._on_stop("zmq context", lambda: _term_context(context))
        try:  # --source (stream/sources/): every kind is a Listener feeding pipeline.submit
            ingest = build_source(s.source_spec, SourceContext(pipeline, self.metrics, s.limits, context,
                                                               rcvhwm=s.rcvhwm, api_key=s.source_api_key))
        except SourceURLError as exc:
            raise ServeError(str(exc)) from exc
        ingest_task = asyncio.create_task(ingest.start(), name="ingest")
        self._on_stop("ingest", ingest.stop)
        await ingest.wait_connected()
        return [server_task, pipeline_task, ingest_task, writer_task]

    async def _pooled_pipeline(self, bundle: Any, compute: dict[str, Any]) -> Any:
        """--workers N: preprocess, encode and project on N Ray workers; order, clusters and publishing here."""
        from operators.workers.pool import PoolSettings, PoolStartError, RayWorkerPool, WorkerLost
        from operators.workers.sequencer import PooledPipeline

        s = self.settings
        bundle_path = s.bundle.resolve() if s.bundle is not None else None  # workers start elsewhere
        pool = RayWorkerPool(PoolSettings(s.workers, bundle=bundle_path, device=s.device,
                                          device_preprocess=s.device_preprocess,
                                          max_batch=s.max_batch, gpus_per_worker=s.gpus_per_worker,
                                          ray_address=s.ray_address))
        self._on_stop("worker pool", pool.close)  # after the pipeline: it stops first
        try:
            await pool.start()
        except PoolStartError as exc:
            raise ServeError(str(exc)) from exc
        self._workers = pool.describe
        return PooledPipeline(bundle, self.metrics, pool, lost=WorkerLost, **compute)

    async def _load_bundle(self) -> Any:
        from operators.bundle import BundleError, ModelBundle

        s = self.settings
        device = s.device if s.workers == 1 else "cpu"  # with workers, the service's copy only clusters
        try:
            bundle = await asyncio.to_thread(ModelBundle.load, s.bundle, device=device,
                                             device_preprocess=s.device_preprocess if s.workers == 1 else "off",
                                             intra_op_threads=s.ort_threads)
        except (BundleError, FileNotFoundError) as exc:
            raise ServeError(f"cannot load the model bundle: {exc}") from exc
        await asyncio.to_thread(bundle.warmup)  # the first frame must not pay for JIT / session set-up
        log.info("model %s / %s ready", bundle.autoencoder_model, bundle.dimred_model)
        return bundle

    async def _launch_tiled(self) -> tuple[str, str | None, Callable[[], Awaitable[None]] | None]:
        """(url, api key, readiness to await before writing: None for an external Tiled)."""
        s = self.settings
        if not s.embedded_tiled:
            return s.tiled, s.tiled_api_key, None
        from operators.persist.server import MAX_BODY_BYTES, EmbeddedTiledServer, TiledServerError

        # The writer sends a frame larger than its PATCH size alone: the server must take the largest frame.
        server = EmbeddedTiledServer(s.data_dir, port=s.tiled_port, api_key=s.tiled_api_key,
                                     max_body_bytes=max(MAX_BODY_BYTES, s.max_frame_bytes))
        self._on_stop("embedded tiled", server.stop)  # before launch: a cancelled start still reaps the child
        try:
            endpoint = await server.launch()
        except TiledServerError as exc:
            raise ServeError(str(exc)) from exc
        if server.api_key_generated:  # the key itself is never logged
            log.info("embedded Tiled at %s: generated an API key, kept in %s (readable by you only)",
                     endpoint.url, server.key_file)

        async def ready() -> None:
            try:
                await server.wait_ready()
            except TiledServerError as exc:
                raise ServeError(str(exc)) from exc

        return endpoint.url, endpoint.api_key, ready

    def _source_tiled(self) -> Any:
        """The Tiled a ``tiled://`` source follows, for the page's frames; None for other sources."""
        from frontend_bridge.app import TiledConfig
        from stream.sources import TiledSource

        spec, s = self.settings.source_spec, self.settings
        if not isinstance(spec, TiledSource):
            return None
        return TiledConfig(spec.base_url, s.source_api_key, max_frame_pixels=s.max_frame_pixels,
                           max_frame_bytes=s.max_frame_bytes)

    def _allowed_hosts(self) -> list[str]:
        """Host names the bridge answers to besides the loopback ones: the bind address unless a wildcard."""
        s = self.settings
        if s.host not in _WILDCARD_HOSTS:
            return [*s.allowed_hosts, s.host]
        if not s.allowed_hosts:
            log.warning("listening on all interfaces (%s), but only requests addressed to localhost are "
                        "answered: set --allowed-hosts to the names clients use", s.host or "''")
        return s.allowed_hosts

    async def _start_uvicorn(self, app: Any) -> asyncio.Task[Any]:
        import uvicorn

        class _Server(uvicorn.Server):
            # Signals belong to the service, not to uvicorn (it would re-raise them after its shutdown).
            def capture_signals(self) -> contextlib.AbstractContextManager[None]:
                return contextlib.nullcontext()

        server = _Server(bridge_server_config(app, self.settings.host, self.settings.port))
        task = asyncio.create_task(server.serve(), name="uvicorn")
        while not server.started:
            if task.done():
                exc = task.exception() if not task.cancelled() else None
                raise ServeError(f"HTTP server could not start on {self.url}: {exc!r}")
            await asyncio.sleep(0.05)

        async def stop_uvicorn() -> None:
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), _UVICORN_STOP_S)
            except TimeoutError:
                server.force_exit = True
                await asyncio.wait([task], timeout=1.0)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a failed uvicorn startup, too
                log.warning("uvicorn stopped with %r", exc)

        self._on_stop("uvicorn", stop_uvicorn)
        return task

    async def _stop_pipeline(self, pipeline: Any, task: asyncio.Task[Any]) -> None:
        if not await pipeline.wait_idle(self.settings.drain_timeout):
            log.warning("pipeline still busy after %.1f s: dropping what is queued", self.settings.drain_timeout)
        task.cancel()
        await asyncio.wait([task])
        await pipeline.close()

    def _health(self) -> dict[str, Any]:
        writer = self._writer
        return {"ingest": self.metrics.snapshot(), "workers": self._workers(),
                "source": self.settings.source_spec.describe(),
                "zmq": self.settings.zmq,
                "zmq_pattern": self.settings.zmq_pattern, "tiled": self.tiled_url,
                "tiled_connected": writer is not None and writer.connected,
                "persist": dataclasses.asdict(writer.stats()) if writer is not None else None}


def make_writer(s: ServeSettings, tiled_url: str, api_key: str | None) -> TiledWriter:
    """The Tiled writer as the settings ask (not yet connected)."""
    from operators.persist.writer import TiledWriter

    return TiledWriter(tiled_url, api_key, data_dir=s.data_dir, local_frames=s.embedded_tiled,
                       max_buffer_bytes=s.persist_buffer_bytes, max_batch=s.persist_max_batch,
                       max_patch_bytes=s.persist_patch_bytes, rows_interval=s.persist_rows_interval,
                       frames_linger=s.persist_frames_linger, give_up_after=s.persist_give_up_after,
                       failed_attempts=s.persist_failed_attempts, max_frame_index=s.max_frame_index,
                       request_timeout=s.persist_request_timeout)  # fmt: skip


def make_hub(s: ServeSettings, model_info: ModelInfo, registry: CollectorRegistry) -> Hub:
    """The websocket hub as the settings ask; it sends clients the start metadata the ingest accepted, so
    within the same bounds."""
    from frontend_bridge.hub import Hub

    return Hub(model_info, registry=registry, max_points=s.max_points, max_past_points=s.max_past_points,
               max_runs=s.max_runs, lse_queue=s.lse_queue, ws_queue=s.ws_queue,
               max_metadata_depth=s.max_metadata_depth, max_metadata_bytes=s.max_metadata_bytes)  # fmt: skip


def bridge_server_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """How uvicorn serves the bridge (tests serve it the same way)."""
    import uvicorn

    # log_config=None: uvicorn's records go through the service's own (line-safe) handler, not uvicorn's.
    return uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning", lifespan="on",
                          ws_ping_interval=WS_PING_INTERVAL_S, ws_ping_timeout=None,
                          ws_max_size=WS_MAX_MESSAGE_BYTES, timeout_graceful_shutdown=1)


async def _all_or_nothing(*steps: Awaitable[Any]) -> list[Any]:
    """Run start-up steps concurrently; when one fails, cancel the rest and raise its error."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def _term_context(context: zmq.asyncio.Context) -> None:
    # Every socket was closed by its owner; destroy(linger=0) also covers one that was not.
    context.destroy(linger=0)


def _check_port_free(host: str, port: int) -> None:
    """Fail early and clearly instead of after loading the model."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def serve(settings: ServeSettings) -> None:
    """Run the service until SIGINT/SIGTERM."""
    await Service(settings).run()


def _reference_frame_reader(bundle: Any, max_pixels: int, api_key: str | None) -> Any:
    """What GET /api/reference/frame/{i} reads: the bundle's recorded reference frames (adapt), or None."""
    from stream.reference_frames import reference_frames_of

    frames = reference_frames_of(bundle, max_pixels=max_pixels, api_key=api_key)
    return frames.read if frames is not None else None
