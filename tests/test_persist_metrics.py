"""The writer's counters on /metrics: what did not reach Tiled is visible while the service runs."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tiled_support import make_point, publish_stored

from operators.messages import RunStarted
from operators.persist.metrics import WriterCollector
from operators.persist.writer import TiledWriter


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


async def test_frames_dropped_while_tiled_is_away_are_counted_by_reason_on_metrics(tmp_path) -> None:
    rng = np.random.default_rng(0)
    first, image = make_point("http://127.0.0.1:9", "run-m", 0, rng)
    # room for two frames; Tiled is never reached, so the third pushes the oldest out
    writer = TiledWriter("http://127.0.0.1:9", None, data_dir=tmp_path, max_buffer_bytes=2 * image.nbytes)
    registry = CollectorRegistry()
    registry.register(WriterCollector(writer))
    await writer.publish(RunStarted("run-m", "metrics", time.time(), run_key="run-m"))
    await publish_stored(writer, first, image)
    for i in (1, 2):
        await publish_stored(writer, *make_point("http://127.0.0.1:9", "run-m", i, rng))

    samples = _samples(registry)
    assert samples[("latent_stream_persist_frames_not_written_total", (("reason", "buffer_full"),))] == 1
    assert samples[("latent_stream_persist_buffered_bytes", ())] == 2 * image.nbytes
    assert samples[("latent_stream_persist_buffered_rows", ())] == 3  # rows are kept, only the image went
    assert samples[("latent_stream_persist_frames_written_total", ())] == 0
    assert samples[("latent_stream_persist_connected", ())] == 0
    await writer.stop(drain_timeout=0)
