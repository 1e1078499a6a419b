"""The runs' nodes in Tiled (containers, arrays, tables, metadata), made and read with Tiled's client.

The client is synchronous: every method here runs in a worker thread. Nothing here is per frame: a run
costs a few of these calls at its start and one at its close; the data itself goes by tiled_http.py or
local_frames.py.

Create first and look up only on 409 (exists: a restart, or an attempt whose answer was lost): a new run
then costs one request per node. Each request costs Tiled's server ~30 ms of CPU, and the run's first
frames are computed while these go out.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from operators.persist.schema import POINT_COLUMNS, point_schema
from operators.tiled_layout import LATENT, POINTS, PRIMARY


class TiledNodes:
    """Nodes below `root` of the Tiled server `client` talks to."""

    def __init__(self, client: Any, root: str = "") -> None:
        self._client = client
        self._root = [p for p in root.strip("/").split("/") if p]

    @classmethod
    def connect(cls, base_url: str, api_key: str | None, *, root: str = "", timeout: float = 30.0) -> Self:
        from tiled.client import from_uri

        return cls(from_uri(base_url, api_key=api_key, timeout=timeout), root)

    def node(self, *parts: str) -> Any:
        node = self._client
        for p in (*self._root, *parts):
            node = node[p]
        return node

    def ensure_run(self, run_key: str, metadata: dict[str, Any]) -> None:
        """/<run_key> with `metadata`, its `primary` and `latent` containers and the points table."""
        parent = self._client
        for p in self._root:
            parent = _ensure_container(parent, p)
        run = _ensure_container(parent, run_key, metadata)
        _ensure_container(run, PRIMARY)
        latent = _ensure_container(run, LATENT)
        _ensure_table(latent, POINTS, POINT_COLUMNS)

    def ensure_array(
        self, run_key: str, group: str, key: str, row_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[int, ...], str]:
        """An appendable array /<run_key>/<group>/<key>, (1, *row_shape) with one chunk per leading index
        (no data written); returns the row shape and dtype it has (an existing one keeps its own)."""
        from tiled.client.utils import ClientError
        from tiled.structures.array import ArrayStructure, BuiltinDtype
        from tiled.structures.core import StructureFamily
        from tiled.structures.data_source import DataSource

        parent = self.node(run_key, group)
        structure = ArrayStructure(
            shape=(1, *row_shape),
            chunks=((1,), *((n,) for n in row_shape)),
            data_type=BuiltinDtype.from_numpy_dtype(np.dtype(dtype)),
        )
        try:
            array = parent.new(
                StructureFamily.array,
                [DataSource(structure=structure, structure_family=StructureFamily.array)],
                key=key,
            )
        except ClientError as exc:
            if exc.response.status_code != 409:
                raise
            array = parent[key]
        return tuple(array.shape[1:]), np.dtype(array.dtype).str

    def ensure_table(self, run_key: str, key: str, columns: tuple[tuple[str, str], ...]) -> None:
        """An appendable table /<run_key>/latent/<key>."""
        _ensure_table(self.node(run_key, LATENT), key, columns)

    def rows_present(self, run_key: str) -> set[int]:
        """The "row" numbers already in the run's points table (after an attempt whose answer was lost)."""
        points = self.node(run_key, LATENT, POINTS)
        try:
            df = points.read(["row"])
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) in (404, 500, None):
                return set()  # an appendable table with nothing appended yet
            raise
        return {int(v) for v in df["row"]}

    def update_metadata(self, run_key: str, metadata: dict[str, Any]) -> None:
        self.node(run_key).update_metadata(metadata=metadata)

    def close(self) -> None:
        self._client.context.close()


def _ensure_container(parent: Any, key: str, metadata: dict[str, Any] | None = None) -> Any:
    from tiled.client.utils import ClientError

    try:
        return parent.create_container(key, metadata=metadata or {})
    except ClientError as exc:
        if exc.response.status_code == 409:  # created by an earlier attempt whose answer was lost
            return parent[key]
        raise


def _ensure_table(parent: Any, key: str, columns: tuple[tuple[str, str], ...]) -> None:
    try:
        parent.create_appendable_table(point_schema(columns), key=key)
    except Exception as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) != 409:
            raise
