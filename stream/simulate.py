"""``latent-stream simulate``: a synthetic beamline that streams a scan over ZeroMQ.

Binds PUSH (default; lossless, the service connects with PULL) or PUB (as the ALS simulators do) and
sends a start document, one event per frame of `stream.synthetic.generate_scan`, and a stop document.
Frames carry an empty ``tiled_url`` (the service stores them) and their ground-truth phase as metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import zmq.asyncio

from stream.sender import FrameSender, SendPattern
from stream.stream2_sender import Stream2FrameSender

WireFormat = Literal["msgpack", "stream2"]

log = logging.getLogger(__name__)

DEFAULT_SCENARIO = "film_formation"


@dataclass(frozen=True, slots=True)
class SimulationReport:
    run_id: str
    frames: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


async def simulate(
    address: str = "tcp://127.0.0.1:5000",
    *,
    pattern: SendPattern = "push",
    frames: int = 200,
    rate: float = 10.0,
    scenario: str = DEFAULT_SCENARIO,
    seed: int = 0,
    run_id: str | None = None,
    subscriber_timeout: float | None = None,
    context: zmq.asyncio.Context | None = None,
    wire_format: WireFormat = "msgpack",
) -> SimulationReport:
    """Stream one synthetic scan. ``rate`` <= 0 sends as fast as the receiver takes frames.

    ``wire_format`` "stream2": DECTRIS stream v2 (PUSH only) on an EIGER2 X 4M's grid (stream/stream2_sender.py).
    """
    from stream.synthetic import SCENARIOS, generate_scan  # numba kernels: imported only when simulating

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(sorted(SCENARIOS))}")
    if frames < 0:
        raise ValueError("frames must be >= 0")
    run_id = run_id or f"sim-{scenario}-{seed}-{uuid.uuid4().hex[:8]}"
    period = 1.0 / rate if rate > 0 else 0.0
    scan = generate_scan(scenario, frames, seed=seed, frame_period_s=period or 0.1)
    own_context = context is None
    ctx = context or zmq.asyncio.Context()
    sender: FrameSender | Stream2FrameSender
    if wire_format == "stream2":
        if pattern != "push":
            raise ValueError("stream v2 is sent with PUSH only")
        sender = Stream2FrameSender(address, number_of_images=frames, context=ctx)
    else:
        sender = FrameSender(address, pattern, context=ctx)
    sender.open()
    finished = False
    try:
        if pattern == "pub":
            log.info("waiting for a subscriber on %s", sender.endpoint)
            if not await sender.wait_for_subscriber(subscriber_timeout):
                raise TimeoutError(f"no subscriber connected to {sender.endpoint} in {subscriber_timeout} s")
        # Render the next frame in a thread while this one is paced and sent.
        upcoming = asyncio.create_task(asyncio.to_thread(next, scan, None))
        first = await upcoming
        sent = 0
        if first is not None:
            height, width = first.image.shape
            await sender.send_start(
                run_id, f"synthetic {scenario} (seed {seed})", width=width, height=height,
                data_type=str(first.image.dtype), scenario=scenario, seed=seed,
            )
        else:
            await sender.send_start(run_id, f"synthetic {scenario} (seed {seed})", scenario=scenario, seed=seed)
        log.info("run %s: streaming %d %s frame(s) at %s Hz to %s", run_id, frames, scenario,
                 rate if rate > 0 else "max", address)
        t0 = time.perf_counter()
        frame = first
        while frame is not None:
            upcoming = asyncio.create_task(asyncio.to_thread(next, scan, None))
            if period:
                delay = t0 + sent * period - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await sender.send_event(frame.index, frame.image, phase=frame.phase, phase_name=frame.phase_name)
            sent += 1
            frame = await upcoming
        await sender.send_stop(sent)
        elapsed = time.perf_counter() - t0
        log.info("run %s: sent %d frame(s) in %.1f s", run_id, sent, elapsed)
        finished = True
        return SimulationReport(run_id, sent, elapsed)
    finally:
        # Finished: give queued frames time to reach a slow (back-pressuring) receiver, never forever.
        # Interrupted: drop them at once.
        sender.close(linger_ms=10_000 if finished else 0)
        if own_context:
            await asyncio.to_thread(ctx.term)
