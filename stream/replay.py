"""``latent-stream replay SOURCE`` and ``latent-stream verify``: recorded scans back over ZeroMQ.

Sources (`open_source`, stream/readers/): a directory of TIFF (multi-page too) / CBF / EDF frames or one such
file, an HDF5 / NeXus file (`--dataset`, default /entry/data/data; EIGER master files with external links and
bitshuffle-LZ4 chunks included), a .npy stack (N, H, W), or a Tiled URI of a frame stack (replayed events carry
each frame's Tiled URI, so the service does not store them again). Per-frame header metadata (a CBF's
exposure time and date) travels as extra keys of each event.

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
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from stream.readers import (  # noqa: F401 - re-exported: replay's callers import them from here
    DEFAULT_DATASET,
    FRAME_SUFFIXES,
    FrameSource,
    RecordedFrame,
    ReplayError,
    open_source,
)
from stream.record import record  # noqa: F401 - the CLI registers `record` from this module

log = logging.getLogger(__name__)

DEFAULT_REPORT_DIR = Path("replay-reports")


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
    wire_format: str = "msgpack",
) -> list[ReplayReport]:
    """Send the scan `loops` times (0 = until cancelled), one run per pass; return what was sent.

    ``wire_format`` "stream2": DECTRIS stream v2 over PUSH, frames as recorded (stream/stream2_sender.py).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stream.sender import FrameSender

    delays = _delays(src, rate, speed)
    base_id = run_id or f"replay-{src.name}-{uuid.uuid4().hex[:8]}"
    report_dir.mkdir(parents=True, exist_ok=True)
    reports: list[ReplayReport] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    sender_cm: Any = FrameSender(address, pattern)  # type: ignore[arg-type]
    if wire_format == "stream2":
        from stream.stream2_sender import Stream2FrameSender

        if pattern != "push":
            raise ReplayError("stream v2 is sent with PUSH only")
        sender_cm = Stream2FrameSender(address, detector=None, number_of_images=src.count)
    async with sender_cm as sender:
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
            await sender.send_event(frame.index, frame.image, tiled_url=frame.tiled_url, **frame.metadata)
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
    tiled_api_key: Annotated[
        str | None, typer.Option(envvar="TILED_API_KEY", help="API key when SOURCE is a Tiled URI.")
    ] = None,
    report_dir: Annotated[Path, typer.Option(help="Where each run's send report goes.")] = DEFAULT_REPORT_DIR,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    wire_format: Annotated[
        str, typer.Option("--format", help="msgpack (arroyo) | stream2 (DECTRIS stream v2, PUSH).")
    ] = "msgpack",
) -> None:
    """Replay a recorded scan over ZeroMQ, at --rate HZ or --speed X of its recorded timestamps."""
    if wire_format not in ("msgpack", "stream2") or (wire_format == "stream2" and zmq_pattern != "push"):
        raise typer.BadParameter("--format must be msgpack, or stream2 with --zmq-pattern push")
    try:
        src = open_source(source, dataset=dataset, api_key=tiled_api_key)
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
                wire_format=wire_format,
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
