"""The whole service end to end: frames over ZeroMQ in, points over the websocket out.

`latent-stream serve` runs as its own process (as at a beamline). This process is the detector and the
client at once: `stream.sender` pushes full-size frames at a fixed rate (or as fast as the service takes
them), and an asyncio websocket client on ``/ws`` receives the points. Both sides stamp
``time.perf_counter()`` (CLOCK_MONOTONIC, shared by processes on one machine), so latency is
send -> point received, including the wire, decode, compute, publish and the websocket.

Two modes: `facility` (events carry a ``tiled_url``; the service passes it through) and `embedded` (events
carry none; the service stores the frame in its embedded Tiled, and we check each frame can be fetched back
byte-identical within a window after its point arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil
import websockets

from benchmarks.fetch_probe import FetchProbe
from benchmarks.report import E2ERun
from benchmarks.stats import LatencyStats
from stream.sender import FrameSender

log = logging.getLogger(__name__)

FACILITY_TILED = "http://facility-tiled.invalid:8000"  # a facility server's URI, passed through untouched


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def send_run(
    sender: FrameSender,
    run_id: str,
    frames: Sequence[np.ndarray],
    n: int,
    *,
    rate: float | None,
    tiled_base: str,
) -> dict[int, float]:
    """Send start, `n` events (cycling through `frames`) and stop; return frame index -> send time.

    `tiled_base` non-empty: facility mode, each event carries a URI on that server; empty: the service
    stores the frame. With `rate` None the PUSH socket's backpressure sets the pace. The schedule is
    absolute (t0 + i / rate), so a late send does not shift the ones after it.
    """
    h, w = frames[0].shape
    meta_url = f"{tiled_base}/api/v1/metadata/{run_id}" if tiled_base else ""
    await sender.send_start(
        run_id, run_id, width=w, height=h, data_type=str(frames[0].dtype), tiled_url=meta_url
    )
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        if rate is not None:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        url = f"{tiled_base}/api/v1/array/full/{run_id}/primary/image?slice={i}" if tiled_base else ""
        sent[i] = time.perf_counter()
        await sender.send_event(i, frames[i % len(frames)], tiled_url=url)
    await sender.send_stop(n)
    return sent


@dataclass(slots=True)
class ServiceConfig:
    bundle: Path | None = None  # None: the shipped default bundle
    data_dir: Path | None = None  # None: a temporary directory, removed afterwards
    api_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. LATENT_STREAM_ORT_THREADS)
    start_timeout_s: float = 120.0


class RssSampler:
    """Samples the resident memory of a process tree (the service and its embedded Tiled) in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak = 0
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            procs = [self._proc, *self._proc.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._rss()
            with self._lock:
                self._peak = max(self._peak, rss)

    def take_peak_mb(self) -> float:
        """Peak RSS since the last call, in MB; starts a new window."""
        with self._lock:
            peak, self._peak = max(self._peak, self._rss()), 0
        return peak / 2**20

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Service:
    """`latent-stream serve` as a child process, connected to our sender's PUSH socket."""

    def __init__(self, cfg: ServiceConfig, zmq_addr: str) -> None:
        self.cfg = cfg
        self.zmq_addr = zmq_addr
        self.port = free_port()
        self.tiled_port = free_port()
        self._tmp: Path | None = None
        if cfg.data_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="latent-stream-bench-"))
        self.data_dir = cfg.data_dir or self._tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_wall = 0.0
        self.started_perf = 0.0
        self.log_path = Path(self.data_dir) / "service.log"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = shutil.which("latent-stream", path=os.path.dirname(sys.executable)) or shutil.which(
            "latent-stream"
        )
        base = [exe] if exe else [sys.executable, "-m", "stream.cli"]
        args = [
            *base,
            "serve",
            "--zmq", self.zmq_addr,
            "--zmq-pattern", "pull",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--tiled", "embedded",
            "--tiled-port", str(self.tiled_port),
            "--tiled-api-key", self.cfg.api_key,
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        if self.cfg.bundle is not None:
            args += ["--bundle", str(self.cfg.bundle)]
        return [*args, *self.cfg.extra_args]

    def start(self) -> None:
        cmd = self.command()
        log.info("starting service: %s", " ".join(cmd))
        self._log_fh = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_wall = time.time()
        self.started_perf = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"the service exited with {self.proc.returncode}; last log lines:\n{self.log_tail()}"
            )

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def metrics_text(self) -> str:
        try:
            return httpx.get(f"{self.http_url}/metrics", timeout=5, trust_env=False).text
        except httpx.HTTPError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the service's own clean shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_log_fh", None):
            self._log_fh.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _counters(metrics: str) -> dict[str, float]:
    """Drop / reject / error counters from the service's Prometheus text, summed per metric and label set."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not any(word in name for word in ("drop", "reject", "lost", "error", "fail")):
            continue
        if name.endswith("_created"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def _stage_totals(metrics: str) -> dict[str, tuple[float, float]]:
    """stage -> (seconds summed, frames counted) from the service's per-stage histogram."""
    out: dict[str, list[float]] = {}
    for line in metrics.splitlines():
        if not line.startswith("latent_stream_stage_seconds_") or 'stage="' not in line:
            continue
        name = line.split("{", 1)[0]
        field_ = 0 if name.endswith("_sum") else 1 if name.endswith("_count") else None
        if field_ is None:
            continue
        stage = line.split('stage="', 1)[1].split('"', 1)[0]
        with contextlib.suppress(ValueError):
            out.setdefault(stage, [0.0, 0.0])[field_] = float(line.rpartition(" ")[2])
    return {k: (v[0], v[1]) for k, v in out.items()}


def _lag_buckets(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("latent_stream_persist_frame_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rpartition(" ")[2])
    return out


def frame_lag_within(before: str, after: str) -> dict[str, int]:
    """Frames the service's writer stored between two /metrics texts, within each lag bound (cumulative)."""
    b, a = _lag_buckets(before), _lag_buckets(after)
    return {le: int(n - b.get(le, 0.0)) for le, n in a.items()}


def stage_means_ms(before: str, after: str) -> dict[str, float]:
    """Mean milliseconds per observation of each stage between two /metrics texts (batched stages: per batch)."""
    b, a = _stage_totals(before), _stage_totals(after)
    means = {}
    for stage, (total, count) in a.items():
        t0, c0 = b.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = 1e3 * (total - t0) / (count - c0)
    return means


_MILESTONES = (
    ("bundle loaded", "loaded bundle"),
    ("model ready", "ready", "model"),
    ("embedded Tiled ready", "embedded Tiled server ready"),
    ("serving", "serving on"),
)


def cold_start_phases(log_path: Path, started_wall: float) -> dict[str, float]:
    """Seconds from process start to each start-up milestone the service logs (best effort: log lines of
    the form "YYYY-mm-dd HH:MM:SS,mmm LEVEL name: message"). Missing milestones are left out."""
    import datetime as dt

    phases: dict[str, float] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return phases
    for line in lines:
        try:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        for label, *needles in _MILESTONES:
            if label not in phases and all(n in line for n in needles):
                phases[label] = round(stamp - started_wall, 2)
    return phases


class PointReceiver:
    """Keeps one `/ws` connection and stamps each point's arrival, keyed by (run_id, index)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrivals: dict[tuple[str, int], float] = {}
        self.messages: dict[tuple[str, int], dict[str, Any]] = {}
        self.first_point_wall: float | None = None
        self.first_point_ts: float | None = None
        self._new = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Called for every new point as it arrives (embedded mode: fetch its frame as a client would).
        self.on_point: Callable[[tuple[str, int], dict[str, Any], float], None] | None = None

    async def start(self, deadline_perf: float, service: Service) -> None:
        while True:
            service.check_alive()
            try:
                ws = await websockets.connect(self.url, max_size=None, open_timeout=5, proxy=None)
                break
            except (TimeoutError, OSError, websockets.InvalidHandshake):
                if time.perf_counter() > deadline_perf:
                    raise TimeoutError(
                        f"no websocket at {self.url}; service log:\n{service.log_tail()}"
                    ) from None
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._loop(ws))
        self.connected.set()

    async def _loop(self, ws: Any) -> None:
        async with ws:
            async for raw in ws:
                now = time.perf_counter()
                msg = orjson.loads(raw)
                if msg.get("type") != "point":
                    continue
                key = (str(msg.get("run_id")), int(msg["index"]))
                # The first arrival counts; a backfill repeat of the same point does not move it.
                if key in self.arrivals:
                    continue
                self.arrivals[key] = now
                self.messages[key] = msg
                if self.on_point is not None:
                    self.on_point(key, msg, now)
                if self.first_point_wall is None:
                    self.first_point_wall = time.time()
                    self.first_point_ts = float(msg.get("timestamp") or self.first_point_wall)
                self._new.set()

    def count(self, run_id: str) -> int:
        return sum(1 for (rid, _) in self.arrivals if rid == run_id)

    async def wait_for(self, run_id: str, n: int, timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while self.count(run_id) < n:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), timeout=min(remaining, 0.5))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class FrameFetcher:
    """Embedded mode: a client asks for sampled frames (every `every`-th, up to `max_checks`) by the URI in
    their points, `window_s` after the point arrived (see fetch_probe.py). The lag of every frame comes from
    the writer's own histogram instead (`frame_lag_within`)."""

    def __init__(self, service: Service, window_s: float, max_checks: int, every: int = 1) -> None:
        self.max_checks = max_checks
        self.every = max(1, every)
        self.probe = FetchProbe(service.cfg.api_key, window_s)

    def on_point(self, key: tuple[str, int], msg: dict[str, Any], arrived: float) -> None:
        url = str(msg.get("tiled_url") or "")
        if len(self.probe.urls) >= self.max_checks or not url or key[1] % self.every:
            return
        self.probe.watch(key[1], url, arrived)

    async def finish(self, frames_by_index: dict[int, np.ndarray]) -> tuple[int, int]:
        """Wait for the checks; then fetch whole frames. Returns (fetchable in time and identical, checked)."""
        await self.probe.finish()
        ok = await self.probe.identical({i: self.probe.urls[i] for i in self.probe.on_time}, frames_by_index)
        await self.probe.aclose()
        return ok, len(self.probe.urls)


@dataclass(slots=True)
class E2EPlan:
    rates: Sequence[float | None]  # None: as fast as it goes
    frames_per_run: int
    modes: Sequence[str] = ("facility", "embedded")
    embedded_rates: Sequence[float | None] | None = None  # default: the same rates as facility
    fetch_window_s: float = 2.0
    fetch_checks: int = 20  # embedded: frames fetched back per run, spread evenly over it
    drain_timeout_s: float = 30.0


@dataclass(slots=True)
class E2EResult:
    runs: list[E2ERun]
    cold_start_s: float | None
    cold_start_first_point_s: float | None  # process start -> first point arrival at the client
    service_log_tail: str = ""
    cold_start_phases: dict[str, float] = field(
        default_factory=dict
    )  # service log milestone -> s after start


async def _one_run(
    service: Service,
    sender: FrameSender,
    receiver: PointReceiver,
    rss: RssSampler,
    frames: Sequence[np.ndarray],
    mode: str,
    rate: float | None,
    plan: E2EPlan,
) -> E2ERun:
    run_id = f"bench-{mode}-{'max' if rate is None else f'{rate:g}hz'}-{uuid.uuid4().hex[:6]}"
    n = plan.frames_per_run
    tiled_base = FACILITY_TILED if mode == "facility" else ""
    metrics_before = service.metrics_text()
    before = _counters(metrics_before)
    rss.take_peak_mb()
    fetcher = (
        FrameFetcher(service, plan.fetch_window_s, plan.fetch_checks, every=max(1, n // plan.fetch_checks))
        if mode == "embedded"
        else None
    )
    receiver.on_point = (
        (lambda key, msg, t: fetcher.on_point(key, msg, t) if key[0] == run_id else None) if fetcher else None
    )
    send_times = await send_run(sender, run_id, frames, n, rate=rate, tiled_base=tiled_base)
    await receiver.wait_for(run_id, n, timeout_s=plan.drain_timeout_s)
    await asyncio.sleep(0.2)  # let stragglers land before counting
    peak = rss.take_peak_mb()
    arrivals = {idx: t for (rid, idx), t in receiver.arrivals.items() if rid == run_id}
    lat = [arrivals[i] - send_times[i] for i in sorted(arrivals) if i in send_times]
    received = len(arrivals)
    if received:
        first_send = min(send_times.values())
        last = max(arrivals.values())
        duration = last - first_send
        if rate is None and received > 1:
            # As fast as it goes: the steady rate points come out at, after the first one.
            firsts = sorted(arrivals.values())
            throughput = (received - 1) / max(firsts[-1] - firsts[0], 1e-9)
        else:
            throughput = received / max(duration, 1e-9)
    else:
        duration, throughput = 0.0, 0.0
    metrics_after = service.metrics_text()
    after = _counters(metrics_after)
    dropped = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    msgs = [m for (rid, _), m in receiver.messages.items() if rid == run_id]

    def service_stats(key: str) -> LatencyStats | None:
        values = [float(m[key]) for m in msgs if isinstance(m.get(key), int | float)]
        return LatencyStats.from_seconds(values) if values else None

    run = E2ERun(
        mode=mode,
        rate_hz=rate,
        sent=len(send_times),
        received=received,
        duration_s=duration,
        throughput_fps=throughput,
        offered_fps=(len(send_times) - 1) / max(max(send_times.values()) - min(send_times.values()), 1e-9)
        if len(send_times) > 1
        else None,
        latency=LatencyStats.from_seconds(lat) if lat else None,
        peak_rss_mb=peak,
        service_dropped={k: int(v) for k, v in dropped.items()},
        latencies_s=lat,
        service_time=service_stats("total_processing_time"),
        service_encode=service_stats("autoencoder_time"),
        service_project=service_stats("dimred_time"),
        service_stage_means_ms=stage_means_ms(metrics_before, metrics_after),
    )
    if fetcher is not None:
        receiver.on_point = None
        by_index = {i: frames[i % len(frames)] for i in range(n)}
        run.fetch_ok, run.fetch_checked = await fetcher.finish(by_index)
        run.fetch_window_s, run.fetch_late_s = plan.fetch_window_s, sorted(fetcher.probe.late_s.values())
        run.stored_within = frame_lag_within(metrics_before, service.metrics_text())
    log.info(
        "e2e %s: sent %d received %d p50 %s ms throughput %.1f fps",
        run.label, run.sent, run.received, f"{run.latency.p50_ms:.1f}" if run.latency else "-", throughput,
    )  # fmt: skip
    return run


async def run_e2e(frames: Sequence[np.ndarray], plan: E2EPlan, cfg: ServiceConfig | None = None) -> E2EResult:
    """Start the service, measure cold start to first point, then every (mode, rate) run in `plan`."""
    cfg = cfg or ServiceConfig()
    zmq_port = free_port()
    sender = FrameSender(f"tcp://127.0.0.1:{zmq_port}", "push")
    sender.open()
    service = Service(cfg, f"tcp://127.0.0.1:{zmq_port}")
    receiver = PointReceiver(service.ws_url)
    rss: RssSampler | None = None
    try:
        service.start()
        assert service.proc is not None
        rss = RssSampler(service.proc.pid)
        deadline = service.started_perf + cfg.start_timeout_s
        # Cold start: the first frame is already waiting at the PUSH socket when the service comes up.
        warm_id = f"bench-coldstart-{uuid.uuid4().hex[:6]}"
        send_first = asyncio.create_task(
            send_run(sender, warm_id, frames, 1, rate=None, tiled_base=FACILITY_TILED)
        )
        await receiver.start(deadline, service)
        while receiver.count(warm_id) < 1:
            service.check_alive()
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"no first point within {cfg.start_timeout_s} s; log:\n{service.log_tail()}"
                )
            await receiver.wait_for(warm_id, 1, timeout_s=0.5)
        await send_first
        first_arrival = receiver.arrivals[(warm_id, 0)]
        cold_client = first_arrival - service.started_perf
        cold = (receiver.first_point_ts - service.started_wall) if receiver.first_point_ts else cold_client
        log.info("cold start to first point: %.2f s (client side %.2f s)", cold, cold_client)

        runs: list[E2ERun] = []
        for mode in plan.modes:
            rates = plan.rates if mode == "facility" or plan.embedded_rates is None else plan.embedded_rates
            for rate in rates:
                service.check_alive()
                runs.append(await _one_run(service, sender, receiver, rss, frames, mode, rate, plan))
        return E2EResult(runs=runs, cold_start_s=cold, cold_start_first_point_s=cold_client,
                         service_log_tail=service.log_tail(),
                         cold_start_phases=cold_start_phases(service.log_path, service.started_wall))  # fmt: skip
    finally:
        await receiver.close()
        if rss is not None:
            rss.close()
        service.stop()
        sender.close(linger_ms=0)
