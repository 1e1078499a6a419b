"""``stream2://HOST:PORT[?channel=NAME]``: DECTRIS SIMPLON stream v2 from an EIGER / EIGER2 (or anything that
speaks it), built for serve.

The detector BINDS PUSH (port 31001 on a DCU); the service CONNECTS with PULL, so it pushes back like the
msgpack PULL ingest. The receive loop, MAXMSGSIZE, reconnects and counters are `stream.ingest.ZmqIngest`'s;
the wire is `stream.sources.stream2_wire.Stream2Decoder`. Several PULL clients on one detector share its images
round robin: each would see gaps (``lost_upstream``). Give the service its own stream.
"""

from __future__ import annotations

from stream.ingest import ZmqIngest
from stream.sources import SourceContext
from stream.sources.stream2_wire import Stream2Decoder
from stream.sources.url import Stream2Source


def build(spec: Stream2Source, ctx: SourceContext) -> ZmqIngest:
    return ZmqIngest(ctx.operator, spec.address, ctx.metrics, pattern="pull", limits=ctx.limits,
                     context=ctx.zmq_context, rcvhwm=ctx.rcvhwm,
                     wire=Stream2Decoder(spec.channel, ctx.limits))  # fmt: skip
