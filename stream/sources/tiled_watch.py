"""Tiled websocket subscriptions as wake-up calls for the ``tiled://`` source.

``WS /api/v1/stream/single/{path}`` sends a schema, then one message per change of the node (a child created,
a child's metadata updated, an array grown). Tiled documents it as best-effort (at-most-once with Redis), and a
dropped connection misses what happened meanwhile, so the source never trusts a message's content: every
message, and every (re)connection, only sets ``wake``, and the source reads the current state over HTTP
(tiled_reader.py). A connection Tiled closes with 1000 ("Producer ended stream": the node's writer closed it)
ends the watch; any other loss connects again, with a capped backoff.
"""

from __future__ import annotations

import asyncio
import logging

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from operators.metrics import PipelineMetrics
from operators.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
# websockets logs every handshake header at DEBUG, the API key's Authorization header too: its logger for these
# connections never goes below INFO, whatever the service's log level.
_ws_log = log.getChild("websocket")
_ws_log.setLevel(logging.INFO)

_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_END_OF_STREAM = 1000  # Tiled closes with 1000 only when the node's stream was closed by its writer


async def watch(
    url: str,
    headers: dict[str, str],
    wake: asyncio.Event,
    metrics: PipelineMetrics,
    *,
    name: str,
    max_size: int,
    until_closed: bool,
) -> None:
    """Set ``wake`` on every message from the node's stream and on each (re)connection.

    ``name`` is what logs call the node (never the URL's credentials: there are none in it; the key travels in
    ``headers``). ``until_closed``: return once the node's stream ends; otherwise connect again even then (the
    followed container's stream has no end). Cancel to stop.
    """
    warn = ThrottledLog(log)
    attempt = 0
    connected_before = False
    while True:
        try:
            async with websockets.connect(url, additional_headers=headers, max_size=max_size,
                                          open_timeout=10, ping_interval=20, ping_timeout=20, logger=_ws_log) as ws:  # fmt: skip
                if connected_before:
                    metrics.source_reconnects.inc()
                    log.info("websocket for %s connected again", name)
                connected_before, attempt = True, 0
                wake.set()  # what changed while it was down is read now
                async for _ in ws:
                    wake.set()
            if ws.close_code == _END_OF_STREAM and until_closed:
                log.debug("stream of %s ended", name)
                return
        except InvalidURI:
            raise
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
            warn.warning(name, "websocket for %s lost (%s); connecting again", name, type(exc).__name__)
        wake.set()  # a change may have been missed: look now and again after reconnecting
        await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
        attempt += 1
