"""A run's metadata (the source's start document) as JSON can carry it: keep basic types, stringify the rest.

One conversion for its two consumers, which differ only in what bytes become (`bytes_as`):
- "size": the bridge sends the metadata to every new /ws client, so a blob of bytes goes out as its size
  (`<N bytes>`); its content means nothing on the page and would be sent again to each client.
- "repr": the writer stores the metadata in Tiled as the run's record, so the content is kept, as Python
  writes the bytes (`b'...'`, escaped where not printable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

BytesAs = Literal["size", "repr"]


class MetadataTooDeep(ValueError):
    """Containers nested deeper than the `max_depth` given to `jsonable`."""


def jsonable(value: Any, *, bytes_as: BytesAs, max_depth: int | None = None) -> Any:
    """`value` with mappings as dicts of str keys, sequences as lists, numpy scalars as Python ones.

    With `max_depth`, containers nested deeper raise MetadataTooDeep (orjson stops at 255 levels, msgpack at
    512, and a deep enough document would exhaust the recursion here).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        if max_depth is not None and max_depth < 1:
            raise MetadataTooDeep("nested deeper than the limit")
        inner = None if max_depth is None else max_depth - 1
        if isinstance(value, Mapping):
            return {str(k): jsonable(v, bytes_as=bytes_as, max_depth=inner) for k, v in value.items()}
        return [jsonable(v, bytes_as=bytes_as, max_depth=inner) for v in value]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>" if bytes_as == "size" else str(value)
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    if callable(item) and getattr(value, "ndim", None) == 0:
        return jsonable(item(), bytes_as=bytes_as, max_depth=max_depth)
    return str(value)
