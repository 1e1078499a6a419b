"""The reference pipeline: what the Latent Space Explorer's live operator does today, per frame.

Re-implemented from ../shared/notes/lse-live-mode.md, on the same frames and the same bundle as the service,
in the same process:

1. per-frame min-max scaling to uint8 (no mask), PIL resize to the model's input size (aspect squashed),
   back to float in [0, 1];
2. PyTorch eager forward at batch 1; the model returns ``(recon, mu, logvar)`` and the latent is ``mu``;
3. umap-learn ``transform`` on shape (1, latent_dim).

No batching, no clustering, nothing overlapped: each frame runs the three steps in sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.report import StageResult
from benchmarks.stats import LatencyStats
from benchmarks.timing import Budget

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReferenceTimes:
    preprocess: float
    encode: float
    project: float

    @property
    def total(self) -> float:
        return self.preprocess + self.encode + self.project


class ReferencePipeline:
    """Per-frame, batch-1, in-sequence processing as the LSE live operator does it.

    ``model`` is the eager torch module; its forward returns ``(recon, mu, logvar)`` (the full VAE, as the
    LSE calls it) or the latent means. ``latent_transform`` maps raw means to what the UMAP was fitted on
    (the bundle's L2 normalisation, if any), so both pipelines project the same thing.
    """

    def __init__(
        self,
        model: Any,
        umap_model: Any,
        input_size: int,
        latent_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.model = model.eval()
        self.umap_model = umap_model
        self.input_size = int(input_size)
        self.latent_transform = latent_transform

    def preprocess(self, image: np.ndarray) -> Any:
        from PIL import Image

        arr = image.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        u8 = (scaled * 255.0).astype(np.uint8)
        resized = Image.fromarray(u8).resize((self.input_size, self.input_size))
        x = np.asarray(resized, dtype=np.float32) / 255.0
        return self._torch.from_numpy(x)[None, None]

    def encode(self, x: Any) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(x)
        mu = out[1] if isinstance(out, tuple | list) else out
        return mu.numpy()

    def project(self, latent: np.ndarray) -> np.ndarray:
        if self.latent_transform is not None:
            latent = self.latent_transform(latent)
        return np.asarray(self.umap_model.transform(latent), dtype=np.float32)

    def process(self, image: np.ndarray) -> tuple[np.ndarray, ReferenceTimes]:
        t0 = time.perf_counter()
        x = self.preprocess(image)
        t1 = time.perf_counter()
        mu = self.encode(x)
        t2 = time.perf_counter()
        xy = self.project(mu)
        t3 = time.perf_counter()
        return xy[0], ReferenceTimes(t1 - t0, t2 - t1, t3 - t2)


@dataclass(slots=True)
class ReferenceResult:
    total: StageResult
    steps: list[StageResult]
    latencies_s: list[float]
    points: np.ndarray  # (n, 2), for a sanity comparison with the service's points


def run_reference(
    pipeline: ReferencePipeline, frames: Sequence[np.ndarray], budget: Budget
) -> ReferenceResult:
    """Process frames one after another (cycling) and time each step and the whole, after warm-up.

    The first umap-learn ``transform`` pays numba's JIT; it is part of the warm-up, as the LSE would pay it
    once per process (cold start is measured separately for the service).
    """
    for i in range(budget.warmup):
        pipeline.process(frames[i % len(frames)])
    times: list[ReferenceTimes] = []
    points: list[np.ndarray] = []
    deadline = time.perf_counter() + budget.max_seconds
    i = 0
    while len(times) < budget.iters:
        xy, t = pipeline.process(frames[i % len(frames)])
        times.append(t)
        points.append(xy)
        i += 1
        if len(times) >= budget.min_iters and time.perf_counter() > deadline:
            break
    totals = [t.total for t in times]
    steps = [
        StageResult(
            "reference preprocess (min-max uint8 + PIL resize)",
            LatencyStats.from_seconds([t.preprocess for t in times]),
        ),
        StageResult(
            "reference encode (torch eager, batch 1)", LatencyStats.from_seconds([t.encode for t in times])
        ),
        StageResult(
            "reference project (umap-learn transform, 1 point)",
            LatencyStats.from_seconds([t.project for t in times]),
        ),
    ]
    total = StageResult("reference total per frame", LatencyStats.from_seconds(totals))
    log.info("reference pipeline: %d frames, p50 %.1f ms", len(totals), total.stats.p50_ms)
    return ReferenceResult(total=total, steps=steps, latencies_s=totals, points=np.stack(points))
