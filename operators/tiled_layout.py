"""The Tiled layout this service writes and reads, its URIs and its auth header: the one home of all three.

  /<run_key>                           the run (keys.py makes run keys), start metadata
  /<run_key>/primary/image             frames the service stored, slice i = frame number i
  /<run_key>/latent/points             the point rows (operators.point_row), appended
  /<run_key>/latent/vectors            latent means, row r <-> points row r
  /<run_key>/latent/cluster_updates    re-clustering corrections

The writer (operators.persist), the run catalog and the bridge (frontend_bridge.frames) take node names,
frame URIs and the auth header from here; the bridge and the Tiled reader of replay and adapt
(stream.readers.tiled) parse node URIs with `parse_node_uri`. URIs are built here rather than taken from Tiled's ``links``,
which carry double slashes for fresh nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

PRIMARY, IMAGE = "primary", "image"  # /<run_key>/primary/image
LATENT, POINTS, VECTORS, CLUSTER_UPDATES = "latent", "points", "vectors", "cluster_updates"
# URL paths below the server under which a frame URI names a node (the LSE reads the same three)
ARRAY_PREFIXES = ("api/v1/array/full/", "api/v1/array/block/", "api/v1/metadata/")


def frame_uri(base_url: str, run_key: str, index: int) -> str:
    """``{base_url}/api/v1/array/full/{run_key}/primary/image?slice={index}``.

    ``run_key`` is the run's storage key (operators.persist.keys), never the sender's raw run id.
    The Latent Space Explorer reads the frame index from the first component of ``slice``.
    """
    if index < 0:
        raise ValueError(f"frame index must be >= 0, got {index}")
    return f"{base_url.rstrip('/')}/api/v1/array/full/{quote(run_key, safe='')}/{PRIMARY}/{IMAGE}?slice={index}"


@dataclass(frozen=True, slots=True)
class NodeURI:
    """A URI naming a node of a Tiled server: ``{base_url}/{one of ARRAY_PREFIXES}{path}[?slice=...]``."""

    base_url: str  # scheme://host[:port][/prefix] of the server, no trailing slash
    path: str  # the node's path below the server as the URI writes it (percent-encoded), no outer slashes
    slice_expr: str  # Tiled's slice parameter, "" for the whole node


def parse_node_uri(uri: str) -> NodeURI:
    """Split a node URI; ValueError for one that is no URL or names no node under ARRAY_PREFIXES."""
    parts = urlsplit(uri)
    for prefix in ARRAY_PREFIXES:
        server_path, found, path = parts.path.partition("/" + prefix)
        if found:
            slices = parse_qs(parts.query).get("slice", [""])
            return NodeURI(f"{parts.scheme}://{parts.netloc}{server_path}", path.strip("/"), slices[0])
    raise ValueError(f"not a Tiled node URI (expected .../{ARRAY_PREFIXES[0]}<path> or .../{ARRAY_PREFIXES[2]}<path>)")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header a Tiled server takes its API key in (none without a key)."""
    return {"Authorization": f"Apikey {api_key}"} if api_key else {}
