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
- A frame within reach of a regime joins it (its id). The reach is tau, or with `spread_factor` > 0 the
  regime's own: min(tau, max(spread_factor x its spread, the run's median step)), spread = an EMA of its
  members' distances to its centre (their plain mean until the EMA's weight is the larger). A tight phase
  then stops taking the frames of a ramp leaving it, which tau alone (set by the run's noisiest stretch) lets
  its centre follow into the next phase.
  Otherwise, if it lies inside a reference cluster (within one radius) that no regime of this run holds yet,
  it founds a regime at once (a known regime needs no further evidence; the run's first frame always does).
  Otherwise it is pending (cluster -1); once the last `new_min_points` pending frames agree (all within tau
  of their mean) they found a regime.
- A founded regime takes the id of the reference cluster it falls in (within `assign_factor` radii) if no
  other regime of this run holds that id yet; otherwise it gets the next new id, announced with
  is_new=True exactly once. Ids are never renumbered or merged.
- novelty = distance to the nearest reference cluster centre / its radius (<= ~1: a typical member).

Re-clustering the run (`recluster`), every `recluster_every` frames: HDBSCAN (scikit-learn) on the reduced
latents of the run so far (the last `recluster_window` frames) says which frames belong together by the structure
of the whole run, not by a centre that followed a ramp. With `still_factor` > 0 it clusters the still frames
only (`still_frames`: a ramp's frames chain the phases it joins and blur the split test below), then attaches
each moving frame to the cluster it lies within, if any (`attach_moving`). Its labels are mapped onto the ids
already given (`apply_labels`), never renumbering one:
- each existing id is owned by the density cluster that holds most of its frames;
- a density cluster whose frames mostly carry an id owned by another cluster is a phase that id's regime
  drifted into: it gets a new id (announced once, like a founded regime), and its frames move to it;
- frames of a cluster that carry an id owned by another cluster, or no id yet (pending), move to the
  cluster's id; frames of an id no cluster owns, and frames the density clustering calls noise, keep theirs,
  so two existing ids are never merged;
- the fast path's regime centres are reset to the recent members of each cluster, so the next frames follow.
The moves are kept as corrections (`corrections()`: new ids and (indices, clusters) since the last call),
for the pipeline to send as a `ClusterUpdate` after the points they correct.
Modes: "sync" (default, `learn_predict_one` re-clusters inline: deterministic, for evaluation and tests) or
"manual" (the caller re-clusters: the live pipeline runs `density_labels` in a worker process, because
HDBSCAN holds the GIL for tens of ms, then `apply_labels` in the clusterer's own thread).

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

from operators.projection import l2_normalise

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
    # A regime's reach from its own spread (see the module doc); 0 turns it off (the reach is tau). The default
    # bundle (cluster features) sets 3 with spread_weight 0.1, chosen on validation runs of both families
    # (operators.model.tune_clustering; README, "The default model").
    spread_factor: float = 0.0
    spread_weight: float = 0.1  # EMA weight of each member's distance in its regime's spread
    known_immediately: bool = True  # a frame inside an unclaimed reference cluster founds its regime at once
    # Re-clustering of the run (HDBSCAN on its reduced latents): frames between re-clusterings (sync mode; the
    # pipeline's worker when free). 0, the default, turns it off: with 3 and the settings below (chosen on
    # validation seeds, where the project's scenarios kept their ARIs), the held-out shear_alignment run
    # (seed 9001) fell from 0.98 to 0.76, a drifting phase split in two. Turn it on per bundle
    # ("recluster_every": 3 in the manifest's clustering settings) where that trade is wanted.
    recluster_every: int = 0
    recluster_min_frames: int = 12  # no re-clustering of a run shorter than this
    recluster_window: int = 2000  # the most recent frames a re-clustering sees (and corrections reach)
    run_min_cluster_size: int = 10  # HDBSCAN min_cluster_size on the run: the frames a phase needs to be a cluster
    run_min_samples: int = 3
    run_selection: str = "eom"  # HDBSCAN cluster_selection_method: "eom" (excess of mass) or "leaf" (finer)
    # a density cluster splits from the one that owns its id only when their centres lie this many times
    # their summed RMS spreads apart (the two halves of a uniform drift lie ~1.7 apart: 1.75 shattered a drifting
    # phase of the project's scenarios on validation seeds; see operators.model.tune_clustering)
    split_separation: float = 2.5
    # ... or this many when the density clustering left the frame just before the cluster's first frame out
    # (noise: a transition, such as a ramp, rather than one phase drifting on)
    split_separation_after_noise: float = 1.75
    # HDBSCAN cluster_selection_epsilon = this x tau: density clusters closer than that are not split apart,
    # so the noise of a drifting phase does not shatter it
    run_epsilon_factor: float = 1.0
    # Density-cluster the run's still frames only (`still_frames`), then let each moving frame join the
    # cluster it lies within (`attach_moving`): a ramp's frames otherwise chain the two phases it joins into
    # one cluster, or widen a cluster's spread until the split test cannot tell its phase from the next. A
    # frame is moving when the means of the `still_window` frames before and after it lie more than
    # `still_factor` quiet steps apart. 0 clusters every frame; the default bundle sets 3.5 (window 3, with
    # run_min_cluster_size 5), chosen on validation runs of both families (README, "The default model").
    still_factor: float = 0.0
    still_window: int = 3

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


@dataclass(frozen=True)
class Corrections:
    """What re-clustering changed since the last `corrections()` call.

    `new_clusters`: (cluster, index of its earliest frame) for each id founded by re-clustering, to announce
    before any message carries it; `indices`/`clusters`: frames already assigned whose id changed, with their
    id now (the latest wins when a frame moved twice).
    """

    new_clusters: tuple[tuple[int, int], ...] = ()
    indices: tuple[int, ...] = ()
    clusters: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.new_clusters or self.indices)


def still_frames(z: np.ndarray, window: int, factor: float) -> np.ndarray:
    """Which frames of a run are still (bool per frame): the means of the ``window`` frames before a frame and
    of it and the ``window - 1`` after it lie within ``factor`` quiet steps (the run's 25th-percentile
    frame-to-frame step: its noise, as long as a quarter of the run is not moving). On a ramp moving v per
    frame the two means lie ~window x v apart; on a plateau ~one step / sqrt(window). The first frame (nothing
    before it) and the newest ``window - 1`` (no whole window after them; the live one among them) are not
    judged: they count as still, so the newest frame is clustered as before."""
    z = np.asarray(z, np.float64)
    n = len(z)
    if n < 2 or factor <= 0:
        return np.ones(n, bool)
    quiet = float(np.quantile(np.sqrt((np.diff(z, axis=0) ** 2).sum(1)), 0.25))
    csum = np.concatenate([np.zeros((1, z.shape[1])), np.cumsum(z, 0)])
    t = np.arange(n)
    lo, hi = np.maximum(t - window, 0), np.minimum(t + window, n)
    before = (csum[t] - csum[lo]) / np.maximum(t - lo, 1)[:, None]
    after = (csum[hi] - csum[t]) / (hi - t)[:, None]
    moved = np.sqrt(((after - before) ** 2).sum(1))
    return (t < 1) | (hi - t < window) | (moved <= factor * quiet)


def attach_moving(z: np.ndarray, labels: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Labels with each moving frame in the cluster of its nearest clustered frame where it lies no farther
    from it than that cluster's longest nearest-member link (it would not have stretched the cluster), else
    noise."""
    from scipy.spatial import cKDTree

    labels = labels.copy()
    placed = np.flatnonzero(labels >= 0)
    todo = np.flatnonzero(moving)
    if not len(placed) or not len(todo):
        return labels
    link = np.zeros(int(labels.max()) + 1)
    for c in np.unique(labels[placed]):
        zc = z[labels == c]
        if len(zc) > 1:
            link[c] = cKDTree(zc).query(zc, k=2)[0][:, 1].max()
    gap, near = cKDTree(z[placed]).query(z[todo], k=1)
    nearest = labels[placed[near]]
    inside = gap <= link[nearest]
    labels[todo[inside]] = nearest[inside]
    return labels


def density_labels(z: np.ndarray, min_cluster_size: int, min_samples: int, epsilon: float,
                   selection: str = "eom", still_window: int = 3, still_factor: float = 0.0) -> np.ndarray:
    """HDBSCAN labels (-1 noise) of a run's reduced latents (of its still frames, the moving ones attached,
    where ``still_factor`` > 0); a plain function so a worker process can run it."""
    z = np.asarray(z, np.float64)
    if still_factor > 0:
        still = still_frames(z, still_window, still_factor)
        labels = np.full(len(z), -1, np.int64)
        labels[still] = density_labels(z[still], min_cluster_size, min_samples, epsilon, selection)
        return attach_moving(z, labels, ~still)
    from sklearn.cluster import HDBSCAN

    if len(z) < max(2, min_cluster_size):
        return np.full(len(z), -1, np.int64)
    def fit(eps: float) -> np.ndarray:
        hdb = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min(min_samples, len(z) - 1),
                      cluster_selection_epsilon=eps, cluster_selection_method=selection, copy=True)
        return hdb.fit_predict(z).astype(np.int64)

    try:
        return fit(float(epsilon))
    except TypeError:
        # scikit-learn 1.5-1.9: the epsilon search fails on some cluster trees ("only 0-dimensional arrays
        # can be converted"); the plain excess-of-mass selection still answers
        log.debug("HDBSCAN epsilon search failed; re-clustering without cluster_selection_epsilon")
        return fit(0.0)


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
        return (l2_normalise(latents) - self.mean) @ self.components.T

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
    reduction: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ClusterState, np.ndarray]:
    """Fit the reduction and the reference clusters; returns (state, labels) with labels in 0..k-1.

    ``reduction``: (mean, components) learned elsewhere (operators.model.fit_reduction) instead of a PCA of
    these latents. HDBSCAN noise points are attached to their nearest cluster so every reference point has an id.
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    settings = settings or ClusteringSettings()
    x = l2_normalise(latents)
    if reduction is None:
        d = min(settings.pca_dims, x.shape[0] - 1, x.shape[1])
        pca = PCA(n_components=d, random_state=seed).fit(x)
        mean, comps = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    else:
        mean, comps = (np.asarray(v, np.float32) for v in reduction)
        if comps.ndim != 2 or comps.shape[1] != x.shape[1] or mean.shape != (x.shape[1],):
            raise ValueError(f"a reduction of {x.shape[1]}-d latents needs mean ({x.shape[1]},) and components "
                             f"(d, {x.shape[1]}), not {mean.shape} and {comps.shape}")
        d = comps.shape[0]
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
    log.info("clustering fitted: %d reference clusters from %d latents (%s, %d dims)", len(centers), len(z),
             "PCA" if reduction is None else "given reduction", d)
    return state, lab


class OnlineClusterer:
    """Stable-id online clustering for one run; start a fresh one per run (`ModelBundle.new_clusterer`)."""

    def __init__(self, state: ClusterState, settings: ClusteringSettings | None = None, *,
                 mode: str = "sync") -> None:
        if mode not in ("sync", "manual"):
            raise ValueError(f"mode must be 'sync' or 'manual', not {mode!r}")
        self.mode = mode
        self.settings = s = settings or ClusteringSettings()
        self._state = state
        self._ref_centers = state.centers.astype(np.float32)
        self._ref_radii = state.radii.astype(np.float32)
        self.n_reference = len(self._ref_centers)
        scale = float(state.scale)
        self._floor, self._cap = s.floor_fraction * scale, s.cap_fraction * scale
        self._regimes: list[np.ndarray] = []  # centres, in the order founded
        self._regime_ids: list[int] = []
        # id -> (EMA of its members' distances to its regime centre, how many members it has had)
        self._spread: dict[int, tuple[float, int]] = {}
        self._next_id = self.n_reference
        self._steps: deque[float] = deque(maxlen=s.step_window)
        self._prev: np.ndarray | None = None
        self._pending: deque[np.ndarray] = deque(maxlen=s.pending_max)
        # the run so far (the last recluster_window frames, up to twice that before trimming)
        self._z: list[np.ndarray] = []
        self._ids: list[int] = []
        self._indices: list[int] = []
        self._seen = 0  # frames learned in this run
        self._last_recluster = 0  # self._seen at the last re-clustering
        self._fixes: dict[int, int] = {}  # index -> corrected id, since the last corrections()
        self._was: dict[int, int] = {}  # index -> its id before those corrections
        self._announce: list[tuple[int, int]] = []

    @property
    def n_clusters(self) -> int:
        """Ids known so far: the reference ones plus those founded in this run."""
        return self._next_id

    @property
    def tau(self) -> float:
        return self._tau(self._median_step())

    def _median_step(self) -> float:
        return float(np.median(self._steps)) if self._steps else 0.0

    def _tau(self, step: float) -> float:
        return float(min(max(self.settings.noise_factor * step, self._floor), self._cap))

    def _reach(self, cid: int, tau: float, step: float) -> float:
        if self.settings.spread_factor <= 0 or cid not in self._spread:  # no member yet: its founders said tau
            return tau
        return min(tau, max(self.settings.spread_factor * self._spread[cid][0], step))

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

    def learn_predict_one(self, features: np.ndarray, index: int | None = None) -> Assignment:
        """Assign one frame by its clustering input (the latent, or the bundle's cluster features; ``index``: its
        frame number, for corrections; default its position in the run)."""
        x = np.asarray(features, np.float32).reshape(1, -1)
        if x.shape[1] != self._state.mean.shape[0]:
            raise ValueError(f"this clustering was fitted on {self._state.mean.shape[0]}-d input, not {x.shape[1]}-d "
                             "(a bundle with cluster features clusters `ModelBundle.encode`'s features, not latents)")
        z = self._state.reduce(x)[0]
        a = self._assign(z)
        self._remember(z, a.cluster, self._seen if index is None else int(index))
        if self.mode == "sync" and self.recluster_due():
            self.recluster()
            now = self._ids[-1]
            if now != a.cluster:  # this frame's point is not sent yet: it carries its id now, no correction
                self._fixes.pop(self._indices[-1], None)
                self._was.pop(self._indices[-1], None)
                new = any(c == now for c, _ in self._announce)
                self._announce = [(c, i) for c, i in self._announce if c != now]
                a = Assignment(cluster=now, novelty=a.novelty, is_new=new)
        return a

    # -- the run so far, re-clustering, corrections ------------------------------------------------------

    def _remember(self, z: np.ndarray, cluster: int, index: int) -> None:
        self._z.append(z)
        self._ids.append(int(cluster))
        self._indices.append(index)
        self._seen += 1
        w = self.settings.recluster_window
        if len(self._z) > 2 * w:
            del self._z[:-w], self._ids[:-w], self._indices[:-w]

    def recluster_due(self) -> bool:
        s = self.settings
        return (s.recluster_every > 0 and self._seen >= s.recluster_min_frames
                and self._seen - self._last_recluster >= s.recluster_every)

    def snapshot(self) -> tuple[np.ndarray, int, float]:
        """(reduced latents of the window, the run's frame count then, HDBSCAN epsilon) for `density_labels`."""
        w = self.settings.recluster_window
        self._last_recluster = self._seen
        return np.stack(self._z[-w:]).astype(np.float32), self._seen, self.settings.run_epsilon_factor * self.tau

    def density_args(self, snapshot: tuple[np.ndarray, int, float]
                     ) -> tuple[np.ndarray, int, int, float, str, int, float]:
        z, _, eps = snapshot
        s = self.settings
        return (z, s.run_min_cluster_size, s.run_min_samples, eps, s.run_selection, s.still_window,
                s.still_factor)

    def recluster(self) -> None:
        """Re-cluster the run now, in this thread (deterministic)."""
        snap = self.snapshot()
        self.apply_labels(density_labels(*self.density_args(snap)), snap[1])

    def apply_labels(self, labels: np.ndarray, seen: int) -> None:
        """Map density labels of the window that ended at frame count ``seen`` onto stable ids (see module doc)."""
        labels = np.asarray(labels, np.int64)
        end = len(self._ids) - (self._seen - seen)  # list position just after the snapshot's last frame
        start = end - len(labels)
        if start < 0 or end <= 0:
            return  # the window was trimmed meanwhile: too old to apply
        ids = np.asarray(self._ids[start:end], np.int64)
        clusters = [int(c) for c in np.unique(labels) if c >= 0]
        if not clusters:
            return
        members = {c: np.flatnonzero(labels == c) for c in clusters}
        majority: dict[int, tuple[int, int]] = {}  # cluster -> (id, frames of it)
        for c in clusters:
            known = ids[members[c]]
            known = known[known >= 0]
            if len(known):
                vals, counts = np.unique(known, return_counts=True)
                j = int(counts.argmax())
                majority[c] = (int(vals[j]), int(counts[j]))
        # each id is owned by the cluster holding most of its frames (ties: the earlier cluster)
        owner_of: dict[int, int] = {}
        for c in sorted(majority, key=lambda c: (-majority[c][1], int(members[c][0]))):
            owner_of.setdefault(majority[c][0], c)
        cid_of: dict[int, int] = {c: m for m, c in owner_of.items()}
        zs = np.stack(self._z[start:end])
        for c in clusters:
            if c in cid_of or c not in majority:
                continue
            # compared with the cluster it continues from in time (a drifting phase is a chain of touching
            # clusters), or after a transition (noise) with the cluster that owns its id
            first = int(members[c][0])
            before = int(labels[first - 1]) if first > 0 else -1
            if before >= 0 and before != c:
                other, need = before, self.settings.split_separation
            else:
                other, need = owner_of[majority[c][0]], self.settings.split_separation_after_noise
            if _separation(zs[members[c]], zs[members[other]]) < need:
                cid_of[c] = majority[c][0]  # the same phase, drifting: not a split
        for c in sorted(clusters, key=lambda c: int(members[c][0])):
            if c not in cid_of and not _has_stretch(members[c], self.settings.new_min_points):
                clusters.remove(c)  # scattered frames (glitches) are not a phase: they keep their ids
            elif c not in cid_of:  # a phase its id's regime drifted into, or frames that fit no regime
                cid_of[c] = self._next_id
                self._next_id += 1
                self._announce.append((cid_of[c], self._indices[start + int(members[c][0])]))
                log.info("re-clustering founded cluster %d (%d frames)", cid_of[c], len(members[c]))
        owned = np.asarray(sorted(owner_of), np.int64)
        for c in clusters:
            cid = cid_of[c]
            old = ids[members[c]]
            for p in members[c][(old != cid) & ((old == PENDING) | np.isin(old, owned))]:
                index = self._indices[start + p]
                self._was.setdefault(index, int(ids[p]))  # the id its consumer has now
                self._ids[start + p] = cid
                self._fixes[index] = cid
                ids[p] = cid
        # the fast path follows: each id's regime centre at its most recent frames (whichever density cluster
        # they fell in: a drifting phase's centre stays where the phase is now, not where it was)
        recent = max(1, self.settings.new_min_points)
        for cid in sorted(set(cid_of.values())):
            mine = np.flatnonzero(ids == cid)[-recent:]
            if not len(mine):
                continue
            centre = zs[mine].mean(0).astype(np.float32)
            if cid in self._regime_ids:
                self._regimes[self._regime_ids.index(cid)] = centre
            else:
                self._regimes.append(centre)
                self._regime_ids.append(cid)

    def corrections(self) -> Corrections:
        """New ids and corrected (index, id) pairs since the last call (and forget them)."""
        was = self._was
        fixes = {i: c for i, c in self._fixes.items() if was.get(i) != c}  # moved and moved back: no news
        announce = self._announce
        self._fixes, self._was, self._announce = {}, {}, []
        return Corrections(tuple(announce), tuple(fixes), tuple(fixes.values()))

    def labels(self) -> np.ndarray:
        """Ids of the run's frames in the window now, corrections applied (for evaluation)."""
        return np.asarray(self._ids[-self.settings.recluster_window :], np.int64)

    def _assign(self, z: np.ndarray) -> Assignment:
        if self._prev is not None:
            self._steps.append(float(np.sqrt(((z - self._prev) ** 2).sum())))
        self._prev = z
        _, novelty = self._novelty(z)
        step = self._median_step()
        tau = self._tau(step)
        s = self.settings
        if self._regimes:
            d = np.sqrt(((np.stack(self._regimes) - z) ** 2).sum(1))
            j = int(d.argmin())
            cid, dist = self._regime_ids[j], float(d[j])
            if dist <= self._reach(cid, tau, step):
                self._regimes[j] += s.drift * (z - self._regimes[j])
                spread, n = self._spread.get(cid, (0.0, 0))
                # a plain mean of the first members, then the EMA: one far first member (a regime founded at
                # the end of a ramp) must not set the reach for the dozens of frames the EMA takes to forget it
                self._spread[cid] = (spread + max(s.spread_weight, 1.0 / (n + 1)) * (dist - spread), n + 1)
                self._pending.clear()
                return Assignment(cluster=cid, novelty=novelty, is_new=False)
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


def _separation(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two groups' centres over the sum of their RMS spreads."""
    ca, cb = a.mean(0), b.mean(0)
    spread = np.sqrt(((a - ca) ** 2).sum(1).mean()) + np.sqrt(((b - cb) ** 2).sum(1).mean())
    return float(np.linalg.norm(ca - cb) / max(spread, 1e-12))


def _has_stretch(positions: np.ndarray, n: int) -> bool:
    """Whether sorted positions include n consecutive ones."""
    if n <= 1:
        return len(positions) > 0
    breaks = np.flatnonzero(np.diff(positions) != 1)
    runs = np.diff(np.concatenate(([-1], breaks, [len(positions) - 1])))
    return bool(len(positions) and runs.max() >= n)


def settings_json(settings: ClusteringSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)
