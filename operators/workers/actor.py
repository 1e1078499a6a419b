"""The Ray actor: one worker process holding the model, computing the batches the service sends it.

Frames reach it as numpy arrays in Ray's object store (put there by the service; read in place on the same
node); it returns `Computed` results only. Imported by operators.workers.pool alone (it needs Ray).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from operators.workers.compute import Computed, FrameCompute, worker_info

log = logging.getLogger(__name__)


class FrameWorker:
    """Made a Ray actor by `pool.RayWorkerPool` (with its restart policy, CPUs and GPUs)."""

    def __init__(self, bundle_path: str | None, runtime: str, device: str, max_batch: int, threads: int,
                 device_preprocess: str = "auto") -> None:
        self._compute = FrameCompute(bundle_path, runtime=runtime, device=device, max_batch=max_batch,
                                     threads=threads, device_preprocess=device_preprocess)
        self._node = ray.get_runtime_context().get_node_id()

    def info(self) -> dict[str, Any]:
        """pid, Ray node id and device: the service asks once the worker is up (and after each restart)."""
        return worker_info(self._compute, self._node)

    def compute(self, indices: list[int], images: list[np.ndarray]) -> list[Computed]:
        return self._compute.compute(indices, images)
