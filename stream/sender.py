"""The publishing side of the wire: BINDS a PUSH (lossless) or PUB socket and sends start / event / stop.

Used by ``latent-stream simulate``, replay and the benchmarks. With PUSH, a send waits until a consumer
is connected and has room (backpressure). With PUB, ZeroMQ drops whatever is sent before a subscriber
has joined ("slow joiner"), so the PUB side is an XPUB socket and `wait_for_subscriber` waits for the
first subscription before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import zmq
import zmq.asyncio

from stream.protocol import encode_event, encode_start, encode_stop

log = logging.getLogger(__name__)

SendPattern = Literal["push", "pub"]


class FrameSender:
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
        self.address = address
        self.pattern = pattern
        self.sndhwm = sndhwm  # ~10 MB per full frame: keep ZeroMQ's own buffer small
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        sock = self._context.socket(zmq.PUSH if self.pattern == "push" else zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.LINGER, 2000)  # let queued frames leave at close, but never hang forever
        sock.bind(self.address)
        self._socket = sock
        log.info("sender bound %s (%s)", self.address, self.pattern)

    def close(self, linger_ms: int | None = None) -> None:
        if self._socket is not None:
            self._socket.close(linger=linger_ms)
            self._socket = None

    @property
    def endpoint(self) -> str:
        """The bound address, resolved (``tcp://127.0.0.1:*`` binds a free port)."""
        return self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    @property
    def socket(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            raise RuntimeError("sender is not open")
        return self._socket

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
