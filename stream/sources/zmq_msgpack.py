"""``zmq+pull://`` / ``zmq+sub://``: the arroyo msgpack ingest (stream/ingest.py), built for serve."""

from __future__ import annotations

from stream.ingest import ZmqIngest
from stream.sources import SourceContext
from stream.sources.url import ZmqSource


def build(spec: ZmqSource, ctx: SourceContext) -> ZmqIngest:
    return ZmqIngest(ctx.operator, spec.address, ctx.metrics, pattern=spec.pattern, limits=ctx.limits,
                     context=ctx.zmq_context, rcvhwm=ctx.rcvhwm)  # fmt: skip
