"""What can go wrong when writing to Tiled, in three kinds that decide how long to keep trying."""

from __future__ import annotations

import httpx


class PersistError(Exception):
    """Base of the persistence errors this package raises."""


class TiledUnavailable(PersistError):
    """Tiled did not answer (connection refused, timeout, 502/503/504 from a proxy): wait for it."""


class TiledFailed(PersistError):
    """Tiled answered but failed this request (500 and the like): worth a few retries, not more.

    Tiled is up and failing on what was sent (e.g. an offset it cannot extend to); waiting for it as
    for an outage held every later run's writes behind this one for minutes.
    """


class TiledRejected(PersistError):
    """Tiled refused the request (4xx): retrying will not help."""


# Statuses a proxy answers while the server behind it is down or restarting.
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


def translate(exc: BaseException) -> PersistError:
    """Map httpx / tiled client / local storage errors onto our three kinds."""
    if isinstance(exc, PersistError):
        return exc
    if isinstance(exc, httpx.HTTPStatusError):  # the tiled client's ClientError is one too
        status = exc.response.status_code
        if status in _UNAVAILABLE_STATUSES:
            return TiledUnavailable(f"HTTP {status}")
        if status >= 500:
            return TiledFailed(f"HTTP {status}: {exc.response.text[:200]}")
        return TiledRejected(f"HTTP {status}: {exc.response.text[:200]}")
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError, OSError)):
        return TiledUnavailable(f"{type(exc).__name__}: {exc}")
    return TiledRejected(f"{type(exc).__name__}: {exc}")
