"""The point row: one processed frame's result as every consumer keeps or sends it (the one home of its fields).

Each field has a column name (the writer's points table in Tiled and its result log), a dtype, and a wire
name (the key in /lse and /ws point messages and in the REST rows of /api/runs/{id}/points). Every consumer
derives its fields from `FIELDS`: the hub's in-memory store (`NUMERIC_DTYPE` + the URL), the writer's table
(operators.persist.schema.POINT_COLUMNS), the run catalog (rows read back from Tiled), the REST rows and the
point messages (frontend_bridge.wire). Adding a field is a change here (plus the page, if it shows it:
frontend_bridge/static/store.js reads the wire names; tests/test_point_row.py holds every consumer to this).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.messages import Point


@dataclass(frozen=True, slots=True)
class RowField:
    name: str  # column in Tiled's points table and key in the result log
    dtype: str  # numpy dtype of the column; "str" for text
    wire: str  # key in point messages and REST rows (point messages carry x and y as feature_vector)
    of: Callable[[Point], Any]  # the value for a Point, as a Python scalar (msgpack refuses numpy scalars)


FIELDS: tuple[RowField, ...] = (
    RowField("index", "int64", "index", lambda p: int(p.index)),  # the frame number
    RowField("x", "float64", "x", lambda p: float(p.x)),
    RowField("y", "float64", "y", lambda p: float(p.y)),
    RowField("cluster", "int64", "cluster", lambda p: int(p.cluster)),
    RowField("novelty", "float64", "novelty", lambda p: float(p.novelty)),
    RowField("timestamp", "float64", "timestamp", lambda p: float(p.timestamp)),  # unix s, point produced
    RowField("processing_time", "float64", "total_processing_time", lambda p: float(p.timings.total)),  # s
    RowField("encode_time", "float64", "autoencoder_time", lambda p: float(p.timings.encode)),  # s
    RowField("project_time", "float64", "dimred_time", lambda p: float(p.timings.project)),  # s
    RowField("tiled_url", "str", "tiled_url", lambda p: p.tiled_url),
)
NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
NUMERIC: tuple[RowField, ...] = tuple(f for f in FIELDS if f.dtype != "str")
TEXT: tuple[RowField, ...] = tuple(f for f in FIELDS if f.dtype == "str")
NUMERIC_DTYPE = np.dtype([(f.name, f.dtype) for f in NUMERIC])  # the hub keeps the text fields beside it
WIRE_KEYS: tuple[str, ...] = tuple(f.wire for f in FIELDS)  # a REST row's keys, in this order


def values(point: Point) -> dict[str, Any]:
    """The row of a Point: column name -> Python scalar."""
    return {f.name: f.of(point) for f in FIELDS}


def rest_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row (column names) as clients get it (wire names); a non-finite float becomes None (JSON null)."""
    return {f.wire: _python(f, row[f.name]) for f in FIELDS}


def _python(f: RowField, value: Any) -> Any:
    if f.dtype == "str":
        return str(value)
    if f.dtype.startswith("int"):
        return int(value)
    v = float(value)
    return v if math.isfinite(v) else None
