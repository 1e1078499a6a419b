"""Who may use the bridge, decided for every request before any route reads it.

`AccessGuard` is one pure-ASGI middleware; it checks each HTTP request and websocket handshake in order:

1. Host: the name the client addressed must be one the service answers to (the loopback names, the
   bind address, `allowed_hosts`). Without it, DNS rebinding lets any web page reach /api: a hostile
   name that resolves to 127.0.0.1 is "same origin" for the browser.
2. Origin, when a browser sends one: the service's own origin, a page on a loopback name (the Latent
   Space Explorer at http://localhost:8050, say) or one of `allowed_origins`. Without it any web page
   the user opens could read /ws. Clients that send no Origin (scripts, servers) are not browsers.
3. The token, when one is set: every route but the page itself (`/`, `/static/...`) requires it,
   `/metrics` too unless `metrics_public`.
4. The body: at most `max_body_bytes`, refused from its Content-Length or while it arrives, so no
   route ever parses more than that.

A refused websocket with a bad Host or Origin gets no handshake (HTTP 403); one without the token is
accepted and closed with 1008 so that the page can tell the user. Refusals are counted by reason.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketClose

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
ANY = "*"

# Every refusal reason, pre-declared so /metrics shows zeros before the first refusal.
REFUSAL_REASONS: tuple[str, ...] = (
    "host_not_allowed",  # the Host header names a host the service does not answer to
    "origin_not_allowed",  # a browser page from an origin that is not allowed
    "token_missing",  # a route that needs the token, asked without one
    "token_invalid",  # ... with a wrong one
    "body_too_large",  # a request body over max_body_bytes
)
WS_CLOSE_POLICY_VIOLATION = 1008


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """allowed_hosts / allowed_origins: besides the defaults above; "*" allows any."""

    allowed_hosts: Collection[str] = ()
    allowed_origins: Collection[str] = ()
    token: str | None = None
    metrics_public: bool = False
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    status: int
    detail: str


class Refusals(Collector):
    """Requests the guard refused, by reason (`latent_stream_bridge_refused_total{reason}`)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)

    def count(self, reason: str) -> None:
        self.counts[reason] += 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        refused = CounterMetricFamily(
            "latent_stream_bridge_refused",
            "HTTP requests and websockets refused, by reason",
            labels=["reason"],
        )
        for reason, n in self.counts.items():
            refused.add_metric([reason], n)
        yield refused


def host_name(authority: str) -> str:
    """The lower-case host name of a Host header or host[:port]: '[::1]:8765' -> '::1'."""
    authority = authority.strip().lower()
    if authority.count(":") > 1 and not authority.startswith("["):
        return authority  # a bare IPv6 address
    try:
        return (urlsplit(f"//{authority}").hostname or "").rstrip(".")
    except ValueError:
        return ""


class AccessGuard:
    """The pure-ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, refusals: Refusals) -> None:
        self.app = app
        self.policy = policy
        self.refusals = refusals
        hosts = {*LOOPBACK_HOSTS, *map(host_name, policy.allowed_hosts)}
        self._hosts = {ANY} if ANY in policy.allowed_hosts else hosts
        self._origins = {origin.strip().rstrip("/").lower() for origin in policy.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._check(scope, headers)
        if refusal is not None:
            await self._refuse(refusal, scope, receive, send)
        elif scope["type"] == "websocket":
            await self.app(scope, receive, send)
        else:
            await self._with_bounded_body(scope, headers, receive, send)

    def _check(self, scope: Scope, headers: Headers) -> _Refusal | None:
        host = headers.get("host", "")
        if ANY not in self._hosts and host_name(host) not in self._hosts:
            detail = f"this service does not answer to host {host[:200]!r} (see --allowed-hosts)"
            return _Refusal("host_not_allowed", 400, detail)
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            detail = f"pages from {origin[:200]!r} may not use this service (see --allowed-origins)"
            return _Refusal("origin_not_allowed", 403, detail)
        token = self.policy.token
        if token is None or self._public(scope["path"]):
            return None
        provided = _provided_token(headers, QueryParams(scope.get("query_string", b"")))
        if provided is None:
            return _Refusal("token_missing", 401, "token required: ?token=... or Authorization: Bearer ...")
        if not hmac.compare_digest(provided.encode(), token.encode()):
            return _Refusal("token_invalid", 401, "wrong token")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if ANY in self._origins:
            return True
        try:
            parts = urlsplit(origin.strip().lower())
        except ValueError:
            return False
        if parts.scheme not in ("http", "https"):  # "null" (sandboxed or file: pages), extensions
            return False
        return (
            f"{parts.scheme}://{parts.netloc}" in self._origins
            or parts.netloc == host.strip().lower()  # the service's own origin, however it was reached
            or parts.hostname in LOOPBACK_HOSTS
        )

    def _public(self, path: str) -> bool:
        return (
            path == "/" or path.startswith("/static/") or (self.policy.metrics_public and path == "/metrics")
        )

    async def _refuse(self, refusal: _Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        self.refusals.count(refusal.reason)
        logger.warning(
            "refused %s %r from %s: %s",
            scope["type"],
            scope["path"][:200],
            scope.get("client"),
            refusal.detail,
        )
        if scope["type"] == "http":
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            await JSONResponse({"detail": refusal.detail}, refusal.status, headers)(scope, receive, send)
        elif refusal.status == 401:  # accepted, then closed: a browser sees the close code, not a bare 403
            websocket = WebSocket(scope, receive, send)
            await websocket.accept()
            await websocket.close(WS_CLOSE_POLICY_VIOLATION, refusal.detail)
        else:  # closed before the handshake: the server answers 403 and the page learns nothing
            await WebSocketClose(WS_CLOSE_POLICY_VIOLATION, refusal.reason)(scope, receive, send)

    async def _with_bounded_body(self, scope: Scope, headers: Headers, receive: Receive, send: Send) -> None:
        limit = self.policy.max_body_bytes
        too_large = _Refusal("body_too_large", 413, f"request body over {limit} bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(too_large, scope, receive, send)  # before reading any of it
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its request was complete
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(too_large, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the whole body at once, then the connection's own messages (disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _provided_token(headers: Headers, query: QueryParams) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return query.get("token")
