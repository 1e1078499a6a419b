"""Children that must not outlive the service: the embedded Tiled server, the re-clustering worker."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


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


@contextlib.contextmanager
def interrupts_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while it starts a child, which inherits the blocked mask across exec.

    A terminal's Ctrl-C goes to the whole process group: a child still importing would die of it with a
    traceback. The service decides how its helpers stop (their pool's shutdown, or `die_with_parent`).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
