"""The Tiled writer's counters on /metrics, read from `TiledWriter.stats()` at scrape time.

A custom collector rather than counters bumped by the writer: the writer keeps its counts per run (they go
into each run's metadata when it closes), and this reads their sums, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from operators.persist.writer import TiledWriter


class WriterCollector(Collector):
    """`latent_stream_persist_*`: frames and rows written / not written {reason}, buffer, frame lag, connection."""

    def __init__(self, writer: TiledWriter, namespace: str = "latent_stream") -> None:
        self.writer = writer
        self.prefix = f"{namespace}_persist"

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s, p = self.writer.stats(), self.prefix
        yield CounterMetricFamily(f"{p}_frames_written", "Frames the service stored in Tiled", value=s.frames_written)
        yield CounterMetricFamily(f"{p}_frame_requests", "Requests that wrote those frames", value=s.frame_requests)
        yield CounterMetricFamily(f"{p}_rows_written", "Point rows written to Tiled", value=s.rows_written)
        yield CounterMetricFamily(f"{p}_retries", "Writes retried after a transient error", value=s.retries)
        yield CounterMetricFamily(f"{p}_logs_set_aside", "Crash result logs that could not be replayed "
                                  "(moved to results-log/unreplayable/)", value=s.logs_set_aside)  # fmt: skip
        for name, counts, what in (
            ("frames_not_written", s.frames_not_written, "Frames to store that did not reach Tiled"),
            ("rows_not_written", s.rows_not_written, "Point rows that did not reach Tiled"),
        ):
            family = CounterMetricFamily(f"{p}_{name}", what, labels=["reason"])
            for reason, n in sorted(counts.items()):
                family.add_metric([reason], n)
            yield family
        yield GaugeMetricFamily(f"{p}_buffered_bytes", "Frame bytes waiting to be written", value=s.buffered_bytes)
        yield GaugeMetricFamily(f"{p}_buffered_rows", "Point rows waiting to be written", value=s.buffered_rows)
        yield GaugeMetricFamily(f"{p}_connected", "1 once writing to Tiled", value=float(self.writer.connected))
        yield HistogramMetricFamily(
            f"{p}_frame_lag_seconds", "Point sent -> its frame fetchable from Tiled",
            buckets=[*s.lag_within.items(), ("+Inf", s.lag_count)],
            sum_value=s.lag_sum_s,
        )  # fmt: skip
