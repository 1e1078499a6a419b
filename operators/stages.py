"""The live pipeline's compute stages on a batch of frames: preprocess, encode, project (one job each).

Each stage fills its own field of every `Work` item; a stage that raises for a batch is retried per frame by
`operators.base.run_isolated`, so one bad frame is rejected alone. Used in process by `operators.pipeline` and
on workers by `operators.workers.compute`.

With device preprocessing (`bundle.frame_encoder`, operators.device_preprocess) the preprocess stage only checks
each frame and the encode stage feeds the raw frames to the fused session: the `preprocess` time is then the
checks alone and the preprocessing itself is counted in `encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.base import BatchStage
from operators.device_preprocess import check_frame
from operators.messages import Frame, StageTimings


class NonFiniteOutput(ValueError):
    """A model stage produced NaN/inf for a frame."""


@dataclass(slots=True)
class Work:
    """One frame on its way through the compute stages; each stage fills its own field."""

    frame: Frame
    slot: int  # row of the batch buffer this frame's tensor lives in
    tensor: np.ndarray | None = None  # (1, S, S) float32, a view on that row
    latent: np.ndarray | None = None  # (latent_dim,) float32
    features: np.ndarray | None = None  # the bundle's cluster features; None: the clusterer takes the latent
    xy: np.ndarray | None = None  # (2,) float32
    assignment: Any = None  # the clusterer's Assignment(cluster, novelty, is_new)
    timings: StageTimings = field(default_factory=StageTimings)


class PreprocessStage(BatchStage[Work]):
    """Preprocesses each frame straight into its row of one reused (max_batch, 1, S, S) buffer."""

    name, reject_reason = "preprocess", "preprocess_error"

    def __init__(self, bundle: Any, batch_buffer: np.ndarray) -> None:
        self.bundle = bundle
        self.buffer = batch_buffer

    def process_many(self, items: Sequence[Work]) -> None:
        for work in items:
            if self.bundle.frame_encoder is not None:  # preprocessed in the encoder's session: reject here alone
                check_frame(work.frame.image)
            else:
                work.tensor = self.bundle.preprocessor(work.frame.image, out=self.buffer[work.slot])


class EncodeStage(BatchStage[Work]):
    name, reject_reason = "encode", "encode_error"

    def __init__(self, bundle: Any, batch_buffer: np.ndarray) -> None:
        self.bundle = bundle
        self.buffer = batch_buffer

    def process_many(self, items: Sequence[Work]) -> None:
        n = len(items)
        if self.bundle.frame_encoder is not None:
            latents, features = self.bundle.frame_encoder.encode_frames([w.frame.image for w in items])
        else:
            if all(work.slot == i for i, work in enumerate(items)):
                batch = self.buffer[:n]  # the usual case: the batch is already contiguous, no copy
            else:  # some frames were rejected earlier in this batch
                batch = np.stack([w.tensor for w in items])
            latents, features = self.bundle.encode(batch)
        if latents.shape != (len(items), self.bundle.latent_dim) or len(features) != len(items):
            raise ValueError(f"encoder returned {latents.shape} and features {features.shape} for a batch of "
                             f"{len(items)}")
        if not (np.isfinite(latents).all() and np.isfinite(features).all()):
            raise NonFiniteOutput("latent or cluster features contain NaN or inf")
        own_features = features is not latents
        for work, latent, feature in zip(items, latents, features, strict=True):
            work.latent, work.features = latent, (feature if own_features else None)


class ProjectStage(BatchStage[Work]):
    name, reject_reason = "project", "project_error"

    def __init__(self, bundle: Any) -> None:
        self.bundle = bundle

    def process_many(self, items: Sequence[Work]) -> None:
        xy = np.asarray(self.bundle.projector.project(np.stack([w.latent for w in items])), dtype=np.float32)
        if xy.shape != (len(items), 2):
            raise ValueError(f"projector returned {xy.shape} for a batch of {len(items)}")
        if not np.isfinite(xy).all():
            raise NonFiniteOutput("2-D point contains NaN or inf")
        for work, point in zip(items, xy, strict=True):
            work.xy = point
