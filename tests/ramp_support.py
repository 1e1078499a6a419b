"""A two-phase run joined by a ramp, in a synthetic latent space, and a bundle whose clusterer sees it.

The drifting-centre clustering keeps both phases in one id; the run's re-clustering splits the second phase
off (tests/test_clustering.py). `ScriptedBundle` serves the real bundle's preprocessor, encoder and projector,
but its clusterers replace each frame's latent with the scripted one for that frame number, so the pipeline,
the bridge and the writer meet a real split through their real code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators.clustering import ClusteringSettings, ClusterState, OnlineClusterer, fit_clustering

DIM = 512
SETTINGS = ClusteringSettings(pca_dims=8, recluster_every=3)


def ramp_run(n_a: int = 40, ramp: int = 20, n_b: int = 40, seed: int = 0
             ) -> tuple[ClusterState, np.ndarray, np.ndarray]:
    """(fitted state, latents of the run in frame order, phase per frame)."""
    rng = np.random.default_rng(seed)
    centers = [rng.standard_normal(DIM).astype(np.float32) for _ in range(3)]
    ref = np.concatenate([c + 0.05 * rng.standard_normal((150, DIM)).astype(np.float32) for c in centers])
    state, _ = fit_clustering(ref, SETTINGS, min_cluster_size=30)
    a = centers[0]
    b = a + 0.1 * np.linalg.norm(a) * state.components[1] / np.linalg.norm(state.components[1])
    t = np.concatenate([np.zeros(n_a), np.linspace(0, 1, ramp + 2)[1:-1], np.ones(n_b)]).astype(np.float32)
    noise = 0.05
    lat = a[None] + t[:, None] * (b - a)[None] + noise * rng.standard_normal((len(t), DIM)).astype(np.float32)
    phase = np.concatenate([np.zeros(n_a + ramp // 2, int), np.ones(len(t) - n_a - ramp // 2, int)])
    return state, lat.astype(np.float32), phase


class ScriptedClusterer(OnlineClusterer):
    def __init__(self, state: ClusterState, script: np.ndarray) -> None:
        super().__init__(state, SETTINGS)
        self.script = script

    def learn_predict_one(self, features: np.ndarray, index: int | None = None) -> Any:
        assert index is not None
        return super().learn_predict_one(self.script[index % len(self.script)], index)


class ScriptedBundle:
    """The real bundle, but each run's clusterer sees the scripted latents (by frame number)."""

    def __init__(self, bundle: Any, state: ClusterState, script: np.ndarray) -> None:
        self._bundle, self._state, self._script = bundle, state, script
        self.clusterers: list[ScriptedClusterer] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bundle, name)

    def new_clusterer(self) -> ScriptedClusterer:
        self.clusterers.append(ScriptedClusterer(self._state, self._script))
        return self.clusterers[-1]
