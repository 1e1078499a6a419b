"""The embedded Tiled server's body middleware: the app sees each request body in one piece; a body
without the API key, or larger than the limit, is refused before any of it is read."""

from __future__ import annotations

from typing import Any

import pytest

from operators.persist.whole_body import WholeBodyMiddleware

KEY = "0123456789abcdef0123456789abcdef"
AUTH = (b"authorization", f"Apikey {KEY}".encode())


class Recorder:
    """An ASGI app that records the messages its receive() yields, then answers 204."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.called = False

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        while True:
            m = await receive()
            self.messages.append(m)
            if m["type"] != "http.request" or not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _scope(
    method: str = "PATCH",
    content_length: int | None = None,
    *,
    auth: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    chunked: bool = False,
) -> dict[str, Any]:
    headers = [AUTH] if auth is None else list(auth)
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    return {"type": "http", "method": method, "path": "/api/v1/array/full/x", "headers": headers,
            "query_string": query}  # fmt: skip


def _middleware(app: Any, max_body_bytes: int) -> WholeBodyMiddleware:
    return WholeBodyMiddleware(app, max_body_bytes=max_body_bytes, api_key=KEY)


def _unread() -> tuple[Any, list[int]]:
    """A receive() that records each call: a body that must not be read."""
    read: list[int] = []

    async def receive() -> dict[str, Any]:
        read.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    return receive, read


def _pieces(*chunks: bytes):
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]


async def test_a_body_sent_in_pieces_reaches_the_app_as_one_message() -> None:
    app, sent = Recorder(), Sent()
    chunks = [bytes([i]) * 65536 for i in range(150)]
    await _middleware(app, 2**30)(_scope(), _pieces(*chunks), sent)
    assert len(app.messages) == 1
    assert app.messages[0]["body"] == b"".join(chunks) and app.messages[0]["more_body"] is False
    assert sent.status == 204


async def test_a_request_without_a_body_still_reaches_the_app() -> None:
    app, sent = Recorder(), Sent()
    await _middleware(app, 10)(_scope("GET"), _pieces(b""), sent)
    assert app.messages == [{"type": "http.request", "body": b"", "more_body": False}]
    assert sent.status == 204


async def test_a_declared_oversized_body_is_refused_with_413_unread() -> None:
    app, sent = Recorder(), Sent()
    receive, read = _unread()
    await _middleware(app, 1000)(_scope(content_length=5000), receive, sent)
    assert sent.status == 413 and not app.called and not read
    assert b"larger than 1000 bytes" in sent.messages[1]["body"]


async def test_an_undeclared_oversized_body_is_refused_once_it_passes_the_limit() -> None:
    app, sent = Recorder(), Sent()
    await _middleware(app, 250)(_scope(), _pieces(b"a" * 100, b"b" * 100, b"c" * 100), sent)
    assert sent.status == 413 and not app.called


async def test_a_client_leaving_mid_body_is_passed_on_as_a_disconnect() -> None:
    app, sent = Recorder(), Sent()
    first = {"type": "http.request", "body": b"a" * 10, "more_body": True}
    queue = [first, {"type": "http.disconnect"}]

    async def leaving() -> dict[str, Any]:
        return queue.pop(0)

    await _middleware(app, 2**20)(_scope(), leaving, sent)
    assert app.messages == [{"type": "http.disconnect"}]


async def test_websocket_and_lifespan_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    mw = _middleware(app, 1)
    await mw({"type": "lifespan"}, _pieces(), Sent())
    await mw({"type": "websocket", "headers": []}, _pieces(), Sent())
    assert seen == ["lifespan", "websocket"]


@pytest.mark.parametrize(
    "auth",
    [[], [(b"authorization", b"Apikey wrong")], [(b"authorization", f"Bearer {KEY}".encode())]],
    ids=["no key", "wrong key", "not an Apikey"],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_without_the_api_key_is_refused_with_401_unread(
    auth: list[tuple[bytes, bytes]], framing: str
) -> None:
    app, sent = Recorder(), Sent()
    receive, read = _unread()
    if framing == "content-length":
        scope = _scope(content_length=5000, auth=auth)
    else:
        scope = _scope(auth=auth, chunked=True)
    await _middleware(app, 10**9)(scope, receive, sent)
    assert sent.status == 401 and not app.called and not read
    assert (b"www-authenticate", b"Apikey") in sent.messages[0]["headers"]


async def test_a_keyless_oversized_body_gets_401_not_413() -> None:
    app, sent = Recorder(), Sent()
    receive, read = _unread()
    await _middleware(app, 10)(_scope(content_length=5000, auth=[]), receive, sent)
    assert sent.status == 401 and not read


@pytest.mark.parametrize(
    "where",
    [
        {"auth": [(b"authorization", f"apikey {KEY}".encode())]},
        {"auth": [], "query": f"slice=0&api_key={KEY}".encode()},
        {"auth": [(b"cookie", f"other=1; tiled_api_key={KEY}".encode())]},
    ],
    ids=["header", "query", "cookie"],
)
async def test_the_key_is_accepted_wherever_tiled_reads_it(where: dict[str, Any]) -> None:
    app, sent = Recorder(), Sent()
    await _middleware(app, 1000)(_scope(content_length=3, **where), _pieces(b"abc"), sent)
    assert sent.status == 204 and app.messages[0]["body"] == b"abc"


async def test_a_request_without_a_body_reaches_tiled_without_the_key() -> None:
    """Tiled checks the key of bodiless requests itself; /healthz stays open."""
    app, sent = Recorder(), Sent()
    await _middleware(app, 10)(_scope("GET", auth=[]), _pieces(b""), sent)
    assert app.called and sent.status == 204
