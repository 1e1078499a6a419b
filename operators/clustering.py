"""Online clustering of latent means with stable cluster ids.

Where clustering happens: in a clustering reduction of the latent, not in the 2-D display map. Latents are
L2-normalised (as for the UMAP fit) and projected with a PCA fitted at fit time (stored as plain arrays).

Fit time (`fit_clustering`): HDBSCAN (the paper's choice) on the reduced reference latents gives the
reference clusters, ids 0..k-1, each with a centre and a radius (a high quantile of its members' distances);
the reference `scale` (median distance between reference points) sets the resolution floor.

Run time (`OnlineClusterer.learn_predict_one`), one frame at a time, in order:
- The run's regimes are groups of frames within `tau` of a centre that follows slow drift (EMA).
  `tau = clip(noise_factor x median frame-to-frame step of this run, floor, cap)`: the run's own noise
  decides what counts as the same regime, so two phases that one coarse reference cluster covers are
  still told apart, and a noisy run is not shattered.
- A frame within tau of a regime joins it (its id). Otherwise, if it lies inside a reference cluster
  (within one radius) that no regime of this run holds yet, it founds a regime at once (a known regime
  needs no further evidence; the run's first frame always does). Otherwise it is pending (cluster -1);
  once the last `new_min_points` pending frames agree (all within tau of their mean) they found a regime.
- A founded regime takes the id of the reference cluster it falls in (within `assign_factor` radii) if no
  other regime of this run holds that id yet; otherwise it gets the next new id, announced with
  is_new=True exactly once. Ids are never renumbered or merged.
- novelty = distance to the nearest reference cluster centre / its radius (<= ~1: a typical member).

Why not river's DBSTREAM: its macro-cluster ids shift on every recluster and predict_one never says "new"
(see the runtime-facts note), so the stable-id and novelty logic would have to be written anyway; on top of
fitted reference clusters that logic alone is the whole algorithm, deterministic and ~20 us per frame.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PENDING = -1  # cluster id of a frame that fits no cluster yet


@dataclass(frozen=True)
class ClusteringSettings:
    pca_dims: int = 32
    radius_quantile: float = 0.95  # member-distance quantile that defines a reference cluster's radius
    assign_factor: float = 1.5  # a founded regime takes a reference id within this many radii
    noise_factor: float = 10.0  # tau = noise_factor x the run's median frame-to-frame step ...
    floor_fraction: float = 0.01  # ... but at least this fraction of the reference scale
    cap_fraction: float = 0.25  # ... and at most this fraction
    new_min_points: int = 3  # pending frames that must agree to found a regime
    pending_max: int = 64  # bound of the pending buffer (oldest dropped)
    # EMA weight pulling a regime's centre towards each new member. A run moving steadily at v per frame
    # lags its centre by v (1 - drift) / drift, so a regime only splits when v > noise_factor x drift /
    # (1 - drift) x the median step (2.5x here): a gradual phase change (film formation's dispersion ->
    # aggregation) is followed, not split. Lower drift splits it sooner but shatters drifting phases
    # (shear alignment); see operators.model.tune_clustering for the validation sweep.
    drift: float = 0.2
    step_window: int = 64  # frame-to-frame steps kept for the noise estimate
    known_immediately: bool = True  # a frame inside an unclaimed reference cluster founds its regime at once

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClusteringSettings:
        return cls(**d)


@dataclass(frozen=True)
class Assignment:
    cluster: int
    novelty: float
    is_new: bool


@dataclass
class ClusterState:
    """The fitted clustering: the reduction (mean, components) and the reference clusters."""

    mean: np.ndarray  # (D,) float32
    components: np.ndarray  # (d, D) float32
    centers: np.ndarray  # (k, d) float32
    radii: np.ndarray  # (k,) float32
    counts: np.ndarray  # (k,) int64 members at fit time
    scale: np.ndarray  # () float32: median distance between reference points in the reduced space

    STATE_FILE = "clustering.npz"

    def reduce(self, latents: np.ndarray) -> np.ndarray:
        x = np.asarray(latents, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return (x - self.mean) @ self.components.T

    def save(self, path: Path) -> Path:
        np.savez(path, mean=self.mean, components=self.components, centers=self.centers,
                 radii=self.radii, counts=self.counts, scale=self.scale)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in ("mean", "components", "centers", "radii", "counts", "scale")})


def fit_clustering(
    latents: np.ndarray,
    settings: ClusteringSettings | None = None,
    *,
    min_cluster_size: int | None = None,
    seed: int = 0,
) -> tuple[ClusterState, np.ndarray]:
    """Fit the reduction and the reference clusters; returns (state, labels) with labels in 0..k-1.

    HDBSCAN noise points are attached to their nearest cluster so every reference point has an id.
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    settings = settings or ClusteringSettings()
    x = np.asarray(latents, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    d = min(settings.pca_dims, x.shape[0] - 1, x.shape[1])
    pca = PCA(n_components=d, random_state=seed).fit(x)
    mean = pca.mean_.astype(np.float32)
    comps = pca.components_.astype(np.float32)
    z = (x - mean) @ comps.T
    mcs = min_cluster_size or max(10, len(z) // 50)
    labels = HDBSCAN(min_cluster_size=mcs, min_samples=min(10, mcs), copy=True).fit_predict(z)
    ids = sorted(set(labels.tolist()) - {-1})
    if not ids:  # all noise: one cluster
        labels = np.zeros(len(z), np.int64)
        ids = [0]
    centers = np.stack([z[labels == i].mean(0) for i in ids]).astype(np.float32)
    remap = {old: new for new, old in enumerate(ids)}
    lab = np.array([remap.get(int(v), -1) for v in labels], np.int64)
    noise = lab < 0
    if noise.any():
        dist = np.linalg.norm(z[noise, None, :] - centers[None], axis=-1)
        lab[noise] = dist.argmin(1)
    radii = []
    for k in range(len(centers)):
        dk = np.linalg.norm(z[lab == k] - centers[k], axis=1)
        radii.append(np.quantile(dk, settings.radius_quantile) if len(dk) > 1 else 0.0)
    radii_arr = np.asarray(radii, np.float32)
    floor = 0.25 * float(np.median(radii_arr[radii_arr > 0])) if (radii_arr > 0).any() else 1e-3
    radii_arr = np.maximum(radii_arr, floor)
    counts = np.bincount(lab, minlength=len(centers)).astype(np.int64)
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(z), size=(min(20000, len(z) * 10), 2))
    scale = np.float32(np.median(np.linalg.norm(z[pairs[:, 0]] - z[pairs[:, 1]], axis=1)))
    state = ClusterState(mean=mean, components=comps, centers=centers, radii=radii_arr, counts=counts,
                         scale=np.asarray(scale, np.float32))
    log.info("clustering fitted: %d reference clusters from %d latents (pca %d dims)", len(centers), len(z), d)
    return state, lab


class OnlineClusterer:
    """Stable-id online clustering for one run; start a fresh one per run (`ModelBundle.new_clusterer`)."""

    def __init__(self, state: ClusterState, settings: ClusteringSettings | None = None) -> None:
        self.settings = s = settings or ClusteringSettings()
        self._state = state
        self._ref_centers = state.centers.astype(np.float32)
        self._ref_radii = state.radii.astype(np.float32)
        self.n_reference = len(self._ref_centers)
        scale = float(state.scale)
        self._floor, self._cap = s.floor_fraction * scale, s.cap_fraction * scale
        self._regimes: list[np.ndarray] = []  # centres, in the order founded
        self._regime_ids: list[int] = []
        self._next_id = self.n_reference
        self._steps: deque[float] = deque(maxlen=s.step_window)
        self._prev: np.ndarray | None = None
        self._pending: deque[np.ndarray] = deque(maxlen=s.pending_max)

    @property
    def n_clusters(self) -> int:
        """Ids known so far: the reference ones plus those founded in this run."""
        return self._next_id

    @property
    def tau(self) -> float:
        if not self._steps:
            return self._floor
        return float(min(max(self.settings.noise_factor * float(np.median(self._steps)), self._floor), self._cap))

    def _novelty(self, z: np.ndarray) -> tuple[int, float]:
        if not self.n_reference:
            return PENDING, float("inf")
        rel = np.sqrt(((self._ref_centers - z) ** 2).sum(1)) / self._ref_radii
        k = int(rel.argmin())
        return k, float(rel[k])

    def _unclaimed_reference(self, z: np.ndarray) -> bool:
        k, rel = self._novelty(z)
        return k != PENDING and rel <= 1.0 and k not in self._regime_ids

    def _found(self, center: np.ndarray) -> tuple[int, bool]:
        k, rel = self._novelty(center)
        if k != PENDING and rel <= self.settings.assign_factor and k not in self._regime_ids:
            cid, new = k, False
        else:
            cid, new = self._next_id, True
            self._next_id += 1
        self._regimes.append(center.astype(np.float32).copy())
        self._regime_ids.append(cid)
        return cid, new

    def learn_predict_one(self, latent: np.ndarray) -> Assignment:
        z = self._state.reduce(np.asarray(latent, np.float32).reshape(1, -1))[0]
        if self._prev is not None:
            self._steps.append(float(np.sqrt(((z - self._prev) ** 2).sum())))
        self._prev = z
        _, novelty = self._novelty(z)
        tau = self.tau
        s = self.settings
        if self._regimes:
            d = np.sqrt(((np.stack(self._regimes) - z) ** 2).sum(1))
            j = int(d.argmin())
            if d[j] <= tau:
                self._regimes[j] += s.drift * (z - self._regimes[j])
                self._pending.clear()
                return Assignment(cluster=self._regime_ids[j], novelty=novelty, is_new=False)
        if not self._regimes or (s.known_immediately and self._unclaimed_reference(z)):
            # the run's first frame, or a frame well inside a reference cluster no regime holds yet:
            # a known regime needs no evidence to be named
            self._pending.clear()
            cid, new = self._found(z)
            return Assignment(cluster=cid, novelty=novelty, is_new=new)
        self._pending.append(z)
        if len(self._pending) >= s.new_min_points:
            recent = np.stack(list(self._pending)[-s.new_min_points :])
            center = recent.mean(0)
            if bool((np.sqrt(((recent - center) ** 2).sum(1)) <= tau).all()):
                self._pending.clear()
                cid, new = self._found(center)
                if new:
                    log.info("new cluster %d founded (novelty %.2f, tau %.4f)", cid, novelty, tau)
                return Assignment(cluster=cid, novelty=novelty, is_new=new)
        return Assignment(cluster=PENDING, novelty=novelty, is_new=False)


def settings_json(settings: ClusteringSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)
