"""ASGI middleware that reads a request body whole before the app sees it.

Why: uvicorn hands a request body to the app in socket-sized pieces (~64 KiB), and Tiled 0.2.20's app
stacks five ``@app.middleware("http")`` (BaseHTTPMiddleware) layers, each of which wraps every
``receive()`` in its own task group. For a 10 MB frame that is ~150 pieces x 5 layers, and it cost
more server CPU than storing the frame (~35 ms per frame; benchmarks/persist.py). Tiled reads the whole
body into memory anyway (``await request.body()``), so handing it over in one piece changes nothing
for the app except the per-piece overhead.

Bodies larger than `max_body_bytes` are refused with 413 without being read in full, so a client
cannot make the server buffer without bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WholeBodyMiddleware:
    """Pass each HTTP request's body to `app` as one ``http.request`` message."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _too_large(send, self.max_body_bytes)
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                await self.app(scope, _replay(message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # chunked upload without a Content-Length
                await _too_large(send, self.max_body_bytes)
                return
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive() that yields `first` once, then defers to the server's (for http.disconnect)."""
    pending: list[Message] = [first]

    async def wrapped() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return wrapped


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail": "request body larger than {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
