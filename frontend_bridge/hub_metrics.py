"""The hub's counters on a caller-owned prometheus registry (no global state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .hub import Hub


class HubCollector(Collector):
    """Exposes the hub's counters on a caller-owned prometheus registry (no global state)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = self._hub
        clients = GaugeMetricFamily(
            "latent_stream_bridge_clients", "Connected websocket clients", labels=["endpoint"]
        )
        for endpoint, n in hub.client_counts().items():
            clients.add_metric([endpoint], n)
        yield clients
        dropped = CounterMetricFamily(
            "latent_stream_bridge_dropped",
            "Messages, points or clients dropped, by reason",
            labels=["reason"],
        )
        for reason, n in hub.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(
            "latent_stream_bridge_points", "Points published to the hub", value=hub.points_total
        )
        yield CounterMetricFamily(
            "latent_stream_bridge_connections", "Websocket connections accepted", value=hub.clients_total
        )
        held = len(hub.current.store) if hub.current is not None and hub.current.store is not None else 0
        yield GaugeMetricFamily(
            "latent_stream_bridge_backfill_points", "Points of the current run held for backfill", value=held
        )
