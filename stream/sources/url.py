"""``--source URL`` -> a typed source spec, one dataclass per source kind.

=====================================  ==============================================================
``zmq+pull://HOST:PORT``               arroyo msgpack over ZeroMQ, the service connects with PULL
``zmq+sub://HOST:PORT``                the same from a PUB source (SUB: cannot push back, drops counted)
``stream2://HOST:PORT[?channel=NAME]`` DECTRIS SIMPLON stream v2 (CBOR), PULL; default: the first channel
``tiled://HOST:PORT/PATH[?field=NAME]`` bluesky runs written into the Tiled container at PATH
``tiled+https://HOST[:PORT]/PATH``     the same over HTTPS
=====================================  ==============================================================

Credentials never travel in the URL (it is logged, shown on /healthz and in process lists): a user name,
password or a secret-looking query parameter is refused, and the error names the parameter, never its value.
Sources that need a key take ``--source-api-key`` (``LATENT_STREAM_SOURCE_API_KEY``).

This module imports nothing heavy: the settings validate ``--source`` with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

_SECRET_PARAMS = frozenset({"api_key", "apikey", "key", "token", "password", "secret", "access_token"})


class SourceURLError(ValueError):
    """A ``--source`` URL that cannot be used; the message never repeats a credential."""


@dataclass(frozen=True, slots=True)
class ZmqSource:
    """Arroyo msgpack frames over ZeroMQ (stream/protocol.py); ``address`` is a ZeroMQ endpoint."""

    kind: ClassVar[str] = "zmq"
    pattern: Literal["pull", "sub"]
    address: str  # tcp://HOST:PORT

    @property
    def can_push_back(self) -> bool:
        """PULL makes a full queue wait (lossless); SUB cannot, so the service drops and counts instead."""
        return self.pattern == "pull"

    def describe(self) -> str:
        return f"{self.address} ({self.pattern}, arroyo msgpack)"


@dataclass(frozen=True, slots=True)
class Stream2Source:
    """DECTRIS SIMPLON stream v2: CBOR over ZeroMQ; the detector PUSHes, the service connects with PULL."""

    kind: ClassVar[str] = "stream2"
    address: str  # tcp://HOST:PORT
    channel: str | None = None  # threshold channel; None: the first one the start message lists

    @property
    def can_push_back(self) -> bool:
        return True

    def describe(self) -> str:
        channel = self.channel or "the first channel"
        return f"{self.address} (DECTRIS stream v2, {channel})"


@dataclass(frozen=True, slots=True)
class TiledSource:
    """bluesky runs followed live in a Tiled container (``base_url`` + ``path``)."""

    kind: ClassVar[str] = "tiled"
    base_url: str  # http(s)://HOST:PORT
    path: str  # the container whose new runs are followed, without leading/trailing '/'
    field: str | None = None  # the image field; None: the stream's one image array

    @property
    def can_push_back(self) -> bool:
        return True  # frames stay in Tiled: the source reads them as fast as the pipeline takes them

    def describe(self) -> str:
        field = f", field {self.field}" if self.field else ""
        return f"{self.base_url}/{self.path} (Tiled live runs{field})"


SourceSpec = ZmqSource | Stream2Source | TiledSource


def parse_source(url: str) -> SourceSpec:
    """The spec a ``--source`` URL names. Raises `SourceURLError` saying what is wrong."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise SourceURLError(f"not a URL: {_redacted(url)}") from None
    parser = _PARSERS.get(parts.scheme.lower())
    if parser is None:
        known = ", ".join(f"{scheme}://" for scheme in _PARSERS)
        raise SourceURLError(f"unknown source scheme {parts.scheme + '://' if parts.scheme else '(none)'} "
                             f"in {_redacted(url)}; known: {known}")  # fmt: skip
    if parts.username is not None or parts.password is not None:
        raise SourceURLError(
            f"credentials do not belong in the source URL ({_redacted(url)}): use --source-api-key or "
            "LATENT_STREAM_SOURCE_API_KEY"
        )
    if parts.fragment:
        raise SourceURLError(f"a source URL has no #fragment: {_redacted(url)}")
    return parser(parts)


def _redacted(url: str) -> str:
    """The URL without user info, query values or fragment: safe to log."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(unparsable)"
    names = sorted({name for name, _ in parse_qsl(parts.query, keep_blank_values=True)})
    query = "?" + "&".join(f"{name}=..." for name in names) if names else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


def _params(parts: SplitResult, allowed: tuple[str, ...]) -> dict[str, str]:
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    secret = sorted(set(names) & _SECRET_PARAMS)
    if secret:
        raise SourceURLError(f"the source URL carries {', '.join(secret)}: credentials do not belong in the URL, "
                             "use --source-api-key or LATENT_STREAM_SOURCE_API_KEY")  # fmt: skip
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise SourceURLError(f"unknown parameter(s) {', '.join(unknown)} in {_redacted(parts.geturl())} "
                             f"(allowed: {allowed_text})")  # fmt: skip
    if len(names) != len(set(names)):
        raise SourceURLError(f"a parameter is given twice in {_redacted(parts.geturl())}")
    values = dict(pairs)
    empty = sorted(name for name, value in values.items() if not value)
    if empty:
        raise SourceURLError(f"empty parameter(s) {', '.join(empty)} in {_redacted(parts.geturl())}")
    return values


def _host_port(parts: SplitResult) -> tuple[str, int]:
    if not parts.hostname or parts.port is None:
        raise SourceURLError(f"{parts.scheme}:// needs HOST:PORT, got {_redacted(parts.geturl())}")
    return parts.hostname, parts.port


def _tcp(parts: SplitResult) -> str:
    """A ZeroMQ tcp:// endpoint; the URL names a host and port only."""
    host, port = _host_port(parts)
    if parts.path not in ("", "/"):
        raise SourceURLError(f"{parts.scheme}:// takes no path, got {_redacted(parts.geturl())}")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _zmq(parts: SplitResult) -> ZmqSource:
    _params(parts, ())
    pattern: Literal["pull", "sub"] = "sub" if parts.scheme.lower() == "zmq+sub" else "pull"
    return ZmqSource(pattern, _tcp(parts))


def _stream2(parts: SplitResult) -> Stream2Source:
    params = _params(parts, ("channel",))
    return Stream2Source(_tcp(parts), params.get("channel"))


def _tiled(parts: SplitResult) -> TiledSource:
    params = _params(parts, ("field",))
    host, port = (parts.hostname, parts.port) if parts.scheme.lower() == "tiled+https" else _host_port(parts)
    if not host:
        raise SourceURLError(f"{parts.scheme}:// needs a host, got {_redacted(parts.geturl())}")
    path = parts.path.strip("/")
    if not path:
        raise SourceURLError(f"{parts.scheme}:// needs the PATH of the container to follow, "
                             f"got {_redacted(parts.geturl())}")  # fmt: skip
    http = "https" if parts.scheme.lower() == "tiled+https" else "http"
    netloc = f"[{host}]" if ":" in host else host
    base = f"{http}://{netloc}" + (f":{port}" if port is not None else "")
    return TiledSource(base, path, params.get("field"))


# scheme -> parser. A new source kind adds its scheme(s) here and its builder in stream/sources/__init__.py.
_PARSERS: dict[str, Callable[[SplitResult], SourceSpec]] = {
    "zmq+pull": _zmq,
    "zmq+sub": _zmq,
    "stream2": _stream2,
    "tiled": _tiled,
    "tiled+https": _tiled,
}
