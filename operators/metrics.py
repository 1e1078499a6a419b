"""Prometheus collectors for the live path, created on a registry passed in (no global registry).

Accounting identity, for every message that came off the ZeroMQ socket once the pipeline is idle:

    received == processed + rejected + dropped      (each summed over its labels)

``processed{msg_type}`` counts start / event / stop documents fully handled (an event becomes a point),
``rejected{reason}`` messages refused as bad input, ``dropped{reason}`` good messages the service had to
let go (queue overflow, shutdown). ``lost_upstream`` counts frame numbers that never arrived (gaps);
those frames were never received, so they are outside the identity, as are the messages ZeroMQ itself refuses
(over the size limit: it drops that connection, and ``source_reconnects`` counts the ingest making it again).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latencies of interest span ~0.1 ms (clustering) to seconds (a first JIT call).
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
STAGES = ("decode", "queue", "preprocess", "encode", "project", "cluster", "publish", "total")


class PipelineMetrics:
    """The live path's counters, gauges and histograms, all registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "latent_stream") -> None:
        self.registry = registry
        self._namespace = namespace
        self.received = Counter(
            "received", "ZeroMQ messages received", namespace=namespace, registry=registry
        )
        self.processed = Counter(
            "processed", "Messages fully handled", ["msg_type"], namespace=namespace, registry=registry
        )
        self.rejected = Counter(
            "rejected", "Messages refused as bad input", ["reason"], namespace=namespace, registry=registry
        )
        self.dropped = Counter(
            "dropped", "Good messages let go by the service", ["reason"], namespace=namespace, registry=registry
        )
        self.lost_upstream = Counter(
            "lost_upstream", "Frame numbers missing from the source's sequence",
            namespace=namespace, registry=registry,
        )
        self.source_reconnects = Counter(
            "source_reconnects", "Connections to the frame source that ZeroMQ dropped for a protocol error "
            "(e.g. a message over the size limit) and the ingest made again",
            namespace=namespace, registry=registry,
        )
        self.publisher_errors = Counter(
            "publisher_errors", "Publisher calls that raised or timed out", ["publisher"],
            namespace=namespace, registry=registry,
        )
        self.clients = Gauge("clients", "Connected websocket clients", namespace=namespace, registry=registry)
        self.queue_depth = Gauge(
            "queue_depth", "Frames waiting between receive and compute", namespace=namespace, registry=registry
        )
        self.batch_size = Histogram(
            "batch_size", "Frames per compute micro-batch", namespace=namespace, registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.stage_seconds = Histogram(
            "stage_seconds", "Per-stage latency per frame (batched stages: the batch's time)", ["stage"],
            namespace=namespace, registry=registry, buckets=_LATENCY_BUCKETS,
        )
        # Pre-create the label sets operators look at, so /metrics shows zeros instead of nothing.
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for msg_type in ("start", "event", "stop"):
            self.processed.labels(msg_type)

    def set_clients_source(self, count: Callable[[], float]) -> None:
        """The bridge reports its client count through this callback (read at scrape time)."""
        self.clients.set_function(count)

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def snapshot(self) -> dict[str, float | dict[str, float]]:
        """Current values as plain numbers, for tests, logs and the health endpoint."""
        out: dict[str, float | dict[str, float]] = {}
        for name, labelled in (
            ("received", None), ("processed", "msg_type"), ("rejected", "reason"),
            ("dropped", "reason"), ("lost_upstream", None), ("publisher_errors", "publisher"),
            ("source_reconnects", None),
        ):
            samples = [
                s
                for metric in self.registry.collect()
                if metric.name == f"{self._namespace}_{name}"
                for s in metric.samples
                if s.name.endswith("_total")
            ]
            if labelled is None:
                out[name] = sum(s.value for s in samples)
            else:
                out[name] = {s.labels[labelled]: s.value for s in samples}
        return out

    def accounted(self) -> tuple[float, float]:
        """(received, processed + rejected + dropped): equal once the pipeline is idle."""
        snap = self.snapshot()
        handled = sum(
            sum(snap[k].values())  # type: ignore[union-attr]
            for k in ("processed", "rejected", "dropped")
        )
        return snap["received"], handled  # type: ignore[return-value]
