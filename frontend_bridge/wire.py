"""Outgoing message shapes for the websocket endpoints and REST routes.

Everything a client sees is built here, once per message and per format, so the hub can fan the
same encoded payload out to every client of that format.

/lse  : exactly the Latent Space Explorer's `LatentSpaceEvent` keys plus `run_id`, `cluster`, `novelty`.
/ws   : the same point keys with `"type": "point"`, plus typed run/cluster/backfill events.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from operators import point_row
from operators.messages import ClusterNew, ClusterUpdate, RunStarted, RunStopped
from operators.run_metadata import MetadataTooDeep, jsonable


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model names clients filter on ("name:version", as in the bundle manifest)."""

    autoencoder_model: str
    dimred_model: str


class WireFormat(enum.Enum):
    """One encoding of the outgoing stream; each client speaks exactly one."""

    LSE_JSON = "lse-json"  # /lse: point messages only, JSON text frames
    WS_JSON = "ws-json"  # /ws: typed messages, JSON text frames
    WS_MSGPACK = "ws-msgpack"  # /ws?format=msgpack: typed messages, binary msgpack frames

    @property
    def binary(self) -> bool:
        return self is WireFormat.WS_MSGPACK


# The LSE schema's keys, in its order; this service's own keys follow.
LSE_KEYS: tuple[str, ...] = (
    "tiled_url",
    "feature_vector",
    "index",
    "autoencoder_model",
    "dimred_model",
    "experiment_name",
    "timestamp",
    "total_processing_time",
    "autoencoder_time",
    "dimred_time",
)
SERVICE_KEYS: tuple[str, ...] = ("run_id", "cluster", "novelty")


@dataclass(frozen=True, slots=True)
class RunContext:
    """Per-run constants that every point message of the run repeats."""

    run_id: str
    experiment_name: str
    model: ModelInfo


def point_message(ctx: RunContext, row: Mapping[str, Any]) -> dict[str, Any]:
    """One point row (`operators.point_row`, Python scalars) as the /lse message (/ws adds `"type": "point"`).

    The LSE's keys in its order, then this service's, then any other field of the row under its wire name;
    x and y go out as the LSE's `feature_vector`.
    """
    fields = {f.wire: row[f.name] for f in point_row.FIELDS}
    fields["feature_vector"] = [fields.pop("x"), fields.pop("y")]
    fields.update(autoencoder_model=ctx.model.autoencoder_model, dimred_model=ctx.model.dimred_model,
                  experiment_name=ctx.experiment_name, run_id=ctx.run_id)  # fmt: skip
    message = {key: fields.pop(key) for key in LSE_KEYS + SERVICE_KEYS}
    message.update(fields)
    return message


def typed_point(message: dict[str, Any]) -> dict[str, Any]:
    """The /ws form of a point message: `type` first, then the /lse keys."""
    return {"type": "point", **message}


def run_start_event(
    msg: RunStarted, model: ModelInfo, metadata: dict[str, Any], metadata_omitted: str | None
) -> dict[str, Any]:
    """`metadata`: from `client_metadata`, or `{}` when it cannot be sent and `metadata_omitted` says why."""
    return {
        "type": "run_start",
        "run_id": msg.run_id,
        "run_key": msg.run_key,
        "run_name": msg.run_name,
        "started_at": float(msg.started_at),
        "autoencoder_model": model.autoencoder_model,
        "dimred_model": model.dimred_model,
        "metadata": metadata,
        "metadata_omitted": metadata_omitted,
    }


def run_stop_event(msg: RunStopped) -> dict[str, Any]:
    return {
        "type": "run_stop",
        "run_id": msg.run_id,
        "stopped_at": float(msg.stopped_at),
        "num_frames": msg.num_frames,
        "processed": int(msg.processed),
        "reason": msg.reason,
    }


def cluster_new_event(msg: ClusterNew) -> dict[str, Any]:
    return {
        "type": "cluster_new",
        "run_id": msg.run_id,
        "cluster": int(msg.cluster),
        "index": int(msg.index),
        "timestamp": float(msg.timestamp),
    }


def cluster_update_event(msg: ClusterUpdate) -> dict[str, Any]:
    """Points already sent whose cluster id changed: `clusters[i]` is the id of point `indices[i]` now."""
    return {
        "type": "cluster_update",
        "run_id": msg.run_id,
        "indices": [int(i) for i in msg.indices],
        "clusters": [int(c) for c in msg.clusters],
    }


def backfill_start_event(run_id: str | None, count: int) -> dict[str, Any]:
    """`count`: points held for the run when the client connected (more may follow while it catches up)."""
    return {"type": "backfill_start", "run_id": run_id, "count": count}


def backfill_end_event(run_id: str | None, count: int, skipped: int) -> dict[str, Any]:
    """`count`: points actually sent in the backfill; `skipped`: evicted from memory before they could be."""
    return {"type": "backfill_end", "run_id": run_id, "count": count, "skipped": skipped}


def encode(message: dict[str, Any], fmt: WireFormat) -> str | bytes:
    """Encode for one wire format: `str` goes out as a text frame, `bytes` as a binary frame."""
    if fmt.binary:
        return msgpack.packb(message, use_bin_type=True)
    return orjson.dumps(message).decode()


def dumps(obj: Any) -> bytes:
    """JSON for REST bodies (numpy arrays and scalars allowed)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


class MetadataOmitted(ValueError):
    """A run's start metadata cannot go to clients whole; `reason` is the counted drop reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def client_metadata(metadata: Mapping[str, Any], *, max_depth: int, max_bytes: int) -> dict[str, Any]:
    """The start metadata as clients get it: JSON-safe, at most `max_depth` levels and `max_bytes` packed.

    Every new /ws client receives it, so it must encode in every format and stay small; raises
    MetadataOmitted (reason `metadata_too_deep`, `metadata_too_large` or `metadata_unencodable`) otherwise.
    Depth and packed (msgpack) size are counted as the ingest counts them, so what it accepts passes here.
    """
    try:
        value = jsonable(metadata, bytes_as="size", max_depth=max_depth)
    except MetadataTooDeep as exc:
        raise MetadataOmitted("metadata_too_deep", str(exc)) from exc
    try:
        orjson.dumps(value)
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an integer beyond 64 bits, a lone surrogate
        raise MetadataOmitted("metadata_unencodable", f"cannot be encoded: {exc}") from exc
    if size > max_bytes:
        raise MetadataOmitted("metadata_too_large", f"{size} bytes packed; at most {max_bytes}")
    return value
