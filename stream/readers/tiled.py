"""A frame stack in Tiled: replayed events carry each frame's Tiled URI, so the service does not store them again."""

from __future__ import annotations

from urllib.parse import unquote

import numpy as np

from operators.tiled_layout import parse_node_uri
from stream.readers.source import FrameOrigin, FrameSource, RecordedFrame, ReplayError


def tiled_source(uri: str, api_key: str | None) -> FrameSource:
    from tiled.client import from_uri

    try:
        parsed = parse_node_uri(uri)
    except ValueError as exc:
        raise ReplayError(f"{uri}: {exc}") from exc
    base, node_path = parsed.base_url, unquote(parsed.path)
    client = from_uri(base, api_key=api_key)
    node = client
    for part in node_path.split("/"):
        node = node[part]
    if len(node.shape) != 3:
        raise ReplayError(f"{uri}: expected an (N, H, W) frame stack, got shape {node.shape}")
    full = f"{base}/api/v1/array/full/{node_path}"
    md = dict(node.metadata)
    ts = md.get("timestamps")
    timestamps = np.asarray(ts, dtype=np.float64) if ts is not None and len(ts) == node.shape[0] else None
    return FrameSource(
        node_path.replace("/", "_"), "tiled", int(node.shape[0]), timestamps,
        lambda i: RecordedFrame(i, np.ascontiguousarray(node[i]), tiled_url=f"{full}?slice={i}"),
        {"source": uri}, close=client.context.close, origin=lambda i: FrameOrigin(full, i),
    )  # fmt: skip
