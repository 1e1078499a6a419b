"""The embedded Tiled server (a real child process, real HTTP) reads no body from a client without its API
key, reads none larger than the writer ever sends, and keeps its data directory and key private."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from tiled.client import from_uri
from tiled_support import tiled_server_fixture

from operators.persist.server import MAX_BODY_BYTES, EmbeddedTiledServer
from operators.persist.writer import TiledWriter
from stream.protocol import DEFAULT_MAX_BYTES

tiled_server = tiled_server_fixture()

# The largest request the writer makes: a PATCH of up to max_patch_bytes of frames, or one frame alone.
WRITER_MAX_PATCH = inspect.signature(TiledWriter).parameters["max_patch_bytes"].default
LARGEST_WRITER_BODY = max(WRITER_MAX_PATCH, DEFAULT_MAX_BYTES)


def _status_of_unfinished_upload(url: str, head: str, sent_body: bytes = b"\0" * 65536) -> int:
    """Send a request's head and only the start of its body; the status the server answers without the rest.

    A server that waits for the whole declared body never answers: that fails the test.
    """
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=15) as s:
        s.sendall(head.encode() + b"\r\n" + sent_body)
        try:
            status_line = s.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            pytest.fail("no answer within 15 s: the server waits to read the whole body")
    return int(status_line.split()[1])


def _patch_head(url: str, length: int, *headers: str) -> str:
    host = urlsplit(url).netloc
    lines = ["PATCH /api/v1/array/full/victim?offset=0&shape=1,4,4 HTTP/1.1", f"Host: {host}",
             "Content-Type: application/octet-stream", f"Content-Length: {length}", *headers]  # fmt: skip
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("auth", [None, "Authorization: Apikey not-the-key"], ids=["no key", "wrong key"])
def test_a_body_without_the_api_key_is_refused_with_401_before_it_is_read(
    tiled_server: EmbeddedTiledServer, auth: str | None
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    head = _patch_head(ep.url, 512 * 2**20, *([auth] if auth else []))  # announces 512 MiB, sends 64 KiB
    assert _status_of_unfinished_upload(ep.url, head) == 401


def test_a_body_larger_than_the_writer_ever_sends_is_refused_with_413_before_it_is_read(
    tiled_server: EmbeddedTiledServer,
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    assert MAX_BODY_BYTES == LARGEST_WRITER_BODY  # the limit follows what the writer sends
    head = _patch_head(ep.url, LARGEST_WRITER_BODY + 1, f"Authorization: Apikey {ep.api_key}")
    assert _status_of_unfinished_upload(ep.url, head) == 413


async def test_a_body_with_the_key_in_the_query_string_is_stored(tiled_server: EmbeddedTiledServer) -> None:
    """Tiled also takes the key as ?api_key= (frame URIs handed to other tools): such a write goes through."""
    ep = tiled_server.endpoint
    assert ep is not None
    first, second = np.arange(16, dtype=np.int32).reshape(1, 4, 4), np.full((1, 4, 4), 7, np.int32)
    await asyncio.to_thread(lambda: from_uri(ep.url, api_key=ep.api_key).write_array(first, key="by-query"))
    async with httpx.AsyncClient(trust_env=False) as http:
        r = await http.patch(
            f"{ep.url}/api/v1/array/full/by-query",
            params={"offset": "1", "shape": "1,4,4", "extend": "true", "api_key": ep.api_key},
            content=second.tobytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
    assert r.status_code == 200, r.text
    stored = await asyncio.to_thread(lambda: from_uri(ep.url, api_key=ep.api_key)["by-query"].read())
    np.testing.assert_array_equal(stored, np.concatenate([first, second]))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_data_directory_key_and_stored_files_are_private_to_their_owner(
    tiled_server: EmbeddedTiledServer,
) -> None:
    ep = tiled_server.endpoint
    assert ep is not None
    frame = np.ones((1, 8, 8), np.int32)
    await asyncio.to_thread(lambda: from_uri(ep.url, api_key=ep.api_key).write_array(frame, key="private"))
    data_dir = tiled_server.data_dir
    assert _mode(data_dir) == 0o700 and _mode(tiled_server.tiled_dir) == 0o700
    assert tiled_server.key_file.read_text() == ep.api_key and _mode(tiled_server.key_file) == 0o600
    stored = list(tiled_server.tiled_dir.rglob("*"))
    assert any(p.name == "catalog.db" for p in stored) and any(p.parent.name == "data" for p in stored)
    assert {p.relative_to(data_dir).as_posix(): oct(_mode(p)) for p in stored if _mode(p) & 0o077} == {}


async def test_a_data_directory_and_key_file_others_can_read_are_made_private_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    key_file = data_dir / "tiled-api-key"
    key_file.write_text("an-earlier-runs-key")
    key_file.chmod(0o644)
    server = EmbeddedTiledServer(data_dir, port=0)
    with caplog.at_level(logging.WARNING, logger="operators.persist.server"):
        try:
            endpoint = await server.launch()
        finally:
            await server.stop()
    assert _mode(data_dir) == 0o700 and _mode(key_file) == 0o600
    assert f"{data_dir} was open to other users (mode 755)" in caplog.text
    assert f"{key_file} was open to other users (mode 644)" in caplog.text
    assert endpoint.api_key == "an-earlier-runs-key" and endpoint.api_key not in caplog.text


async def test_the_server_enforces_the_body_limit_it_is_started_with(tmp_path: Path) -> None:
    """`serve` starts it with its frame limit when that is larger than the default (one frame is one body)."""
    server = EmbeddedTiledServer(tmp_path, port=0, max_body_bytes=2**20)
    try:
        ep = await server.start()
        head = _patch_head(ep.url, 2**20 + 1, f"Authorization: Apikey {ep.api_key}")
        assert await asyncio.to_thread(_status_of_unfinished_upload, ep.url, head) == 413
        frame = np.ones((1, 256, 512), np.int32)  # 512 KiB: under the limit
        client = await asyncio.to_thread(from_uri, ep.url, api_key=ep.api_key)
        node = await asyncio.to_thread(client.write_array, frame, key="fits")
        assert node.shape == frame.shape
    finally:
        await server.stop()
