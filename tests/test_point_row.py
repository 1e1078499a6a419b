"""Every consumer of a point keeps and sends exactly the fields of the one point row (operators/point_row.py).

A consumer with a field list of its own (the hub's store, the writer's table and result log, the REST rows,
the websocket messages, the page) fails here as soon as the row gains, loses or renames a field.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from bridge_support import MODEL, point, run_started

from frontend_bridge import Hub, WireFormat
from frontend_bridge.wire import LSE_KEYS, SERVICE_KEYS, RunContext, point_message
from operators import point_row
from operators.messages import RunStarted
from operators.persist.result_log import ResultLog
from operators.persist.schema import POINT_COLUMNS
from operators.persist.writer import TiledWriter

STORE_JS = Path(__file__).resolve().parents[1] / "frontend_bridge" / "static" / "store.js"


def test_the_writers_points_table_has_the_row_number_then_every_field_of_the_row() -> None:
    assert [name for name, _ in POINT_COLUMNS] == ["row", *point_row.NAMES]
    for (_, dtype), f in zip(POINT_COLUMNS[1:], point_row.FIELDS, strict=True):
        assert dtype == ("string" if f.dtype == "str" else f.dtype)


async def test_the_writers_result_log_records_every_field_of_the_row(tmp_path: Path) -> None:
    writer = TiledWriter("http://127.0.0.1:9", None, data_dir=tmp_path)  # never started: the log is enough
    sent = point("r", 3)
    await writer.publish(RunStarted("r", "r", time.time(), run_key="r"))
    await writer.publish(sent)
    await writer.stop(drain_timeout=0)
    [run] = ResultLog(tmp_path / "results-log").recover()
    [logged] = run.points
    assert {name: logged[name] for name in point_row.NAMES} == point_row.values(sent)


async def test_the_hub_keeps_and_sends_every_field_of_the_row_under_its_wire_name() -> None:
    hub = Hub(MODEL)
    await hub.publish(run_started("r"))
    sent = point("r", 5, cluster=2)
    lse = hub.connect("lse", WireFormat.LSE_JSON, backfill=False)
    await hub.publish(sent)
    row = point_row.values(sent)

    # REST rows (/api/runs/{id}/points) from memory: every field, under its wire name
    assert hub.run_rows("r") == [point_row.rest_row(row)]
    assert list(point_row.rest_row(row)) == list(point_row.WIRE_KEYS)

    # the live message and a backfilled one: every field (x and y as the LSE's feature_vector)
    live = json.loads((await lse.next_batch())[0])
    late = hub.connect("ws", WireFormat.WS_JSON, backfill=True)
    msgs: list[dict] = []
    while not msgs or msgs[-1]["type"] != "backfill_end":
        msgs.extend(json.loads(p) for p in await late.next_batch())
    [backfilled] = [m for m in msgs if m["type"] == "point"]
    for message in (live, backfilled):
        assert message["feature_vector"] == [row["x"], row["y"]]
        for f in point_row.FIELDS:
            if f.name not in ("x", "y"):
                assert message[f.wire] == pytest.approx(row[f.name]), f.wire


def test_a_point_message_has_the_lse_keys_in_order_then_the_services_then_any_other_field() -> None:
    ctx = RunContext("r", "exp", MODEL)
    message = point_message(ctx, point_row.values(point("r", 1)))
    keys = list(message)
    assert keys[: len(LSE_KEYS) + len(SERVICE_KEYS)] == [*LSE_KEYS, *SERVICE_KEYS]
    others = {f.wire for f in point_row.FIELDS} - {"x", "y"} - set(LSE_KEYS) - set(SERVICE_KEYS)
    assert set(keys[len(LSE_KEYS) + len(SERVICE_KEYS) :]) == others


def _keys_read(js: str, function: str, var: str) -> set[str]:
    body = re.search(rf"export function {function}\([^)]*\) \{{(.*?)\n\}}", js, re.DOTALL)
    assert body, f"{function} not found in store.js"
    return set(re.findall(rf"\b{var}\.(\w+)", body.group(1)))


def test_the_page_reads_only_keys_the_service_sends_and_every_key_of_the_row() -> None:
    js = STORE_JS.read_text()
    message_keys = set(point_message(RunContext("r", "e", MODEL), point_row.values(point("r", 0))))
    from_message = _keys_read(js, "pointFromMessage", "m")
    from_row = _keys_read(js, "pointFromRow", "r")
    assert from_message <= message_keys, from_message - message_keys
    assert from_row <= set(point_row.WIRE_KEYS), from_row - set(point_row.WIRE_KEYS)
    # a point from a REST row is the same record as one from a live message
    assert from_row == {f.wire for f in point_row.FIELDS}
    assert from_message == (from_row - {"x", "y"}) | {"feature_vector", "run_id"}
