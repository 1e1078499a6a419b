"""The bound ZeroMQ socket both senders send through (stream/sender.py, stream/stream2_sender.py): open, close,
the resolved endpoint, and ``async with``."""

from __future__ import annotations

import logging
from typing import Self

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)


class BoundSocket:
    """Binds `address` with a socket of `socket_type` on `open()` (or ``async with``); closes on `close()`."""

    def __init__(
        self, address: str, socket_type: int, *, sndhwm: int, context: zmq.asyncio.Context | None
    ) -> None:
        self.address = address
        self.sndhwm = sndhwm  # ~10 MB per full frame: keep ZeroMQ's own buffer small
        self._socket_type = socket_type
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        sock = self._context.socket(self._socket_type)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.LINGER, 2000)  # let queued frames leave at close, but never hang forever
        sock.bind(self.address)
        self._socket = sock
        log.info("%s bound %s", type(self).__name__, self.address)

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
