"""``latent-stream replay SOURCE`` and ``latent-stream verify``: recorded scans back over ZeroMQ.

Sources (`open_source`):
- a directory of TIFF / CBF / EDF frames (tifffile, fabio), sorted by name;
- an HDF5 / NeXus file (`--dataset`, default /entry/data/data), one frame per leading index;
- a .npy stack (N, H, W);
- a Tiled URI of a frame stack (`http://HOST:PORT/api/v1/array/full/<path>` or `/api/v1/metadata/<path>`):
  replayed events carry each frame's Tiled URI, so the service does not store them again.

Recorded cadence: `timestamps.npy` in a frame directory, a `timestamps` dataset beside the HDF5 frames,
or `<stem>.timestamps.npy` beside a .npy stack (seconds, what `latent-stream record` writes).

Every replayed run leaves a report (`<report_dir>/<run_id>.json`: frames sent, first/last frame
number, times), which `latent-stream verify` compares with what the service stored in Tiled.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import numpy as np
import typer

from stream.record import record  # noqa: F401 - the CLI registers `record` from this module

log = logging.getLogger(__name__)

FRAME_SUFFIXES = (".tif", ".tiff", ".cbf", ".edf")
DEFAULT_DATASET = "/entry/data/data"
DEFAULT_REPORT_DIR = Path("replay-reports")


class ReplayError(ValueError):
    """The source cannot be replayed (unknown kind, empty, unreadable, no timestamps for --speed)."""


@dataclass(slots=True)
class RecordedFrame:
    index: int  # position in the source, 0-based: becomes the event's frame_number
    image: np.ndarray
    tiled_url: str = ""


@dataclass(slots=True)
class FrameSource:
    """A recorded scan: how many frames, their recorded times (if any), and a way to read them in order."""

    name: str
    kind: str  # "directory" | "hdf5" | "npy" | "tiled"
    count: int
    timestamps: np.ndarray | None  # seconds, one per frame, or None
    read: Any  # (i) -> RecordedFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    close: Any = None

    def __iter__(self) -> Iterator[RecordedFrame]:
        for i in range(self.count):
            yield self.read(i)


def open_source(source: str, *, dataset: str = DEFAULT_DATASET, api_key: str | None = None) -> FrameSource:
    """Open any supported recorded scan (see module doc)."""
    if source.startswith(("http://", "https://")):
        return _tiled_source(source, api_key)
    path = Path(source)
    if path.is_dir():
        return _directory_source(path)
    if not path.exists():
        raise ReplayError(f"{source}: no such file or directory")
    if path.suffix == ".npy":
        return _npy_source(path)
    if path.suffix in (".h5", ".hdf5", ".nxs", ".nx5", ".hdf"):
        return _hdf5_source(path, dataset)
    raise ReplayError(f"{source}: not a frame directory, HDF5/NeXus file, .npy stack or Tiled URI")


def _optional_timestamps(path: Path, count: int) -> np.ndarray | None:
    if not path.exists():
        return None
    ts = np.load(path).astype(np.float64).reshape(-1)
    if len(ts) != count:
        raise ReplayError(f"{path}: {len(ts)} timestamps for {count} frames")
    return ts


def _directory_source(path: Path) -> FrameSource:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ReplayError(f"{path}: no {'/'.join(FRAME_SUFFIXES)} frames")

    def read(i: int) -> RecordedFrame:
        f = files[i]
        if f.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(f)
        else:
            import fabio

            image = fabio.open(str(f)).data
        return RecordedFrame(i, np.ascontiguousarray(image))

    ts = _optional_timestamps(path / "timestamps.npy", len(files))
    return FrameSource(path.name, "directory", len(files), ts, read, {"source": str(path)})


def _npy_source(path: Path) -> FrameSource:
    stack = np.load(path, mmap_mode="r")
    if stack.ndim != 3:
        raise ReplayError(f"{path}: expected an (N, H, W) stack, got shape {stack.shape}")
    ts = _optional_timestamps(path.with_name(path.stem + ".timestamps.npy"), len(stack))
    return FrameSource(
        path.stem, "npy", len(stack), ts, lambda i: RecordedFrame(i, np.ascontiguousarray(stack[i])),
        {"source": str(path)},
    )  # fmt: skip


def _hdf5_source(path: Path, dataset: str) -> FrameSource:
    import h5py

    f = h5py.File(path, "r")
    if dataset not in f:
        f.close()
        raise ReplayError(f"{path}: no dataset {dataset} (give --dataset)")
    data = f[dataset]
    if data.ndim != 3:
        f.close()
        raise ReplayError(f"{path}:{dataset}: expected (N, H, W), got shape {data.shape}")
    ts = None
    parent = data.parent
    if "timestamps" in parent and len(parent["timestamps"]) == len(data):
        ts = np.asarray(parent["timestamps"], dtype=np.float64)
    return FrameSource(
        path.stem, "hdf5", len(data), ts, lambda i: RecordedFrame(i, np.ascontiguousarray(data[i])),
        {"source": str(path), "dataset": dataset}, close=f.close,
    )  # fmt: skip


def _tiled_source(uri: str, api_key: str | None) -> FrameSource:
    from tiled.client import from_uri

    parsed = urlparse(uri)
    marker = next((m for m in ("/api/v1/array/full/", "/api/v1/array/block/", "/api/v1/metadata/")
                   if m in parsed.path), None)  # fmt: skip
    if marker is None:
        raise ReplayError(f"{uri}: expected http://HOST/api/v1/array/full/<path> or /api/v1/metadata/<path>")
    prefix, node_path = parsed.path.split(marker, 1)
    base = f"{parsed.scheme}://{parsed.netloc}{prefix}"
    node_path = unquote(node_path.strip("/"))
    client = from_uri(base, api_key=api_key)
    node = client
    for part in node_path.split("/"):
        node = node[part]
    if len(node.shape) != 3:
        raise ReplayError(f"{uri}: expected an (N, H, W) frame stack, got shape {node.shape}")
    full = f"{base}/api/v1/array/full/{node_path}"
    md = dict(node.metadata)
    ts = md.get("timestamps")
    timestamps = np.asarray(ts, dtype=np.float64) if ts is not None and len(ts) == node.shape[0] else None
    return FrameSource(
        node_path.replace("/", "_"), "tiled", int(node.shape[0]), timestamps,
        lambda i: RecordedFrame(i, np.ascontiguousarray(node[i]), tiled_url=f"{full}?slice={i}"),
        {"source": uri}, close=client.context.close,
    )  # fmt: skip


@dataclass(slots=True)
class ReplayReport:
    """What one replayed run sent (written as `<report_dir>/<run_id>.json`)."""

    run_id: str
    source: str
    sent: int
    first_index: int | None
    last_index: int | None
    started_at: float
    finished_at: float
    carried_tiled_urls: bool


def _delays(src: FrameSource, rate: float | None, speed: float | None) -> list[float]:
    """Seconds to wait before each frame (relative to the previous one)."""
    if rate is not None and speed is not None:
        raise ReplayError("give --rate or --speed, not both")
    if speed is not None:
        if src.timestamps is None:
            raise ReplayError(f"{src.name}: no recorded timestamps; use --rate")
        if speed <= 0:
            raise ReplayError("--speed must be > 0")
        return [0.0, *(max(0.0, float(d)) / speed for d in np.diff(src.timestamps))]
    if rate is None:  # the recorded cadence when there is one, else 10 Hz
        return _delays(src, 10.0, None) if src.timestamps is None else _delays(src, None, 1.0)
    if rate < 0:
        raise ReplayError("--rate must be >= 0")
    return [0.0 if rate == 0 else 1.0 / rate] * src.count


async def replay_source(
    src: FrameSource,
    address: str,
    *,
    pattern: str = "push",
    rate: float | None = None,
    speed: float | None = None,
    loops: int = 1,
    run_id: str | None = None,
    report_dir: Path = DEFAULT_REPORT_DIR,
    progress: bool = True,
    wait_subscriber: float = 10.0,
) -> list[ReplayReport]:
    """Send the scan `loops` times (0 = until cancelled), one run per pass; return what was sent."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stream.sender import FrameSender

    delays = _delays(src, rate, speed)
    base_id = run_id or f"replay-{src.name}-{uuid.uuid4().hex[:8]}"
    report_dir.mkdir(parents=True, exist_ok=True)
    reports: list[ReplayReport] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    async with FrameSender(address, pattern) as sender:  # type: ignore[arg-type]
        if pattern == "pub" and not await sender.wait_for_subscriber(wait_subscriber):
            log.warning("no subscriber on %s after %.0f s: sending anyway", address, wait_subscriber)
        with Progress(*columns, disable=not progress) as bar:
            n = 0
            while loops == 0 or n < loops:
                n += 1
                rid = base_id if loops == 1 else f"{base_id}-{n}"
                task = bar.add_task(f"{rid}", total=src.count)
                reports.append(
                    await _send_run(
                        src, sender, rid, delays, report_dir, functools.partial(bar.advance, task)
                    )
                )
    return reports


async def _send_run(
    src: FrameSource, sender: Any, run_id: str, delays: list[float], report_dir: Path, advance: Any
) -> ReplayReport:
    first = src.read(0) if src.count else None
    h, w = first.image.shape if first is not None else (0, 0)
    dtype = str(first.image.dtype) if first is not None else ""
    started = time.time()
    report = ReplayReport(run_id, src.metadata.get("source", src.name), 0, None, None, started, started,
                          src.kind == "tiled")  # fmt: skip
    await sender.send_start(
        run_id, src.name, width=w, height=h, data_type=dtype, tiled_url="", replay=True, **src.metadata
    )
    next_at = time.monotonic()
    try:
        for i in range(src.count):
            frame = first if i == 0 and first is not None else await asyncio.to_thread(src.read, i)
            next_at += delays[i]
            wait = next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await sender.send_event(frame.index, frame.image, tiled_url=frame.tiled_url)
            report.sent += 1
            report.first_index = frame.index if report.first_index is None else report.first_index
            report.last_index = frame.index
            advance()
    finally:
        await sender.send_stop(report.sent)
        report.finished_at = time.time()
        (report_dir / f"{run_id}.json").write_text(json.dumps(asdict(report), indent=1))
        log.info("run %s: %d frame(s) sent from %s", run_id, report.sent, report.source)
    return report


def replay(
    source: Annotated[str, typer.Argument(help="Frame directory, HDF5/NeXus file, .npy stack or Tiled URI.")],
    zmq: Annotated[str, typer.Option(help="Address to bind.")] = "tcp://127.0.0.1:5000",
    zmq_pattern: Annotated[str, typer.Option(help="push (lossless) or pub.")] = "push",
    rate: Annotated[float | None, typer.Option(help="Frames per second (0: as fast as accepted).")] = None,
    speed: Annotated[float | None, typer.Option(help="Multiple of the recorded cadence.")] = None,
    loop: Annotated[
        bool, typer.Option(help="Replay again and again (one run per pass) until Ctrl-C.")
    ] = False,
    dataset: Annotated[str, typer.Option(help="HDF5/NeXus dataset of the frames.")] = DEFAULT_DATASET,
    run_id: Annotated[
        str | None, typer.Option(help="Run id to send (default replay-<name>-<random>).")
    ] = None,
    tiled_api_key: Annotated[str | None, typer.Option(help="API key when SOURCE is a Tiled URI.")] = None,
    report_dir: Annotated[Path, typer.Option(help="Where each run's send report goes.")] = DEFAULT_REPORT_DIR,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay a recorded scan over ZeroMQ, at --rate HZ or --speed X of its recorded timestamps."""
    try:
        src = open_source(source, dataset=dataset, api_key=tiled_api_key or os.environ.get("TILED_API_KEY"))
        _delays(src, rate, speed)  # option errors before binding anything
    except ReplayError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        reports = asyncio.run(
            replay_source(
                src,
                zmq,
                pattern=zmq_pattern,
                rate=rate,
                speed=speed,
                loops=0 if loop else 1,
                run_id=run_id,
                report_dir=report_dir,
                progress=progress,
            )
        )
    except KeyboardInterrupt:
        typer.echo("replay interrupted")
        return
    finally:
        if src.close is not None:
            src.close()
    for r in reports:
        typer.echo(f"{r.run_id}: sent {r.sent} frame(s) (report in {report_dir / (r.run_id + '.json')})")


# ---- verification -------------------------------------------------------------------------------


async def verify_runs(
    run_ids: list[str],
    *,
    report_dir: Path,
    tiled_url: str,
    tiled_api_key: str | None,
    service_url: str | None = None,
    token: str | None = None,
) -> list[dict[str, Any]]:
    """Per run: sent (replay report), processed / stored (Tiled), lost; service-wide ingest counters."""
    import httpx

    from operators.persist.catalog import TiledRunCatalog

    if not run_ids:
        run_ids = sorted(p.stem for p in report_dir.glob("*.json"))
    service: dict[str, Any] = {}
    if service_url:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            r = await client.get(f"{service_url.rstrip('/')}/api/health", headers=headers)
            r.raise_for_status()
            service = r.json().get("ingest", {})
    catalog = TiledRunCatalog(tiled_url, tiled_api_key)
    out = []
    try:
        for rid in run_ids:
            report_path = report_dir / f"{rid}.json"
            sent = json.loads(report_path.read_text())["sent"] if report_path.exists() else None
            stored = await catalog.run_report(rid)
            row: dict[str, Any] = {"run_id": rid, "sent": sent}
            if stored is None:
                row.update(status="not in Tiled", processed=0, stored=0, lost=sent)
            else:
                sent = sent if sent is not None else stored["num_frames"]
                rows = stored["rows_stored"]
                processed = stored["processed"] or rows  # the run's own count when it was closed cleanly
                row.update(
                    sent=sent, status=stored["status"], announced=stored["num_frames"], processed=processed,
                    stored=rows, frames_stored=stored["frames_stored"],
                    frames_not_written=stored["frames_not_written"],
                    lost=None if sent is None else max(0, sent - rows),
                )  # fmt: skip
            row["ok"] = row.get("sent") is not None and row.get("sent") == row.get("processed") == row.get(
                "stored"
            )
            out.append(row)
    finally:
        await asyncio.to_thread(catalog.close)
    if service:
        rejected = service.get("rejected", {})
        dropped = service.get("dropped", {})
        for row in out:  # the service counts ingest for all runs together
            row["service"] = {
                "received": service.get("received"),
                "rejected": sum(rejected.values()) if isinstance(rejected, dict) else rejected,
                "dropped": sum(dropped.values()) if isinstance(dropped, dict) else dropped,
            }
    return out


def verify(
    run_id: Annotated[
        list[str] | None, typer.Argument(help="Run ids (default: every replay report).")
    ] = None,
    report_dir: Annotated[Path, typer.Option(help="Where replay wrote its reports.")] = DEFAULT_REPORT_DIR,
    tiled: Annotated[str, typer.Option(help="Tiled server the service wrote to.")] = "http://127.0.0.1:8000",
    tiled_api_key: Annotated[
        str | None, typer.Option(help="Its API key (default: DATA_DIR/tiled-api-key).")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="The service's --data-dir (for the embedded key).")] = Path(
        "data"
    ),
    service: Annotated[str | None, typer.Option(help="Service URL for its ingest counters.")] = None,
    token: Annotated[str | None, typer.Option(help="The service's --token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """After a replay: per run, frames sent, processed, stored and lost (exit 1 unless sent = processed)."""
    key = tiled_api_key
    if key is None and (data_dir / "tiled-api-key").exists():
        key = (data_dir / "tiled-api-key").read_text().strip()
    rows = asyncio.run(verify_runs(run_id or [], report_dir=report_dir, tiled_url=tiled, tiled_api_key=key,
                                   service_url=service, token=token))  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        for r in rows:
            typer.echo(
                f"{r['run_id']}: sent {r.get('sent')} processed {r.get('processed')} stored {r.get('stored')} "
                f"lost {r.get('lost')} [{r.get('status')}] {'OK' if r['ok'] else 'MISMATCH'}"
            )
            if r.get("frames_not_written"):
                typer.echo(f"  frames not written: {r['frames_not_written']}")
            if "service" in r:
                typer.echo(f"  service ingest (all runs): {r['service']}")
    if not rows or not all(r["ok"] for r in rows):
        raise typer.Exit(1)
