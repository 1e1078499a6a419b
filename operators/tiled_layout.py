"""The Tiled layout this service writes and reads, its URIs and its auth header: the one home of all three.

  /<run_key>                           the run (keys.py makes run keys), start metadata
  /<run_key>/primary/image             frames the service stored, slice i = frame number i
  /<run_key>/latent/points             the point rows (operators.point_row), appended
  /<run_key>/latent/vectors            latent means, row r <-> points row r
  /<run_key>/latent/cluster_updates    re-clustering corrections

The writer (operators.persist), the run catalog and the bridge (frontend_bridge.frames) take node names,
frame URIs and the auth header from here. URIs are built here rather than taken from Tiled's ``links``,
which carry double slashes for fresh nodes.
"""

from __future__ import annotations

from urllib.parse import quote

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


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header a Tiled server takes its API key in (none without a key)."""
    return {"Authorization": f"Apikey {api_key}"} if api_key else {}
