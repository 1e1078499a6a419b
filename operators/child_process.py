"""Children that must not outlive the service: the embedded Tiled server, the re-clustering worker."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG).

    A child left running holds memory, a port or a catalog lock; a restarted service would meet it. Raises
    SystemExit when the parent is already gone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit("parent exited before the child started")
