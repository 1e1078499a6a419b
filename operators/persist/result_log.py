"""The result log: each run's results, appended before they go to Tiled, so a SIGKILL loses no published row.

`TiledWriter.publish` appends each point (row fields + latent vector) here before it returns;
an unbuffered `write()` puts the record in the OS page cache, which survives the death of the
process (not a power cut: there is no fsync on the per-frame path). On start, the writer replays
every log left in the directory into Tiled, then deletes the log of each run that is closed. A log
that cannot be replayed is moved to ``unreplayable/`` beside the logs, where it is kept for a person.

One file per run, named after the run's storage key (operators.persist.keys). Format: concatenated
msgpack maps, one per record, dispatched on "t"; every record names "run_key" and the sender's "run_id":
  {"t": "start", "run_name", "started_at", "metadata"}
  {"t": "point", "row", "index", "x", "y", "cluster", "novelty", "timestamp", "tiled_url",
   "processing_time", "encode_time", "project_time", "stored_by_service", "latent": bytes}
  {"t": "frame_ok", "index"}   (the frame is in Tiled)
  {"t": "stop", "stopped_at", "num_frames", "processed", "reason"}
A torn last record (killed mid-write) is ignored. Logs written before run keys existed name only
"run_id", under which that version stored the run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
# On-disk names: earlier versions wrote result logs as results-log/<name>.wal (".wal": write-ahead log), and a
# data directory they left must still recover, so these names stay as they are.
DIR_NAME = "results-log"
_SUFFIX = ".wal"
SET_ASIDE_DIR = "unreplayable"


def _file_name(run_key: str) -> str:
    # Keys are safe names; the hex form only serves logs of older versions, named after raw run ids.
    return (run_key if not _SAFE.search(run_key) else "x" + run_key.encode().hex()) + _SUFFIX


@dataclass(slots=True)
class RecoveredRun:
    """What one log says about a run."""

    run_key: str
    run_id: str = ""
    start: dict[str, Any] | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    frames_ok: set[int] = field(default_factory=set)
    stop: dict[str, Any] | None = None
    path: Path | None = None


class ResultLog:
    """Append-only result logs, one file per run, under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._files: dict[str, Any] = {}
        self.logs_set_aside = 0  # since this process started

    def append(self, run_key: str, record: dict[str, Any]) -> None:
        f = self._files.get(run_key)
        if f is None:
            f = open(self.directory / _file_name(run_key), "ab", buffering=0)  # noqa: SIM115
            self._files[run_key] = f
        f.write(msgpack.packb(record, use_bin_type=True))

    def discard(self, run_key: str) -> None:
        """Everything of this run is in Tiled and the run is closed: drop its log."""
        f = self._files.pop(run_key, None)
        if f is not None:
            f.close()
        (self.directory / _file_name(run_key)).unlink(missing_ok=True)

    def set_aside(self, run_key: str) -> Path:
        """Keep this run's log, out of the way of recovery; returns where it went."""
        f = self._files.pop(run_key, None)
        if f is not None:
            f.close()
        return self._move_aside(self.directory / _file_name(run_key))

    def _move_aside(self, path: Path) -> Path:
        target_dir = self.directory / SET_ASIDE_DIR
        target_dir.mkdir(mode=0o700, exist_ok=True)
        target = target_dir / path.name
        n = 1
        while target.exists():  # never overwrite an earlier log set aside under the same name
            target = target_dir / f"{path.stem}.{n}{path.suffix}"
            n += 1
        shutil.move(path, target)
        self.logs_set_aside += 1
        return target

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def recover(self) -> list[RecoveredRun]:
        """Read every log in the directory (oldest first). A log that makes no sense is set aside."""
        runs = []
        paths = sorted(self.directory.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                run = _read(path)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                logger.error("result log %s cannot be read (%s: %s); moved to %s",
                             path, type(exc).__name__, exc, self._move_aside(path))  # fmt: skip
                continue
            if run.run_key:
                runs.append(run)
            elif path.stat().st_size == 0:
                os.unlink(path)
            else:
                logger.error("result log %s holds no record that can be read; moved to %s",
                             path, self._move_aside(path))  # fmt: skip
        return runs


_POINT_FIELDS = ("row", "index", "timestamp", "latent")


def _read(path: Path) -> RecoveredRun:
    """Raises (KeyError, TypeError, ValueError, AttributeError) on a record that makes no sense."""
    run = RecoveredRun(run_key="", path=path)
    for rec in _records(path):
        t = rec.get("t")
        run.run_id = str(rec.get("run_id", run.run_id))
        run.run_key = str(rec.get("run_key") or run.run_id)
        if t == "start":
            run.start = rec
        elif t == "point":
            if missing := [name for name in _POINT_FIELDS if name not in rec]:
                raise KeyError(f"a point record without {', '.join(missing)}")
            run.points.append(rec)
        elif t == "frame_ok":
            run.frames_ok.add(int(rec["index"]))
        elif t == "stop":
            run.stop = rec
    return run


def _records(path: Path) -> Iterator[Any]:
    with open(path, "rb") as f:
        try:
            yield from msgpack.Unpacker(f, raw=False)
        except (msgpack.UnpackException, msgpack.ExtraData) as exc:  # killed mid-write
            logger.warning("result log %s: torn tail ignored (%s)", path, exc)
