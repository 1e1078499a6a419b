"""A per-run write-ahead log of results, so a SIGKILL loses no row that was already published.

`TiledWriter.publish` appends each point (row fields + latent vector) here before it returns;
an unbuffered `write()` puts the record in the OS page cache, which survives the death of the
process (not a power cut: there is no fsync on the per-frame path). On start, the writer replays
every log left in the directory into Tiled, then deletes the log of each run that is closed.

Format: concatenated msgpack maps, one per record, dispatched on "t":
  {"t": "start", "run_id", "run_name", "started_at", "metadata"}
  {"t": "point", "row", "index", "x", "y", "cluster", "novelty", "timestamp", "tiled_url",
   "processing_time", "encode_time", "project_time", "stored_by_service", "latent": bytes}
  {"t": "frame_ok", "index"}   (the frame is in Tiled)
  {"t": "stop", "stopped_at", "num_frames", "processed", "reason"}
A torn last record (killed mid-write) is ignored.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _file_name(run_id: str) -> str:
    # run ids are user data: keep file names safe but distinct (hex of the id when it needs escaping)
    return (run_id if not _SAFE.search(run_id) else "x" + run_id.encode().hex()) + ".wal"


@dataclass(slots=True)
class RecoveredRun:
    """What one log says about a run."""

    run_id: str
    start: dict[str, Any] | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    frames_ok: set[int] = field(default_factory=set)
    stop: dict[str, Any] | None = None
    path: Path | None = None


class ResultLog:
    """Append-only result logs, one file per run, under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Any] = {}

    def append(self, run_id: str, record: dict[str, Any]) -> None:
        f = self._files.get(run_id)
        if f is None:
            f = open(self.directory / _file_name(run_id), "ab", buffering=0)  # noqa: SIM115
            self._files[run_id] = f
        f.write(msgpack.packb(record, use_bin_type=True))

    def discard(self, run_id: str) -> None:
        """Everything of this run is in Tiled and the run is closed: drop its log."""
        f = self._files.pop(run_id, None)
        if f is not None:
            f.close()
        (self.directory / _file_name(run_id)).unlink(missing_ok=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def recover(self) -> list[RecoveredRun]:
        """Read every log in the directory (oldest first)."""
        runs = []
        paths = sorted(self.directory.glob("*.wal"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            run = RecoveredRun(run_id="", path=path)
            with open(path, "rb") as f:
                unpacker = msgpack.Unpacker(f, raw=False)
                try:
                    for rec in unpacker:
                        t = rec.get("t")
                        run.run_id = rec.get("run_id", run.run_id)
                        if t == "start":
                            run.start = rec
                        elif t == "point":
                            run.points.append(rec)
                        elif t == "frame_ok":
                            run.frames_ok.add(int(rec["index"]))
                        elif t == "stop":
                            run.stop = rec
                except (msgpack.UnpackException, ValueError) as exc:
                    logger.warning("result log %s: torn tail ignored (%s)", path, exc)
            if run.run_id:
                runs.append(run)
            else:
                os.unlink(path)
        return runs
