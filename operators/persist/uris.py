"""Canonical Tiled URIs for frames (ARCHITECTURE.md, "Tiled layout and URIs").

Built here rather than taken from Tiled's ``links``, which carry double slashes for fresh nodes.
"""

from __future__ import annotations

from urllib.parse import quote


def frame_uri(base_url: str, run_key: str, index: int) -> str:
    """``{base_url}/api/v1/array/full/{run_key}/primary/image?slice={index}``.

    ``run_key`` is the run's storage key (operators.persist.keys), never the sender's raw run id.
    The Latent Space Explorer reads the frame index from the first component of ``slice``.
    """
    if index < 0:
        raise ValueError(f"frame index must be >= 0, got {index}")
    return f"{base_url.rstrip('/')}/api/v1/array/full/{quote(run_key, safe='')}/primary/image?slice={index}"
