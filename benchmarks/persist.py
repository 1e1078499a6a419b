"""Embedded-mode persistence: can the TiledWriter + embedded Tiled server keep up with the detector?

Runs the real pieces in this process and a child: `EmbeddedTiledServer` (its own process, as in
`latent-stream serve`) and `TiledWriter` (in this process's event loop, as in the service). Full-size
synthetic PILATUS3 2M frames (1679 x 1475 int32, ~9.9 MB).

- **rate**: publish `--frames` points at `--rate` Hz. Point -> fetchable, two ways: the writer's
  acknowledgement (its PATCH returned: the frame is in zarr and the catalog; every frame, its lag),
  and an outside client asking for a one-pixel slice of every `--probe-every`-th frame's URI once,
  `--window` s after its point (polling on only for a frame that was late). The client asks once
  on purpose: every Tiled request costs the server ~30 ms of CPU on this box, and polling from the
  point on made the server spend more on the polls than on the writes. Afterwards every frame is
  fetched whole and checked byte-identical.
- **burst**: publish `--burst` points at once; writer throughput = frames / (time to flush).
- **codecs** (`--codecs`): raw zarr write/read of one frame per codec, no Tiled (where the floor is).
- `--busy-core`: a child process keeps one core busy meanwhile (the service's own compute in
  `serve`), so the writer and Tiled get what is left of the machine.

The machine's load average is recorded with every figure (the box is shared).

Each measurement runs for both ways frames reach Tiled (`--transport local http`), one after the other,
against the same server: "local" writes them into the embedded server's own storage (what `serve` does with
the embedded Tiled), "http" PATCHes them (what it does with a facility Tiled).

    python -m benchmarks.persist --frames 100 --rate 10 --burst 40 --json /tmp/persist.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.fetch_probe import FetchProbe
from benchmarks.frames import synthetic_frames
from benchmarks.stats import LatencyStats

DISTINCT_FRAMES = 20  # generated frames are cycled: generating 100 full frames would dominate the run


@dataclass(slots=True)
class RateResult:
    rate_hz: float
    frames: int
    probed: int  # frames an outside client asked for, `window_s` after their point
    fetchable: int  # probed frames that answered 200, in time or before giving up
    within_window: int  # ... at the first ask, `window_s` after their point
    acked_within_window: int  # frames the writer had written within `window_s` of their point
    identical: int  # whole frames fetched back byte-identical
    window_s: float
    late_lag: dict[str, Any] | None  # probed frames that missed the window: point -> fetchable, LatencyStats in ms
    writer_lag: dict[str, Any] | None  # point -> write acknowledged (the writer's own view)
    frames_not_written: dict[str, int]
    server_cpu_s: float  # CPU time the Tiled child used during the run
    writer_cpu_s: float  # CPU time of this process (writer + poller + publisher)
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


@dataclass(slots=True)
class BurstResult:
    frames: int
    seconds: float
    frames_per_s: float
    server_cpu_s: float
    writer_cpu_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


@dataclass(slots=True)
class PersistReport:
    config: dict[str, Any]
    codecs: dict[str, dict[str, float]] = field(default_factory=dict)
    rate: dict[str, RateResult] = field(default_factory=dict)  # by transport: "local", "http"
    burst: dict[str, BurstResult] = field(default_factory=dict)


def _busy(stop: Any) -> None:
    """Keep one core busy with numpy work until `stop` is set (stands in for the service's compute)."""
    a = np.random.default_rng(0).random((256, 256))
    while not stop.is_set():
        a = np.sqrt(a * a + 1.0) - 0.5


def codec_floor(frame: np.ndarray, repeats: int = 8) -> dict[str, dict[str, float]]:
    """Raw zarr (local store) write/read of one frame per codec: the floor under any Tiled request."""
    import zarr
    import zarr.storage
    from zarr.codecs import BloscCodec, ZstdCodec

    codecs: dict[str, Any] = {
        "zstd (zarr default)": (ZstdCodec(),),
        "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "blosc-lz4-bitshuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
        "blosc-lz4-1-shuffle": (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),),
        "blosc-lz4-1-bitshuffle": (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),),
        "none": None,
    }
    out: dict[str, dict[str, float]] = {}
    for name, compressors in codecs.items():
        with tempfile.TemporaryDirectory() as d:
            arr = zarr.create_array(
                zarr.storage.LocalStore(d), shape=(1, *frame.shape), chunks=(1, *frame.shape),
                dtype=frame.dtype, compressors=compressors,
            )  # fmt: skip
            writes, reads = [], []
            for i in range(repeats):
                t0 = time.perf_counter()
                arr.resize((i + 1, *frame.shape))
                arr[i : i + 1] = frame[None]
                writes.append(time.perf_counter() - t0)
            for i in range(repeats):
                t0 = time.perf_counter()
                arr[i]
                reads.append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file()) / repeats
        out[name] = {
            "write_p50_ms": float(np.median(writes[1:]) * 1e3),
            "read_p50_ms": float(np.median(reads[1:]) * 1e3),
            "mb_per_frame": size / 1e6,
            "load_1min": os.getloadavg()[0],
        }
    return out


async def _publish_point(
    writer: Any, base_url: str, run_id: str, index: int, image: np.ndarray, rng: np.random.Generator
) -> Any:
    """As the pipeline does: the frame to the writer's frame port, then its point (returned)."""
    from operators.messages import Frame, Point, StageTimings
    from operators.tiled_layout import frame_uri

    writer.store_frame(Frame(run_id, index, image, "", time.time(), 0.0, run_key=run_id))
    point = Point(
        run_id=run_id, index=index, x=float(rng.standard_normal()), y=float(rng.standard_normal()),
        cluster=int(rng.integers(0, 4)), novelty=float(rng.random()),
        tiled_url=frame_uri(base_url, run_id, index), timestamp=time.time(),
        timings=StageTimings(total=0.03, encode=0.007, project=0.001),
        latent=rng.standard_normal(512).astype(np.float32), stored_by_service=True, run_key=run_id,
    )  # fmt: skip
    await writer.publish(point)
    return point


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def run_rate(ep: Any, server_pid: int, data_dir: Path, frames: list[np.ndarray], n: int,
                   rate_hz: float, window_s: float, probe_every: int, transport: str) -> RateResult:  # fmt: skip
    from operators.messages import RunStarted, RunStopped
    from operators.persist.writer import TiledWriter

    rng = np.random.default_rng(0)
    run_id = f"bench-rate-{transport}-{int(time.time())}"
    server, me = psutil.Process(server_pid), psutil.Process()
    writer = TiledWriter(ep.url, ep.api_key, data_dir=data_dir / f"writer-rate-{transport}",
                         local_frames=transport == "local")  # fmt: skip
    await writer.start()
    await writer.publish(RunStarted(run_id, "persist bench (rate)", time.time(), run_key=run_id))
    assert await writer.flush(30)
    poller = FetchProbe(ep.api_key, window_s, give_up_s=60.0)
    load_before, cpu_s0, cpu_w0 = os.getloadavg(), _cpu(server), _cpu(me)
    urls: dict[int, str] = {}
    by_index: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i / rate_hz - time.perf_counter()))
        image = frames[i % len(frames)]
        p = await _publish_point(writer, ep.url, run_id, i, image, rng)
        urls[i], by_index[i] = p.tiled_url, image
        if i % probe_every == 0:
            poller.watch(i, p.tiled_url, time.perf_counter())
    await writer.publish(RunStopped(run_id, time.time(), n, n, run_key=run_id))
    await poller.finish()
    await writer.flush(120)
    load_after, cpu_s1, cpu_w1 = os.getloadavg(), _cpu(server), _cpu(me)
    stats = writer.stats()
    lags = list(writer._lag.recent)  # the writer's own view (unix s ack - point timestamp)
    await writer.stop()
    identical = await poller.identical(urls, by_index)
    await poller.aclose()
    late = list(poller.late_s.values())
    return RateResult(
        rate_hz=rate_hz, frames=n, probed=len(range(0, n, probe_every)),
        fetchable=len(poller.on_time) + len(late), within_window=len(poller.on_time),
        acked_within_window=sum(1 for v in lags if v <= window_s), identical=identical,
        window_s=window_s, late_lag=LatencyStats.from_seconds(late).to_dict() if late else None,
        writer_lag=LatencyStats.from_seconds(lags).to_dict() if lags else None,
        frames_not_written=dict(stats.frames_not_written), server_cpu_s=cpu_s1 - cpu_s0,
        writer_cpu_s=cpu_w1 - cpu_w0, load_before=load_before, load_after=load_after,
    )  # fmt: skip


async def run_burst(
    ep: Any, server_pid: int, data_dir: Path, frames: list[np.ndarray], n: int, transport: str
) -> BurstResult:
    from operators.messages import RunStarted, RunStopped
    from operators.persist.writer import TiledWriter

    rng = np.random.default_rng(1)
    run_id = f"bench-burst-{transport}-{int(time.time())}"
    server, me = psutil.Process(server_pid), psutil.Process()
    # a buffer that holds the whole burst: this measures throughput, not the drop policy
    writer = TiledWriter(ep.url, ep.api_key, data_dir=data_dir / f"writer-burst-{transport}",
                         max_buffer_bytes=(n + 1) * frames[0].nbytes, local_frames=transport == "local")  # fmt: skip
    await writer.start()
    await writer.publish(RunStarted(run_id, "persist bench (burst)", time.time(), run_key=run_id))
    assert await writer.flush(30)
    load_before, cpu_s0, cpu_w0 = os.getloadavg(), _cpu(server), _cpu(me)
    t0 = time.perf_counter()
    for i in range(n):
        await _publish_point(writer, ep.url, run_id, i, frames[i % len(frames)], rng)
    await writer.publish(RunStopped(run_id, time.time(), n, n, run_key=run_id))
    assert await writer.flush(600), "burst did not drain in 10 min"
    seconds = time.perf_counter() - t0
    load_after, cpu_s1, cpu_w1 = os.getloadavg(), _cpu(server), _cpu(me)
    stats = writer.stats()
    await writer.stop()
    if stats.frames_written != n:
        raise RuntimeError(f"burst: {stats.frames_written}/{n} frames written ({stats.frames_not_written})")
    return BurstResult(n, seconds, n / seconds, cpu_s1 - cpu_s0, cpu_w1 - cpu_w0, load_before, load_after)


async def main_async(args: argparse.Namespace) -> PersistReport:
    from operators.persist.server import EmbeddedTiledServer

    frames = synthetic_frames(min(DISTINCT_FRAMES, max(args.frames, args.burst, 1)), seed=3)
    report = PersistReport(config={k: v for k, v in vars(args).items() if k != "json"})
    if args.codecs:
        report.codecs = codec_floor(frames[len(frames) // 2])
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=_busy, args=(stop,), daemon=True) if args.busy_core else None
    with tempfile.TemporaryDirectory(prefix="persist-bench-") as tmp:
        data_dir = Path(tmp)
        srv = EmbeddedTiledServer(data_dir, port=0)
        ep = await srv.start()
        assert srv._proc is not None
        if busy is not None:
            busy.start()
        try:
            for transport in args.transport:
                if args.frames:
                    report.rate[transport] = await run_rate(ep, srv._proc.pid, data_dir, frames, args.frames,
                                                            args.rate, args.window, args.probe_every, transport)
                if args.burst:
                    report.burst[transport] = await run_burst(ep, srv._proc.pid, data_dir, frames, args.burst,
                                                              transport)  # fmt: skip
        finally:
            if busy is not None:
                stop.set()
                busy.join(5)
            await srv.stop()
    return report


def _print(report: PersistReport) -> None:
    for name, c in report.codecs.items():
        print(f"codec {name:22s} write {c['write_p50_ms']:6.1f} ms  read {c['read_p50_ms']:6.1f} ms  "
              f"{c['mb_per_frame']:5.2f} MB/frame  (load {c['load_1min']:.1f})")  # fmt: skip
    for transport, r in report.rate.items():
        wl = r.writer_lag or {}
        late = f", the late at p50 {r.late_lag['p50_ms']:.0f} ms" if r.late_lag else ""
        print(
            f"{transport:5s} rate {r.rate_hz:g} Hz x {r.frames}: written within {r.window_s:g} s {r.acked_within_window}/{r.frames} "
            f"(writer ack lag p50 {wl.get('p50_ms', float('nan')):.0f} ms p99 {wl.get('p99_ms', float('nan')):.0f} ms "
            f"max {wl.get('max_ms', float('nan')):.0f} ms); probed {r.probed}: fetchable within {r.window_s:g} s "
            f"{r.within_window}{late}; identical {r.identical}/{r.frames}; "
            f"not written {r.frames_not_written}; "
            f"CPU server {r.server_cpu_s:.1f} s writer {r.writer_cpu_s:.1f} s; "
            f"load {r.load_before[0]:.1f} -> {r.load_after[0]:.1f}"
        )
    for transport, b in report.burst.items():
        print(
            f"{transport:5s} burst {b.frames}: {b.seconds:.1f} s, {b.frames_per_s:.1f} frames/s; CPU server {b.server_cpu_s:.1f} s "
            f"({b.server_cpu_s / b.frames * 1e3:.0f} ms/frame) writer {b.writer_cpu_s:.1f} s "
            f"({b.writer_cpu_s / b.frames * 1e3:.0f} ms/frame); load {b.load_before[0]:.1f} -> {b.load_after[0]:.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100, help="frames at --rate (0: skip)")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=2.0, help="fetchable within this many s of the point")
    parser.add_argument("--probe-every", type=int, default=5, help="poll every k-th frame's URI")
    parser.add_argument("--burst", type=int, default=40, help="frames published at once (0: skip)")
    parser.add_argument("--codecs", action="store_true", help="also time raw zarr codecs")
    parser.add_argument("--busy-core", action="store_true", help="keep one core busy (the service's compute)")
    parser.add_argument("--transport", nargs="+", choices=("local", "http"), default=["local", "http"],
                        help="local: frames into the embedded server's storage (serve's embedded mode); "
                             "http: PATCHed (a facility Tiled)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    _print(report)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
