"""A run's start metadata as its two consumers get it: the same conversion, bytes as each needs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from frontend_bridge.wire import MetadataOmitted, client_metadata
from operators.run_metadata import MetadataTooDeep, jsonable

START = {
    "plan": {"scan": [{"motor": "x", "steps": np.int64(3)}], "exposure": np.float32(0.5), 1: (np.array(2.0),)},
    "detector": "eiger",
    "mask": b"\x00\x01ab",
    "path": Path("/data/run1"),
}


@pytest.mark.parametrize(("bytes_as", "mask"), [("size", "<4 bytes>"), ("repr", "b'\\x00\\x01ab'")])
def test_both_consumers_get_json_types_and_differ_only_in_bytes(bytes_as: str, mask: str) -> None:
    assert jsonable(START, bytes_as=bytes_as) == {
        "plan": {"scan": [{"motor": "x", "steps": 3}], "exposure": 0.5, "1": [2.0]},
        "detector": "eiger",
        "mask": mask,
        "path": "/data/run1",
    }


def test_clients_get_the_size_of_bytes_and_no_document_deeper_than_the_bound() -> None:
    assert client_metadata(START, max_depth=4, max_bytes=1024)["mask"] == "<4 bytes>"
    with pytest.raises(MetadataOmitted) as omitted:
        client_metadata(START, max_depth=3, max_bytes=1024)  # the document, plan, scan, its map: four levels
    assert omitted.value.reason == "metadata_too_deep"


def test_without_a_depth_bound_nothing_is_refused_and_with_one_deeper_is() -> None:
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(40):
        deep = {"d": deep}
    assert jsonable(deep, bytes_as="repr") == deep
    with pytest.raises(MetadataTooDeep):
        jsonable(deep, bytes_as="size", max_depth=40)
    assert jsonable(deep, bytes_as="size", max_depth=41) == deep
