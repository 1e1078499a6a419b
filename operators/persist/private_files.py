"""Files only their owner may read: the data directory (API key, catalog, every stored frame) and the key.

Created private (0700 / 0600), and an existing one that others can read is tightened and logged. One that
belongs to someone else cannot be changed: it is reported and used as it is (the start must not fail on it).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_FILE = "tiled-api-key"  # in the data directory: the embedded server's generated key


def make_private_dir(path: Path) -> None:
    """Create `path` readable by its owner only (0700), or tighten an existing one that others can read.

    The data directory holds the API key, the catalog and every stored frame.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(path, 0o700)


def _tighten(path: Path, private: int) -> None:
    """Give `path` mode `private` if other users have any access to it, and say so.

    One we do not own cannot be changed: it is reported and used as it is (the start must not fail on it).
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        path.chmod(private)
    except PermissionError:
        logger.warning(
            "%s is open to other users (mode %o); not ours to change: make it %o", path, mode, private
        )
        return
    logger.warning(
        "%s was open to other users (mode %o); made it private to its owner (%o)", path, mode, private
    )


def load_or_create_api_key(data_dir: Path, api_key: str | None = None) -> tuple[str, bool]:
    """The key to start the server with: the given one, else the one saved in `data_dir`, else a new one.

    Returns (key, generated). A generated key is saved in `data_dir / KEY_FILE` (mode 0600) so that a
    restart after a crash keeps the key that clients were given. A saved file that is empty (a crash
    while it was written by an older version) does not stop the start: a new key replaces it.
    """
    key_path = data_dir / KEY_FILE
    if api_key:
        return api_key, False
    if key_path.exists():
        _tighten(key_path, 0o600)
        key = key_path.read_text().strip()
        if key:
            return key, False
        logger.warning("%s is empty; generating a new API key", key_path)
    key = secrets.token_hex(16)
    # Written whole under another name, then renamed: a crash never leaves a half-written key file.
    partial = key_path.with_name(f"{KEY_FILE}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(key_path)
    return key, True
