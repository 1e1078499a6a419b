"""The embedded Tiled server: SQLite catalog + files under a data directory, bound to 127.0.0.1.

Runs in a child process (``python -m operators.persist.server``), not in the service's process:
Tiled's per-request work (zarr writes, DuckDB appends, serialisation) then never competes for
the service's GIL or event loop, so the per-frame path is unaffected by persistence, and the
server can be stopped / restarted on its own (the outage tests do exactly that).

Not ``tiled.server.SimpleTiledServer``: it hard-codes a 1000-entry in-memory streaming cache
that holds every written frame (RSS grew by GBs in ../shared/notes/tiled.md). We build the app
ourselves with no streaming cache at all: every PATCH would also copy its 10 MB body into it, for
Tiled's experimental websocket streams that nothing here uses (clients get URIs from our own /ws).

Arrays this server creates are compressed with Blosc LZ4 + byte shuffle instead of zarr's default
Zstd: on a full PILATUS frame (int32 counts) ~4x faster to write and to read back at ~5x
compression (Zstd ~6x); see benchmarks/persist.py --codecs. The files stay plain zarr v3, readable
by any Tiled. Chunking (one frame per chunk) is the writer's choice and unchanged.

Request bodies reach Tiled's app in one piece (whole_body.py): its middleware stack costs CPU per
socket-sized piece of a body, ~35 ms per 10 MB frame, more than storing the frame does. FastAPI's
per-request dependency analysis is cached (`_memoize_dependants`).

Lifecycle::

    async with EmbeddedTiledServer(data_dir, port=8000) as endpoint:
        endpoint.url, endpoint.api_key

or, to use the endpoint (port and key) while the server starts: ``launch()``, later ``wait_ready()``.

The child is started with PR_SET_PDEATHSIG (Linux) so that it dies with the service even when
the service is SIGKILLed; a pid file in the data directory lets a restarted service reap a
survivor (other platforms) before it binds the same port and opens the same SQLite catalog.

Secrets: the data directory (and the directories made in it) is private to its owner (0700), and
the child creates every file owner-only; a generated API key is kept in private_files.KEY_FILE (0600),
never logged or put on a command line. Every request body must show the key before any of it is read
(whole_body.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from operators.child_process import die_with_parent
from operators.persist.private_files import KEY_FILE, load_or_create_api_key, make_private_dir
from operators.persist.whole_body import WholeBodyMiddleware
from operators.tiled_layout import auth_headers
from stream.protocol import DEFAULT_MAX_BYTES

logger = logging.getLogger(__name__)

API_KEY_ENV = "LATENT_STREAM_TILED_API_KEY"
_PID_FILE = "tiled-server.pid"
# Codec for arrays created by the embedded server (see the module doc).
BLOSC_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
# Niceness of the server child once it is up (see _lower_priority).
SERVER_NICENESS = 10
# Largest request body the server accepts (it holds each body in memory, as Tiled does anyway): the
# writer's largest request, a PATCH of up to 64 MiB of frames (TiledWriter's max_patch_bytes) or one
# frame alone when it is larger, and a frame is at most the wire protocol's DEFAULT_MAX_BYTES.
MAX_BODY_BYTES = max(64 * 2**20, DEFAULT_MAX_BYTES)


class TiledServerError(RuntimeError):
    """The embedded Tiled server could not be started or answered badly."""


@dataclass(frozen=True, slots=True)
class TiledEndpoint:
    """Where a Tiled server answers and the key it wants (``Authorization: Apikey KEY``)."""

    url: str  # http://HOST:PORT, no trailing slash
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return auth_headers(self.api_key)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and `--tiled-port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _reap_stale_server(data_dir: Path, tiled_dir: Path) -> None:
    """Stop a Tiled child left behind by a killed service (it holds the port and the SQLite catalog).

    Only the server of this data directory: the pid in the file may have been reused since, even by the
    embedded server of another service.
    """
    pid_path = data_dir / _PID_FILE
    if not pid_path.exists():
        return
    try:
        pid = int(pid_path.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (ValueError, OSError):
        pid_path.unlink(missing_ok=True)
        return
    if "operators.persist.server" not in argv or str(tiled_dir) not in argv:
        pid_path.unlink(missing_ok=True)
        return
    logger.warning("stopping a stale embedded Tiled server (pid %d) for %s", pid, data_dir)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # it exited meanwhile
        pid_path.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)


class EmbeddedTiledServer:
    """Start/stop a writable Tiled server on 127.0.0.1 with its catalog and data under `data_dir`.

    `port=0` picks a free port once; `restart()` reuses the same port and data directory.
    `max_body_bytes`: the largest request body it reads; raise it with the service's frame limit.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int = 8000,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 90.0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self._api_key_arg = api_key
        self.startup_timeout = startup_timeout
        self.max_body_bytes = max_body_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint: TiledEndpoint | None = None
        self._ready = False
        self.api_key_generated = False

    @property
    def tiled_dir(self) -> Path:
        return self.data_dir / "tiled"

    @property
    def key_file(self) -> Path:
        """Where a generated API key is kept (mode 0600); a restart on this data directory reuses it."""
        return self.data_dir / KEY_FILE

    async def __aenter__(self) -> TiledEndpoint:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> TiledEndpoint:
        """Start the child and wait until /healthz answers. Idempotent."""
        await self.launch()
        return await self.wait_ready()

    async def launch(self) -> TiledEndpoint:
        """Start the child; its endpoint is known at once, it answers once `wait_ready` returns."""
        if self._proc is not None and self._proc.poll() is None and self.endpoint is not None:
            return self.endpoint
        make_private_dir(self.data_dir)
        make_private_dir(self.tiled_dir)
        key, generated = load_or_create_api_key(self.data_dir, self._api_key_arg)
        self.api_key_generated = self.api_key_generated or generated
        await asyncio.to_thread(_reap_stale_server, self.data_dir, self.tiled_dir)
        # Spawned from this (the event loop's) thread, not a worker: PR_SET_PDEATHSIG fires when the
        # *thread* that forked the child exits, and executor threads come and go.
        self._proc = self._spawn(key)
        self._ready = False
        self.endpoint = TiledEndpoint(url=f"http://{self.host}:{self.port}", api_key=key)
        return self.endpoint

    async def wait_ready(self) -> TiledEndpoint:
        """Wait until the launched child answers /healthz (then it yields the CPU to the live path)."""
        proc = self._proc
        if proc is None or self.endpoint is None:
            raise TiledServerError("embedded Tiled server not launched")
        if not self._ready:
            await self._wait_ready()
            _lower_priority(proc.pid)
            self._ready = True
            logger.info("embedded Tiled server ready at %s (data %s)", self.endpoint.url, self.tiled_dir)
        return self.endpoint

    def _spawn(self, key: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, API_KEY_ENV: key}  # the key goes by env, not argv (ps shows argv)
        cmd = [
            sys.executable, "-m", "operators.persist.server", "--parent-pid", str(os.getpid()),
            "--dir", str(self.tiled_dir), "--host", self.host, "--port", str(self.port),
            "--max-body-bytes", str(self.max_body_bytes),
        ]  # fmt: skip
        log_fd = os.open(self.tiled_dir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            # Its own session: a Ctrl-C in the terminal goes to the service alone, which stops this server
            # last, after the writer has drained (it would otherwise die first, with the writer's backlog).
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                                    start_new_session=True)  # fmt: skip
        (self.data_dir / _PID_FILE).write_text(str(proc.pid))
        return proc

    async def _wait_ready(self) -> None:
        proc, endpoint = self._proc, self.endpoint
        assert proc is not None and endpoint is not None
        deadline = time.monotonic() + self.startup_timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise TiledServerError(
                        f"embedded Tiled server exited with code {proc.returncode}; "
                        f"see {self.tiled_dir / 'server.log'}"
                    )
                try:
                    r = await client.get(f"{endpoint.url}/healthz", timeout=1.0)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    await self.stop()
                    raise TiledServerError(f"embedded Tiled server not ready in {self.startup_timeout:.0f} s")
                await asyncio.sleep(0.2)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after `timeout`). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        (self.data_dir / _PID_FILE).unlink(missing_ok=True)
        logger.info("embedded Tiled server stopped (%s)", self.endpoint.url if self.endpoint else "")

    async def restart(self) -> TiledEndpoint:
        await self.stop()
        return await self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def _lower_priority(pid: int) -> None:
    """Persistence is off the per-frame path: when both want a core, the service's compute goes first and
    the server catches up in the gaps (the live path needs ~0.3 core at 10 Hz). Done once the server is
    up, so that its start-up is not slowed, and to every thread it has (Linux niceness is per thread)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # no /proc: the main thread only
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, SERVER_NICENESS)


def _configure_zarr() -> None:
    """In the server child only (it does nothing but serve Tiled).

    - New arrays get `BLOSC_CODEC` instead of zarr's default Zstd. Tiled 0.2.20 creates arrays with
      ``tiled.adapters.zarr.create_array(store, shape=, chunks=, dtype=)`` and offers no codec option
      (zarr 3.1 has no config key for the default either), so that one module attribute is wrapped.
    - Written chunks are stored as they are: zarr would otherwise compare each with an all-fill chunk
      it allocates, to skip empty ones (~8 ms of CPU per 10 MB frame); frames are never empty.
    """
    import tiled.adapters.zarr as tiled_zarr
    import zarr
    from zarr.codecs import BloscCodec

    create = getattr(tiled_zarr, "create_array", None)
    if create is None or tiled_zarr.ZARR_LIB_V2:
        raise TiledServerError("this Tiled/zarr version creates arrays differently: review _configure_zarr")
    codec = BloscCodec(**BLOSC_CODEC)
    tiled_zarr.create_array = functools.partial(create, compressors=(codec,))  # type: ignore[attr-defined]
    zarr.config.set({"array.write_empty_chunks": True})


def _memoize_dependants() -> None:
    """In the server child only: FastAPI analyses each dependency's signature once, not per request.

    Tiled's app sets ``dependency_overrides`` (its settings), and with any override present FastAPI
    0.165 rebuilds every sub-dependency of a route on every request (``get_dependant``: an
    ``inspect.signature`` per dependency), ~4-15 ms of CPU per request on this VM, paid by every frame
    PATCH. The result depends only on the arguments, which are the same callables every time, so it is
    cached; unhashable arguments fall through to FastAPI's own function.
    """
    from fastapi.dependencies import utils

    original = getattr(utils, "get_dependant", None)
    if original is None:  # another FastAPI: nothing to cache, or not here
        return
    cache: dict[Any, Any] = {}

    @functools.wraps(original)
    def get_dependant(**kwargs: Any) -> Any:
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(kwargs.items()))
        try:
            return cache[key]
        except KeyError:
            dependant = cache[key] = original(**kwargs)
            return dependant
        except TypeError:
            return original(**kwargs)

    utils.get_dependant = get_dependant  # solve_dependencies looks it up in its module at call time


_OUT_OF_RANGE = "out-of-bounds index"


async def _slice_out_of_range(request: Any, exc: Exception) -> Any:
    """A 404 for a frame slice beyond the array's current length (a frame not written yet).

    Tiled 0.2.20 lets that ValueError escape (``ndslice.compose_slices``): the client's connection is
    dropped and a full traceback is logged per request, which under a client polling for its frame
    costs the server more than the writes do. Any other ValueError is re-raised unchanged.
    """
    from starlette.responses import JSONResponse

    if _OUT_OF_RANGE not in str(exc):
        raise exc
    return JSONResponse({"detail": f"slice out of range (not written yet?): {exc}"}, status_code=404)


def _serve(directory: Path, host: str, port: int, max_body_bytes: int) -> None:
    """Child-process entry point: build the catalog and app, serve until SIGTERM."""
    import uvicorn
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    # The parent passed the key by environment on purpose: a child's argv is readable by every user (ps).
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        raise SystemExit(f"{API_KEY_ENV} is not set")
    os.umask(0o077)  # the catalog, the tables and every frame file: owner only
    (directory / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
    _configure_zarr()
    catalog = from_uri(
        directory / "catalog.db",
        writable_storage=[directory / "data", f"duckdb:///{directory / 'tables.duckdb'}"],
        init_if_not_exists=True,
        cache_config=None,
    )
    app = build_app(catalog, authentication=Authentication(single_user_api_key=api_key))
    app.add_exception_handler(ValueError, _slice_out_of_range)
    _memoize_dependants()
    served = WholeBodyMiddleware(app, max_body_bytes=max_body_bytes, api_key=api_key)
    uvicorn.run(served, host=host, port=port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="latent-stream embedded Tiled server (child process)")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    from operators.log_safety import line_safe_handler

    # sender strings reach this server's logs (in request paths, errors): one record stays one line
    logging.basicConfig(level=logging.WARNING, handlers=[line_safe_handler(logging.BASIC_FORMAT)])
    _serve(args.dir.resolve(), args.host, args.port, args.max_body_bytes)


if __name__ == "__main__":
    main()
