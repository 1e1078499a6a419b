"""The tables the writer keeps per run in Tiled, and their Arrow form (one home for the column lists).

The points table's columns are the point row's (operators.point_row), after the run's row number.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

from operators import point_row

APACHE_ARROW_FILE = "application/vnd.apache.arrow.file"

# /<run_key>/latent/points: one row per processed frame, numbered in the run ("row"; vectors row r <-> row r).
POINT_COLUMNS: tuple[tuple[str, str], ...] = (("row", "int64"),) + tuple(
    (f.name, "string" if f.dtype == "str" else f.dtype) for f in point_row.FIELDS
)
# /<run_key>/latent/cluster_updates: re-clustering moved the point of frame `index` to `cluster`.
UPDATE_COLUMNS: tuple[tuple[str, str], ...] = (("update", "int64"), ("index", "int64"), ("cluster", "int64"))


def preload_client_modules() -> None:
    """Import what the writer's first run needs from the Tiled client, ahead of time (call in a thread).

    `tiled.client.dataframe` (an appendable table) takes ~1.5 s to import; imported lazily at the first
    run's start, it held the GIL while that run's first frames were computed (e2e spikes of 250 ms).
    """
    for module in ("tiled.client.array", "tiled.client.dataframe", "tiled.structures.array", "tiled.structures.table",
                   "zarr"):  # fmt: skip
        importlib.import_module(module)
    point_schema()


def point_schema(columns: tuple[tuple[str, str], ...] = POINT_COLUMNS) -> Any:
    import pyarrow as pa

    return pa.schema([(name, pa.string() if t == "string" else getattr(pa, t)()) for name, t in columns])


def arrow_file(rows: Sequence[Mapping[str, Any]], columns: tuple[tuple[str, str], ...]) -> bytes:
    """Rows as one Arrow IPC file: the body Tiled takes for a table partition append."""
    import pyarrow as pa

    table = pa.Table.from_pylist(list(rows), schema=point_schema(columns))
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as f:
        f.write_table(table)
    return sink.getvalue()
