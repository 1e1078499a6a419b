"""The 2-D projection: umap-learn fitted on the reference latents, and a small MLP that approximates it.

Both see L2-normalised latents (the paper's setting: n_neighbors 30, min_dist 0.1, metric cosine).
The approximator (latent -> 2, no output activation, so negative coordinates survive unlike parametric
UMAP's ReLU-clipped export) is trained to reproduce the UMAP embedding of the reference latents, exported
to ONNX with the L2 normalisation and standardisation inside the graph, and is the serving default.
`umap.joblib` stays in the bundle for the reference pipeline; `UmapProjector` loads it only after the
bundle's checksum check.

Fitting needs torch and umap (imported inside the functions); serving needs only onnxruntime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

UMAP_SETTINGS: dict[str, Any] = {"n_neighbors": 30, "min_dist": 0.1, "metric": "cosine", "n_components": 2}
APPROX_ONNX = "projector.onnx"
UMAP_JOBLIB = "umap.joblib"


class Projector(Protocol):
    def project(self, latents: np.ndarray) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_umap(latents: np.ndarray, *, seed: int = 0) -> tuple[Any, np.ndarray]:
    """Fit umap-learn with the paper's settings on L2-normalised latents; returns (reducer, embedding)."""
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs/random_state notice
        reducer = umap.UMAP(**UMAP_SETTINGS, random_state=seed)
        emb = reducer.fit_transform(l2_normalise(latents))
    return reducer, emb.astype(np.float32)


@dataclass(frozen=True)
class ApproximatorFit:
    rmse: float  # on held-out reference points, in embedding units
    relative_rmse: float  # rmse / std of the embedding
    train_points: int
    heldout_points: int


def fit_approximator(
    latents: np.ndarray,
    embedding: np.ndarray,
    *,
    hidden: tuple[int, ...] = (256, 128),
    epochs: int = 400,
    seed: int = 0,
) -> tuple[Any, ApproximatorFit]:
    """Train the MLP latent -> 2 on (latents, UMAP embedding); returns (torch module, fit error)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x = l2_normalise(latents)
    y = np.asarray(embedding, np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, len(x) // 10)
    val, tr = order[:n_val], order[n_val:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    ymu, ysd = y[tr].mean(0), y[tr].std(0) + 1e-6

    class Approx(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mu", torch.from_numpy(mu))
            self.register_buffer("sd", torch.from_numpy(sd))
            self.register_buffer("ymu", torch.from_numpy(ymu))
            self.register_buffer("ysd", torch.from_numpy(ysd))
            layers: list[nn.Module] = []
            d = x.shape[1]
            for h in hidden:
                layers += [nn.Linear(d, h), nn.GELU()]
                d = h
            layers.append(nn.Linear(d, 2))  # no output activation: coordinates may be negative
            self.net = nn.Sequential(*layers)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            v = v / torch.clamp(torch.linalg.vector_norm(v, dim=-1, keepdim=True), min=1e-12)
            return self.net((v - self.mu) / self.sd) * self.ysd + self.ymu

    model = Approx()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    bs = 256
    tr_t = torch.from_numpy(tr)
    for _ in range(epochs):
        model.train()
        perm = tr_t[torch.randperm(len(tr_t))]
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            loss = (((model(xt[idx]) - yt[idx]) / torch.from_numpy(ysd)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(xt[torch.from_numpy(val)]).numpy()
    rmse = float(np.sqrt(((pred - y[val]) ** 2).sum(1).mean()))
    rel = rmse / float(np.sqrt((y.std(0) ** 2).sum()))
    fit = ApproximatorFit(rmse=rmse, relative_rmse=rel, train_points=len(tr), heldout_points=len(val))
    log.info("projection approximator: held-out rmse %.3f (%.1f%% of embedding spread)", rmse, 100 * rel)
    return model, fit


def export_approximator(model: Any, path: Path, latent_dim: int) -> Path:
    import contextlib
    import io
    import warnings

    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.onnx.export(
            model.eval(),
            (torch.randn(2, latent_dim),),
            str(path),
            input_names=["latent"],
            output_names=["xy"],
            dynamo=True,
            opset_version=18,
            external_data=False,
            dynamic_shapes={"v": {0: torch.export.Dim("batch", min=1, max=65536)}},
        )
    return Path(path)


class OnnxProjector:
    """Serving projector: the ONNX approximator. project((B, D)) -> (B, 2) float32."""

    def __init__(self, path: Path, *, session_options: Any = None) -> None:
        import onnxruntime as ort

        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = 1  # tiny MLP: threading costs more than it saves
            session_options.inter_op_num_threads = 1
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sess = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        self._in = self._sess.get_inputs()[0].name

    def project(self, latents: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(latents, np.float32)
        if x.ndim == 1:
            x = x[None]
        return self._sess.run(None, {self._in: x})[0].astype(np.float32, copy=False)


class UmapProjector:
    """The reference projection: umap-learn `transform` (an optimisation per call; warm it up)."""

    def __init__(self, reducer: Any) -> None:
        self._reducer = reducer

    def project(self, latents: np.ndarray) -> np.ndarray:
        import warnings

        x = l2_normalise(np.atleast_2d(latents))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._reducer.transform(x).astype(np.float32)
