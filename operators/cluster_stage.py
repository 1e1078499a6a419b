"""The live pipeline's clustering stage: the online per-frame assignment and the run's re-clustering worker.

The per-frame assignment stays in the compute thread; the run's re-clustering (HDBSCAN, which holds the GIL for
tens of ms) runs in one worker process (``recluster="process"``), niced and busy at most `WORKER_DUTY`, never
delaying a point; ``"sync"`` re-clusters inline (deterministic, for tests); ``"off"`` not at all.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from operators.base import BatchStage
from operators.child_process import die_with_parent, interrupts_blocked
from operators.clustering import Corrections, density_labels
from operators.stages import Work

log = logging.getLogger(__name__)


class ClusterStage(BatchStage[Work]):
    """Online clustering of each frame's clustering input (the latent, or the bundle's cluster features); one
    clusterer per run. Learning is sequential by nature.

    Touched by the compute thread only. With a worker (``recluster="process"``) the clusterer is in manual
    mode: `step` applies the worker's labels when they are back and sends it the next snapshot when one is due.
    """

    name, reject_reason = "cluster", "cluster_error"
    batchable = False  # a retry would learn the same frames twice

    def __init__(self, bundle: Any, recluster: str = "process") -> None:
        if recluster not in ("process", "sync", "off"):
            raise ValueError(f"recluster must be 'process', 'sync' or 'off', not {recluster!r}")
        self.bundle = bundle
        self.recluster = recluster
        self.clusterer: Any = None
        self._pool: ProcessPoolExecutor | None = None
        self._job: tuple[Any, Future[Any], int] | None = None  # (clusterer, labels future, its frame count)
        self._next_start = 0.0  # no job before this perf_counter: the worker is busy at most WORKER_DUTY
        self.retry_in: float | None = None  # a re-clustering is due but waits this many seconds (duty cycle)
        self._stopped = False  # the run stopped: nothing more to re-cluster until the next one

    def reset(self) -> None:
        self.clusterer = self.bundle.new_clusterer()
        self._job = None  # a re-clustering of the previous run is of no use any more
        self._stopped = False
        if self.recluster != "sync":  # the worker re-clusters ("process"), or nothing does ("off")
            self.clusterer.mode = "manual"
        if (self.recluster == "process" and self._pool is None
                and getattr(self.clusterer.settings, "recluster_every", 0)):
            try:  # start the worker (and its imports) now, before the run's frames need it
                self._submit(np.zeros((2, 2), np.float32), 2, 1, 0.0)
            except Exception:
                log.exception("could not start the re-clustering worker")
                self._close_pool()

    def process_many(self, items: Sequence[Work]) -> None:
        if self.clusterer is None:
            self.reset()
        for work in items:
            x = work.latent if work.features is None else work.features
            work.assignment = self.clusterer.learn_predict_one(x, index=work.frame.index)

    @property
    def job_running(self) -> Future[Any] | None:
        """The re-clustering sent and not applied yet (it may have finished already)."""
        return self._job[1] if self._job is not None else None

    def step(self) -> Corrections:
        """Apply a finished re-clustering, start the next if due; what the run's ids changed since last time."""
        cl = self.clusterer
        if cl is None or self._stopped:
            return Corrections()
        if self.recluster == "process":
            if self._job is not None and self._job[1].done():
                owner, fut, seen = self._job
                self._job = None
                try:
                    labels, seconds = fut.result()
                    self._next_start = time.perf_counter() + seconds * (1 / WORKER_DUTY - 1)
                except Exception:  # a broken worker loses this re-clustering, not the run
                    log.exception("re-clustering failed")
                    self._close_pool()
                else:
                    if owner is cl:
                        cl.apply_labels(labels, seen)
            self.retry_in = None
            due = self._job is None and cl.recluster_due()
            if due and time.perf_counter() < self._next_start:
                self.retry_in = self._next_start - time.perf_counter()
            elif due:
                snap = cl.snapshot()
                try:
                    fut = self._submit(*cl.density_args(snap))
                except Exception:
                    log.exception("could not start a re-clustering")
                    self._close_pool()
                else:
                    self._job = (cl, fut, snap[1])
        return cl.corrections()

    def drop_job(self) -> None:
        """The run stopped: a re-clustering running or due is of no use any more."""
        self._job, self.retry_in, self._stopped = None, None, True

    def _submit(self, *args: Any) -> Future[Any]:
        """A re-clustering to the worker; a submit may start the worker process (spawn), which must not take
        the terminal's Ctrl-C meant for the service."""
        pool = self._worker()  # outside the block: starting multiprocessing's resource tracker unblocks SIGINT
        with interrupts_blocked():
            return pool.submit(_timed_density_labels, *args)

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the compute thread and the event loop live in this process; a fork would copy their locks
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(os.getpid(),))
        return self._pool

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._job = None
        self._close_pool()


WORKER_DUTY = 0.25  # the re-clustering worker is busy at most this fraction of the time (the cores are shared)
WORKER_NICENESS = 10  # and yields the CPU to the compute thread


def _timed_density_labels(*args: Any) -> tuple[np.ndarray, float]:
    """In the worker: the labels and the seconds HDBSCAN took (not counting the wait for the worker)."""
    t0 = time.perf_counter()
    labels = density_labels(*args)
    return labels, time.perf_counter() - t0


def _worker_init(service_pid: int) -> None:
    """In the re-clustering worker: gone with the service (even SIGKILLed), low priority, one BLAS thread."""
    die_with_parent(service_pid)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    try:  # scikit-learn's own dependency
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)
