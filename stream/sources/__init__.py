"""Frame sources for ``serve``: one ``--source URL`` -> one arroyopy ``Listener`` feeding the pipeline.

The seam (docs/internals.md, "Sources"): a source is built by ``build(spec, ctx) -> Source`` from its spec
(stream/sources/url.py) and a `SourceContext`, and hands compute ``RunStarted | Frame | RunStopped``
(operators/messages.py) with ``await ctx.operator.submit(message)``, in order, one run open at a time. Run
keys, gap counting (``lost_upstream``), ``no_active_run`` and superseded runs come from
`stream.ingest.IngestDecoder`: a source turns what it receives into `stream.protocol` ``Start | Event | Stop``
and calls ``IngestDecoder.handle`` (or ``accept`` with a `stream.ingest.WireDecoder` for a byte wire). Bad input
is a `stream.protocol.ProtocolError` counted under its reason in ``ctx.metrics.rejected``; the source goes on.

A new source kind: a spec dataclass and parser in url.py, a module with ``build(spec, ctx)``, and one line in
`BUILDERS` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stream.sources.url import SourceSpec, SourceURLError, Stream2Source, TiledSource, ZmqSource, parse_source

if TYPE_CHECKING:
    import zmq.asyncio

    from operators.metrics import PipelineMetrics
    from stream.ingest import Submitter
    from stream.protocol import Limits

__all__ = [
    "BUILDERS",
    "Source",
    "SourceContext",
    "SourceSpec",
    "SourceURLError",
    "Stream2Source",
    "TiledSource",
    "ZmqSource",
    "build_source",
    "parse_source",
]


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What serve gives every source."""

    operator: Submitter  # the pipeline's bounded inbox: ``await operator.submit(message)``
    metrics: PipelineMetrics  # received / rejected{reason} / lost_upstream / source_reconnects / dropped
    limits: Limits  # frame and metadata bounds, the same for every source
    zmq_context: zmq.asyncio.Context  # for ZeroMQ sources; serve terminates it after every source stopped
    rcvhwm: int = 16  # ZeroMQ receive high-water mark (messages)
    api_key: str | None = None  # --source-api-key; never log it


class Source(Protocol):
    """An arroyopy ``Listener`` that serve starts as a task, waits for, and stops first at shutdown."""

    async def start(self) -> None:
        """Receive until cancelled or `stop`; bad input is counted, never raised."""

    async def stop(self) -> None:
        """Stop receiving and release sockets / connections."""

    async def wait_connected(self) -> None:
        """Return once the source is connected (or connecting) and frames may arrive."""


# spec kind -> "module:function" building its Source; imported only when that kind is served.
BUILDERS: dict[str, str] = {
    "zmq": "stream.sources.zmq_msgpack:build",
    "stream2": "stream.sources.stream2:build",
    "tiled": "stream.sources.tiled_live:build",
}


def build_source(spec: SourceSpec, ctx: SourceContext) -> Source:
    """The listener for ``spec``. Raises `SourceURLError` for a kind this installation cannot serve."""
    target = BUILDERS.get(spec.kind)
    if target is None:
        raise SourceURLError(f"{spec.kind} sources are not available in this installation")
    module, _, function = target.partition(":")
    try:
        build = getattr(importlib.import_module(module), function)
    except ImportError as exc:  # an optional dependency of that kind is not installed
        raise SourceURLError(f"{spec.kind} sources are not available in this installation ({exc})") from exc
    source: Source = build(spec, ctx)
    return source
