"""Storage keys: the one place a sender's run id becomes a name in Tiled and on disk.

Run ids are sender data: they may hold "/", "%2F", newlines, hundreds of bytes, or repeat (resends,
hand-made ids). Used raw as Tiled keys and file names they made runs write into each other's nodes
and failed with ENAMETOOLONG. Every run therefore gets its own key at its start: a readable slug of
the id plus a random suffix, so that a reused id never reaches stored data of an earlier run. The
sender's id itself stays in the run's metadata and in every message clients get.
"""

from __future__ import annotations

import re
import secrets

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
SLUG_CHARS = 48  # of the run id kept in the key; the whole key stays far below any file-name limit
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_key(run_id: str) -> str:
    """A new storage key for a run whose sender calls it ``run_id``: ``<slug>-<8 hex>``, unique per call."""
    slug = _UNSAFE.sub("_", run_id).strip("_-")[:SLUG_CHARS].rstrip("_-") or "run"
    return f"{slug}-{secrets.token_hex(4)}"


def is_safe_key(text: str) -> bool:
    """Whether ``text`` can name a Tiled node and a file as it is (every `run_key` can).

    For keys this module did not make: result logs left by versions that stored runs under the raw id.
    """
    return _SAFE_KEY.fullmatch(text) is not None
