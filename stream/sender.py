"""The publishing side of the wire: BINDS a PUSH (lossless) or PUB socket and sends start / event / stop.

Used by ``latent-stream simulate``, replay and the benchmarks. With PUSH, a send waits until a consumer
is connected and has room (backpressure). With PUB, ZeroMQ drops whatever is sent before a subscriber
has joined ("slow joiner"), so the PUB side is an XPUB socket and `wait_for_subscriber` waits for the
first subscription before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import numpy as np
import zmq
import zmq.asyncio

from stream.bound_socket import BoundSocket
from stream.protocol import encode_event, encode_start, encode_stop

log = logging.getLogger(__name__)

SendPattern = Literal["push", "pub"]


class FrameSender(BoundSocket):
    """Async sender of wire messages. Use as ``async with FrameSender(address) as sender: ...``."""

    def __init__(
        self,
        address: str,
        pattern: SendPattern = "push",
        *,
        sndhwm: int = 16,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if pattern not in ("push", "pub"):
            raise ValueError(f"zmq pattern must be 'push' or 'pub', got {pattern!r}")
        super().__init__(address, zmq.PUSH if pattern == "push" else zmq.XPUB, sndhwm=sndhwm, context=context)
        self.pattern = pattern

    async def wait_for_subscriber(self, timeout: float | None = None) -> bool:
        """PUB only: wait until a subscriber joins. True when one did within ``timeout``."""
        if self.pattern != "pub":
            return True
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.socket.recv()
                    if message[:1] == b"\x01":  # XPUB: 0x01 + topic is a subscription
                        return True
        except TimeoutError:
            return False

    async def send_raw(self, payload: bytes) -> None:
        """Send bytes as one message (tests use it to send malformed input)."""
        await self.socket.send(payload, copy=False)

    async def send_start(self, run_id: str, run_name: str = "", **extra: Any) -> None:
        await self.send_raw(encode_start(run_id, run_name, **extra))

    async def send_event(self, frame_number: int, image: np.ndarray, *, tiled_url: str = "", **extra: Any) -> None:
        await self.send_raw(encode_event(frame_number, image, tiled_url=tiled_url, **extra))

    async def send_stop(self, num_frames: int | None, **extra: Any) -> None:
        await self.send_raw(encode_stop(num_frames, **extra))
