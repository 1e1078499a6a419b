"""One worker's compute, without Ray: frames in, compact results out (2-D point, latent, stage timings).

The stages are the in-process pipeline's own (operators.pipeline), each isolated per frame: a frame that fails
a stage comes back as a `Computed` with the stage's reject reason, the others as points. Clustering is not
here: it is per run, in order, in the service (operators.workers.sequencer).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.base import BatchStage, run_isolated
from operators.bundle import ModelBundle
from operators.messages import Frame
from operators.pipeline import EncodeStage, NonFiniteOutput, PreprocessStage, ProjectStage, Work

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Computed:
    """What a worker sends back for one frame: small (~2.5 KiB with a 512-d latent and 128-d cluster features),
    never the frame."""

    index: int
    xy: np.ndarray | None  # (2,) float32; None when rejected
    latent: np.ndarray | None  # (latent_dim,) float32; None when rejected
    features: np.ndarray | None  # the bundle's cluster features; None: rejected, or the clusterer takes the latent
    preprocess_s: float = 0.0
    encode_s: float = 0.0
    project_s: float = 0.0
    reject_reason: str | None = None  # the stage's reason (e.g. "encode_error", "non_finite_output")
    error: str = ""  # the exception, for the service's log


class FrameCompute:
    """Preprocess -> encode -> project for a batch of frames, with the bundle loaded once.

    ``device``: "cpu", "cuda" or "auto" (operators.bundle.execution_providers); ``device_preprocess``: "auto"
    (on where the encoder runs on a GPU), "on" or "off" (operators.providers.preprocess_on_device).
    """

    def __init__(self, bundle_path: str | Path | None, *, runtime: str = "onnx", device: str = "auto",
                 max_batch: int = 4, threads: int | None = None, device_preprocess: str = "auto") -> None:
        self.bundle = ModelBundle.load(bundle_path, runtime, device=device, intra_op_threads=threads,
                                       device_preprocess=device_preprocess)
        self.bundle.warmup()
        self.max_batch = max_batch
        size = self.bundle.preprocessor.spec.size
        self._buffer = np.zeros((max_batch, 1, size, size), np.float32)
        self._stages: tuple[BatchStage[Work], ...] = (
            PreprocessStage(self.bundle, self._buffer),
            EncodeStage(self.bundle, self._buffer),
            ProjectStage(self.bundle),
        )

    @property
    def device(self) -> str:
        """Where the encoder runs: "cuda", "tensorrt" or "cpu" (after any fallback)."""
        return getattr(self.bundle.encoder, "device", "cpu")

    def compute(self, indices: list[int], images: list[np.ndarray]) -> list[Computed]:
        """Results for every frame, in the order given (rejected ones included)."""
        if len(indices) != len(images) or not 0 < len(images) <= self.max_batch:
            raise ValueError(f"a batch of 1..{self.max_batch} frames with one index each, not "
                             f"{len(indices)} indices and {len(images)} images")
        rejected: dict[int, Computed] = {}

        def reject(work: Work, stage: BatchStage[Work], exc: BaseException) -> None:
            reason = "non_finite_output" if isinstance(exc, NonFiniteOutput) else stage.reject_reason
            rejected[work.slot] = Computed(work.frame.index, None, None, None, reject_reason=reason, error=repr(exc))

        items = [Work(_bare_frame(i, img), slot) for slot, (i, img) in enumerate(zip(indices, images, strict=True))]
        for stage in self._stages:
            t0 = time.perf_counter()
            items = run_isolated(stage, items, reject)
            elapsed = time.perf_counter() - t0
            for work in items:
                setattr(work.timings, stage.name, elapsed)
        done = {
            w.slot: Computed(w.frame.index, np.asarray(w.xy, np.float32), np.array(w.latent, np.float32),
                             None if w.features is None else np.array(w.features, np.float32),
                             w.timings.preprocess, w.timings.encode, w.timings.project)
            for w in items
        }
        return [done.get(slot) or rejected[slot] for slot in range(len(indices))]


def _bare_frame(index: int, image: np.ndarray) -> Frame:
    """The stages read a frame's image and index only; the run's identity stays in the service."""
    return Frame("", run_key="", index=index, image=image, tiled_url="", received_at=0.0, received_perf=0.0)


def worker_info(compute: FrameCompute, node: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "node": node, "device": compute.device}
