"""``latent-stream demo``: the service on embedded defaults plus a simulated beamline, in one process.

Embedded Tiled, the shipped default bundle, the live page on http://127.0.0.1:8765/, and a synthetic
beamline that streams one scan per scenario (each a run) over a private ZeroMQ address. After the
scans the service keeps serving (the page stays browsable) until Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from stream.config import ServeSettings
from stream.serve import Service
from stream.simulate import WireFormat, simulate
from stream.sources import Stream2Source

log = logging.getLogger(__name__)

DEMO_SCENARIOS = ("film_formation", "crystallization", "gisaxs_ordering", "shear_alignment")


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def demo_settings(wire_format: WireFormat = "msgpack", **overrides: object) -> ServeSettings:
    """Serve settings for the demo: a private frame address, PUSH/PULL (lossless), in ``wire_format``."""
    port = _free_tcp_port()
    values: dict[str, object] = {"zmq": f"tcp://127.0.0.1:{port}", "zmq_pattern": "pull"}
    if wire_format == "stream2":
        values["source"] = f"stream2://127.0.0.1:{port}"
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeSettings(**values)  # type: ignore[arg-type]


async def demo(
    settings: ServeSettings,
    *,
    frames: int = 300,
    rate: float = 10.0,
    seed: int = 0,
    scenarios: tuple[str, ...] = DEMO_SCENARIOS,
) -> None:
    """Serve, stream the scans, keep serving until SIGINT/SIGTERM."""
    service = Service(settings)
    serving = asyncio.create_task(service.run(), name="service")
    ready = asyncio.create_task(service.wait_persisting())  # the demo's frames are stored by the service
    await asyncio.wait([serving, ready], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():  # failed to start: surface its error
        ready.cancel()
        await serving
        return
    log.info("demo: open %s/ in a browser; streaming %d scan(s) of %d frames at %g Hz",
             service.url, len(scenarios), frames, rate)
    wire_format: WireFormat = "stream2" if isinstance(settings.source_spec, Stream2Source) else "msgpack"
    beamline = asyncio.create_task(_beamline(settings.zmq, scenarios, frames, rate, seed, wire_format),
                                   name="beamline")  # fmt: skip
    try:
        await serving  # returns once a signal stopped the service
    finally:
        beamline.cancel()
        await asyncio.gather(beamline, return_exceptions=True)


async def _beamline(
    address: str, scenarios: tuple[str, ...], frames: int, rate: float, seed: int, wire_format: WireFormat
) -> None:
    try:
        for i, scenario in enumerate(scenarios):
            report = await simulate(address, pattern="push", frames=frames, rate=rate, scenario=scenario,
                                    seed=seed + i, wire_format=wire_format)
            log.info("demo: scan %s done (%d frames at %.1f Hz)", report.run_id, report.frames, report.rate)
            await asyncio.sleep(2.0)
    except Exception:  # the service keeps serving what it has; say why the beamline stopped
        log.exception("demo: the simulated beamline failed")
        return
    log.info("demo: all scans streamed; still serving, Ctrl-C to stop")
