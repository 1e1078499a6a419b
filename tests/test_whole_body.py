"""The embedded Tiled server's body middleware: the app sees each request body in one piece, and
oversized bodies are refused before they are buffered."""

from __future__ import annotations

from typing import Any

from operators.persist.whole_body import WholeBodyMiddleware


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


def _scope(method: str = "PATCH", content_length: int | None = None) -> dict[str, Any]:
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return {"type": "http", "method": method, "path": "/api/v1/array/full/x", "headers": headers}


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
    await WholeBodyMiddleware(app, max_body_bytes=2**30)(_scope(), _pieces(*chunks), sent)
    assert len(app.messages) == 1
    assert app.messages[0]["body"] == b"".join(chunks) and app.messages[0]["more_body"] is False
    assert sent.status == 204


async def test_a_request_without_a_body_still_reaches_the_app() -> None:
    app, sent = Recorder(), Sent()
    await WholeBodyMiddleware(app, max_body_bytes=10)(_scope("GET"), _pieces(b""), sent)
    assert app.messages == [{"type": "http.request", "body": b"", "more_body": False}]
    assert sent.status == 204


async def test_a_declared_oversized_body_is_refused_with_413_unread() -> None:
    app, sent = Recorder(), Sent()
    read: list[int] = []

    async def receive() -> dict[str, Any]:
        read.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    await WholeBodyMiddleware(app, max_body_bytes=1000)(_scope(content_length=5000), receive, sent)
    assert sent.status == 413 and not app.called and not read
    assert b"larger than 1000 bytes" in sent.messages[1]["body"]


async def test_an_undeclared_oversized_body_is_refused_once_it_passes_the_limit() -> None:
    app, sent = Recorder(), Sent()
    await WholeBodyMiddleware(app, max_body_bytes=250)(_scope(), _pieces(b"a" * 100, b"b" * 100, b"c" * 100), sent)
    assert sent.status == 413 and not app.called


async def test_a_client_leaving_mid_body_is_passed_on_as_a_disconnect() -> None:
    app, sent = Recorder(), Sent()
    first = {"type": "http.request", "body": b"a" * 10, "more_body": True}
    queue = [first, {"type": "http.disconnect"}]

    async def leaving() -> dict[str, Any]:
        return queue.pop(0)

    await WholeBodyMiddleware(app, max_body_bytes=2**20)(_scope(), leaving, sent)
    assert app.messages == [{"type": "http.disconnect"}]


async def test_websocket_and_lifespan_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    mw = WholeBodyMiddleware(app, max_body_bytes=1)
    await mw({"type": "lifespan"}, _pieces(), Sent())
    await mw({"type": "websocket", "headers": []}, _pieces(), Sent())
    assert seen == ["lifespan", "websocket"]
