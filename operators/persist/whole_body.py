"""ASGI middleware that reads a request body whole before the app sees it.

Why: uvicorn hands a request body to the app in socket-sized pieces (~64 KiB), and Tiled 0.2.20's app
stacks five ``@app.middleware("http")`` (BaseHTTPMiddleware) layers, each of which wraps every
``receive()`` in its own task group. For a 10 MB frame that is ~150 pieces x 5 layers, and it cost
more server CPU than storing the frame (~35 ms per frame; benchmarks/persist.py). Tiled reads the whole
body into memory anyway (``await request.body()``), so handing it over in one piece changes nothing
for the app except the per-piece overhead.

Before any body is read, the request must carry the server's API key in one of the places Tiled reads
it (``Authorization: Apikey KEY``, ``?api_key=KEY``, the ``tiled_api_key`` cookie); without it the answer
is 401 and nothing of the body is read. Bodies larger than `max_body_bytes` are refused with 413 without
being read in full. So no client can make the server buffer more than one bounded body, and only a client
that holds the key can make it buffer at all. Requests without a body go to Tiled, which checks the key
itself (``/healthz`` stays open).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# tiled.server.utils.API_KEY_COOKIE_NAME; not imported: that would load Tiled's server side.
_KEY_COOKIE = b"tiled_api_key"


class WholeBodyMiddleware:
    """Pass each HTTP request's body to `app` as one ``http.request`` message, once `api_key` is shown."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        has_body = (declared is not None and declared > 0) or _header(scope, b"transfer-encoding") is not None
        if has_body and not self._shows_key(scope):
            await _refuse(send, 401, "a request with a body needs the API key (Authorization: Apikey KEY)",
                          [(b"www-authenticate", b"Apikey")])  # fmt: skip
            return
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

    def _shows_key(self, scope: Scope) -> bool:
        """Any of the places Tiled reads a key from holds this server's key (compared in constant time)."""
        return any(secrets.compare_digest(shown, self._api_key) for shown in _keys_shown(scope))


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive() that yields `first` once, then defers to the server's (for http.disconnect)."""
    pending: list[Message] = [first]

    async def wrapped() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return wrapped


def _keys_shown(scope: Scope) -> list[bytes]:
    """The API keys a request presents: ``?api_key=``, ``Authorization: Apikey``, the key cookie."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
    shown = [value.encode() for name, value in query if name == "api_key"]
    scheme, _, key = (_header(scope, b"authorization") or b"").strip().partition(b" ")
    if scheme.lower() == b"apikey":
        shown.append(key.strip())
    for cookie in (_header(scope, b"cookie") or b"").split(b";"):
        name, _, value = cookie.strip().partition(b"=")
        if name == _KEY_COOKIE:
            shown.append(value)
    return shown


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(send, 413, f"request body larger than {limit} bytes")


async def _refuse(send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer without reading the body; ``connection: close`` so that the unread body is never parsed."""
    body = f'{{"detail": "{detail}"}}'.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
