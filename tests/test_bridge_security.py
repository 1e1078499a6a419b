"""Who may use the bridge: Host and Origin allow-lists, the token on every route, request limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from bridge_support import Served, bridge, close_code, connect, receive_until
from prometheus_client import generate_latest
from websockets.exceptions import InvalidStatus

from stream.config import load_settings

HANDSHAKE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def _hostport(srv: Served) -> str:
    return srv.base.removeprefix("http://")


async def raw_status(srv: Served, request: str, timeout: float = 5.0) -> int:
    """Send a hand-written HTTP/1.1 request; the status the server answers with within `timeout`."""
    host, port = _hostport(srv).rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        return int(status_line.split()[1])
    finally:
        writer.close()


def refused_total(srv: Served, reason: str) -> float:
    text = generate_latest(srv.registry).decode()
    prefix = f'latent_stream_bridge_refused_total{{reason="{reason}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).removeprefix(prefix))


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b" " * size


# -- Origin: which web pages may use the service ----------------------------------------------------


@pytest.mark.parametrize("path", ["/ws", "/lse"])
async def test_a_page_from_another_site_gets_no_websocket_handshake(path: str) -> None:
    async with bridge() as srv:
        for origin in ("http://evil.example", "null", f"http://evil.example:{_hostport(srv).split(':')[1]}"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{srv.ws}{path}", origin=origin):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == 403
        assert refused_total(srv, "origin_not_allowed") == 3
        assert srv.hub.clients_total == 0


async def test_the_services_own_page_pages_on_this_machine_and_listed_origins_may_connect() -> None:
    async with bridge(allowed_origins=["https://lse.facility.example"]) as srv:
        origins = [
            f"http://{_hostport(srv)}",  # the live page the service serves
            "http://localhost:8050",  # the Latent Space Explorer run on this machine
            "http://[::1]:3000",
            "https://lse.facility.example",
            None,  # not a browser
        ]
        for origin in origins:
            async with connect(f"{srv.ws}/ws", origin=origin) as ws:  # type: ignore[arg-type]
                await receive_until(ws, lambda m: m["type"] == "backfill_end")
        assert refused_total(srv, "origin_not_allowed") == 0


async def test_a_page_from_another_site_cannot_call_the_api() -> None:
    async with bridge() as srv, httpx.AsyncClient() as http:
        foreign = await http.get(f"{srv.base}/api/runs", headers={"Origin": "http://evil.example"})
        own = await http.get(f"{srv.base}/api/runs", headers={"Origin": srv.base})
    assert foreign.status_code == 403 and "--allowed-origins" in foreign.json()["detail"]
    assert own.status_code == 200


# -- Host: DNS rebinding ---------------------------------------------------------------------------


async def test_a_request_addressed_to_a_foreign_host_name_is_refused() -> None:
    """A hostile name resolving to 127.0.0.1 makes its page same-origin with the service: the Host tells."""
    async with bridge() as srv, httpx.AsyncClient() as http:
        port = _hostport(srv).split(":")[1]
        rebound = {"Host": f"attacker.example:{port}"}
        api = await http.get(f"{srv.base}/api/health", headers=rebound)
        page = await http.get(f"{srv.base}/", headers=rebound)
        socket = await raw_status(
            srv, f"GET /ws HTTP/1.1\r\nHost: attacker.example:{port}\r\n{HANDSHAKE}\r\n"
        )
        local = [
            (await http.get(f"{srv.base}/api/health", headers={"Host": f"{name}:{port}"})).status_code
            for name in ("127.0.0.1", "localhost", "[::1]", "LocalHost")
        ]
        assert refused_total(srv, "host_not_allowed") == 3
    assert api.status_code == 400 and "--allowed-hosts" in api.json()["detail"]
    assert page.status_code == 400
    assert socket == 403
    assert local == [200] * 4


async def test_allowed_hosts_add_names_and_a_star_allows_any() -> None:
    async with bridge(allowed_hosts=["beamline.example"]) as srv, httpx.AsyncClient() as http:
        named = await http.get(f"{srv.base}/api/health", headers={"Host": "beamline.example:8765"})
        other = await http.get(f"{srv.base}/api/health", headers={"Host": "other.example"})
    async with bridge(allowed_hosts=["*"]) as srv, httpx.AsyncClient() as http:
        anything = await http.get(f"{srv.base}/api/health", headers={"Host": "other.example"})
    assert (named.status_code, other.status_code, anything.status_code) == (200, 400, 200)


def test_allowed_hosts_and_origins_are_comma_separated_on_the_command_line_and_lists_in_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = load_settings()
    assert (default.allowed_hosts, default.allowed_origins, default.metrics_public) == ([], [], False)
    config = tmp_path / "serve.yaml"
    config.write_text("allowed_hosts: [beamline.example, 10.0.0.5]\nmetrics_public: true\n")
    monkeypatch.setenv("LATENT_STREAM_ALLOWED_ORIGINS", "https://lse.example, http://localhost:8050")
    s = load_settings(config=config)
    assert s.allowed_hosts == ["beamline.example", "10.0.0.5"]
    assert s.allowed_origins == ["https://lse.example", "http://localhost:8050"]
    assert s.metrics_public is True
    assert load_settings(allowed_hosts="a.example,b.example").allowed_hosts == ["a.example", "b.example"]


# -- the token ---------------------------------------------------------------------------------------


async def test_with_a_token_every_route_but_the_page_requires_it(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>live</title>")
    (tmp_path / "app.js").write_text("export const ok = 1;")
    routes = [
        "/api/health",
        "/api/runs",
        "/api/runs/x/points",
        "/api/reference",
        "/api/frame?url=x",
        "/metrics",
        "/openapi.json",
    ]
    async with bridge(token="s3cret", static_dir=tmp_path) as srv, httpx.AsyncClient() as http:
        refused = [await http.get(f"{srv.base}{route}") for route in routes]
        refused.append(await http.post(f"{srv.base}/api/aggregate", json={"urls": ["x"]}))
        wrong = await http.get(f"{srv.base}/metrics", headers={"Authorization": "Bearer nope"})
        by_query = await http.get(f"{srv.base}/metrics", params={"token": "s3cret"})
        by_header = await http.get(f"{srv.base}/openapi.json", headers={"Authorization": "Bearer s3cret"})
        page = [(await http.get(f"{srv.base}{path}")).status_code for path in ("/", "/static/app.js")]
        assert refused_total(srv, "token_missing") == 8 and refused_total(srv, "token_invalid") == 1
    assert [r.status_code for r in refused] == [401] * 8
    assert all(r.headers["www-authenticate"] == "Bearer" for r in refused)
    assert wrong.status_code == 401
    assert (by_query.status_code, by_header.status_code) == (200, 200)
    assert page == [200, 200]


async def test_metrics_public_opens_only_the_metrics() -> None:
    async with bridge(token="s3cret", metrics_public=True) as srv, httpx.AsyncClient() as http:
        metrics = await http.get(f"{srv.base}/metrics")
        health = await http.get(f"{srv.base}/api/health")
    assert metrics.status_code == 200 and "latent_stream_bridge_refused_total" in metrics.text
    assert health.status_code == 401


async def test_without_the_token_a_body_is_refused_before_it_is_parsed() -> None:
    async with bridge(token="s3cret") as srv, httpx.AsyncClient() as http:
        malformed = await http.post(
            f"{srv.base}/api/aggregate", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        large = await http.post(f"{srv.base}/api/aggregate", content=_chunks(4 << 20))
    assert malformed.status_code == 401  # not 422: nothing was parsed
    assert large.status_code == 401


# -- request limits -------------------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    async with bridge(max_body_bytes=64 * 1024) as srv, httpx.AsyncClient() as http:
        # Announces 1 GB and sends none of it: answered at once, from the header alone.
        announced = await raw_status(
            srv,
            "POST /api/aggregate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\n\r\n",
        )
        streamed = await http.post(f"{srv.base}/api/aggregate", content=_chunks(1 << 20))  # no length given
        within = await http.post(f"{srv.base}/api/aggregate", json={"urls": ["u"] * 2, "stat": "mean"})
        assert refused_total(srv, "body_too_large") == 2
    assert announced == 413
    assert streamed.status_code == 413 and "65536 bytes" in streamed.json()["detail"]
    assert within.status_code == 503  # read and parsed: then told no Tiled is configured


async def test_a_websocket_client_sending_a_large_message_is_closed_with_1009() -> None:
    async with bridge() as srv, connect(f"{srv.ws}/ws") as ws:
        await receive_until(ws, lambda m: m["type"] == "backfill_end")
        await ws.send("x" * (1 << 20))
        assert await close_code(ws) == 1009


async def test_refusals_are_in_the_health_counters() -> None:
    async with bridge(token="s3cret") as srv, httpx.AsyncClient() as http:
        await http.get(f"{srv.base}/api/runs")
        await http.get(f"{srv.base}/api/runs", headers={"Host": "attacker.example"})
        health = (await http.get(f"{srv.base}/api/health", params={"token": "s3cret"})).json()
    assert health["counters"]["refused"] == {
        "host_not_allowed": 1,
        "origin_not_allowed": 0,
        "token_missing": 1,
        "token_invalid": 0,
        "body_too_large": 0,
    }
