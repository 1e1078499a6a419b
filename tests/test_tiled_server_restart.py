"""A restart of the embedded Tiled server on a data directory left by an earlier run always comes back: with
the key clients were given and the data stored before, whatever pid file, key file and catalog it finds.

Each test starts real server child processes on one data directory, as a restarted service does.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
from tiled.client import from_uri

from operators.persist.server import EmbeddedTiledServer, TiledEndpoint


def _write_container(ep: TiledEndpoint, key: str) -> None:
    from_uri(ep.url, api_key=ep.api_key).create_container(key, metadata={"sample": "S1"})


def _read_container(ep: TiledEndpoint, key: str) -> dict:
    return dict(from_uri(ep.url, api_key=ep.api_key)[key].metadata)


async def _healthy(ep: TiledEndpoint) -> bool:
    async with httpx.AsyncClient(trust_env=False) as http:
        try:
            return (await http.get(f"{ep.url}/healthz", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False


def _child_pid(server: EmbeddedTiledServer) -> int:
    return int((server.data_dir / "tiled-server.pid").read_text())


async def test_a_restart_after_the_server_was_killed_keeps_its_key_and_data(tmp_path: Path) -> None:
    first = EmbeddedTiledServer(tmp_path, port=0)
    ep = await first.start()
    await asyncio.to_thread(_write_container, ep, "before-crash")
    pid = _child_pid(first)
    os.kill(pid, signal.SIGKILL)  # a crash: pid file, key file and catalog stay as they were
    await asyncio.to_thread(os.waitpid, pid, 0)

    second = EmbeddedTiledServer(tmp_path, port=first.port)
    try:
        again = await second.start()
        assert again.api_key == ep.api_key and not second.api_key_generated
        assert (await asyncio.to_thread(_read_container, again, "before-crash")) == {"sample": "S1"}
    finally:
        await second.stop()


async def test_a_server_left_running_by_a_killed_service_is_stopped_before_the_restart_takes_its_port(
    tmp_path: Path,
) -> None:
    survivor = EmbeddedTiledServer(tmp_path, port=0)
    ep = await survivor.start()
    await asyncio.to_thread(_write_container, ep, "kept")
    pid = _child_pid(survivor)
    # The service that started it is gone; here the test process stays its parent, so it reaps it.
    reaped = asyncio.create_task(asyncio.to_thread(os.waitpid, pid, 0))

    restarted = EmbeddedTiledServer(tmp_path, port=survivor.port)
    try:
        again = await restarted.start()
        assert (await asyncio.wait_for(reaped, 30))[0] == pid  # the survivor was stopped
        assert _child_pid(restarted) != pid and again.api_key == ep.api_key
        assert (await asyncio.to_thread(_read_container, again, "kept")) == {"sample": "S1"}
    finally:
        await restarted.stop()


async def test_a_pid_file_naming_another_data_directorys_server_leaves_that_server_running(
    tmp_path: Path,
) -> None:
    other = EmbeddedTiledServer(tmp_path / "other-service", port=0)
    other_ep = await other.start()
    mine = EmbeddedTiledServer(tmp_path / "mine", port=0)
    try:
        # a pid file left by an earlier run whose pid now belongs to another service's embedded server
        (tmp_path / "mine").mkdir(mode=0o700)
        (tmp_path / "mine" / "tiled-server.pid").write_text(str(_child_pid(other)))
        await mine.start()
        assert await _healthy(other_ep), "the other service's Tiled server was stopped"
    finally:
        await mine.stop()
        await other.stop()


async def test_an_empty_key_file_is_replaced_and_the_server_starts(tmp_path: Path) -> None:
    """An empty key file (a crash while an older version wrote it) must not stop every later start."""
    tmp_path.chmod(0o700)
    (tmp_path / "tiled-api-key").write_text("")
    server = EmbeddedTiledServer(tmp_path, port=0)
    try:
        ep = await server.start()
        assert ep.api_key and server.api_key_generated
        assert server.key_file.read_text() == ep.api_key
        await asyncio.to_thread(_write_container, ep, "works")
    finally:
        await server.stop()
