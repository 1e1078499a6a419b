"""Resume after a crash: the result logs a killed process left behind, back into Tiled.

On start every log is adopted at once (`adopt`: row numbering, counters; a run that continues gets the next
row numbers) and, once Tiled answers and before anything published since, replayed (`replay`): rows
missing from Tiled are appended (vectors too), frames the log does not mark as written are counted as lost
("lost_in_crash": the image died with the process), and a run whose log has a `stop` record is closed. A
run without one is closed with reason "interrupted" by the writer when another run starts or it stops.

A log that cannot be replayed (unreadable, records without their fields, a node Tiled refuses, a pre-key
log whose run id is no safe key) is moved aside (result_log.SET_ASIDE_DIR), counted (`logs_set_aside`, rows
"unreplayable") and logged: it must never stop the writer from starting, or every restart would fail on it.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from operators.persist.backlog import Backlog
from operators.persist.keys import is_safe_key
from operators.persist.result_log import RecoveredRun, ResultLog
from operators.persist.runs import Row
from operators.persist.schema import POINT_COLUMNS
from operators.persist.write_loop import WriteLoop

logger = logging.getLogger(__name__)


def adopt(backlog: Backlog, result_log: ResultLog, rec: RecoveredRun) -> bool:
    """Take over a logged run's state, before anything new is published; False if the log was set aside."""
    try:
        _adopt(backlog, rec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        set_aside(backlog, result_log, rec, f"{type(exc).__name__}: {exc}")
        return False
    return True


def _adopt(backlog: Backlog, rec: RecoveredRun) -> None:
    st = backlog.run(rec.run_key, rec.run_id)
    if rec.start is not None:
        st.start = {"run_name": str(rec.start.get("run_name") or rec.run_id),
                    "started_at": float(rec.start.get("started_at") or 0.0),
                    "metadata": dict(rec.start.get("metadata") or {})}  # fmt: skip
    st.next_row = max((int(p["row"]) for p in rec.points), default=-1) + 1
    lost = sum(1 for p in rec.points if p.get("stored_by_service") and int(p["index"]) not in rec.frames_ok)
    if lost:
        st.frames_not_written["lost_in_crash"] += lost
        logger.warning("run %s (%s): %d frames died with the previous process before reaching Tiled",
                       rec.run_id, rec.run_key, lost)  # fmt: skip
    st.frames_written += len(rec.frames_ok)
    st.frame_indices.update(rec.frames_ok)
    st.recovered_open = rec.stop is None


async def replay(loop: WriteLoop, rec: RecoveredRun) -> None:
    """Bring Tiled up to date with an adopted run, or set its log aside if that cannot be done."""
    if not is_safe_key(rec.run_key):  # a log from a version that stored runs under the raw id
        set_aside(loop.backlog, loop.result_log, rec, f"{rec.run_key!r} is not a safe storage key")
        return
    try:
        failed = await _replay_rows(loop, rec)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the log must not block the start
        set_aside(loop.backlog, loop.result_log, rec, f"{type(exc).__name__}: {exc}")
        return
    if failed == "tiled_unreachable":
        return  # the log stays: the next start replays it
    if failed:
        set_aside(loop.backlog, loop.result_log, rec, failed)
    elif rec.stop is not None:
        loop.result_log.discard(rec.run_key)


async def _replay_rows(loop: WriteLoop, rec: RecoveredRun) -> str | None:
    """The run's node, the rows Tiled lacks, its close; the reason it gave up, if it did."""
    st = loop.backlog.run(rec.run_key)
    if failed := await loop.with_retry(f"recovery of run {rec.run_key}", loop.ensure_run, rec.run_key):
        return failed
    rows = [
        Row(rec.run_key, int(p["row"]), int(p["index"]), {name: p[name] for name, _ in POINT_COLUMNS},
            np.frombuffer(p["latent"], dtype=np.float32), None, float(p["timestamp"]))
        for p in rec.points
    ]  # fmt: skip
    present = await asyncio.to_thread(loop.nodes.rows_present, rec.run_key)
    missing = [r for r in rows if r.row not in present]
    st.rows_written += len(present)
    for i in range(0, len(missing), 256):
        await loop.write_batch(missing[i : i + 256])
    logger.info("run %s (%s) recovered: %d rows in the log, %d re-appended",
                rec.run_id, rec.run_key, len(rows), len(missing))  # fmt: skip
    if rec.stop is None:
        return None
    stop = {k: rec.stop.get(k) for k in ("stopped_at", "num_frames", "processed", "reason")}
    return await loop.with_retry(f"close of run {rec.run_key}", loop.close_run, rec.run_key, stop)


def set_aside(backlog: Backlog, result_log: ResultLog, rec: RecoveredRun, why: str) -> None:
    st = backlog.run(rec.run_key, rec.run_id)
    st.recovered_open = False
    unstored = len(rec.points) - st.rows_written - sum(st.rows_not_written.values())
    if unstored > 0:
        st.rows_not_written["unreplayable"] += unstored
    path = result_log.set_aside(rec.run_key)
    logger.error("result log of run %s (%s) cannot be replayed into Tiled (%s); moved to %s",
                 rec.run_id, rec.run_key, why, path)  # fmt: skip
