"""Online clustering: stable ids, new regimes announced once, state round trip without pickle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from operators.clustering import PENDING, ClusteringSettings, ClusterState, OnlineClusterer, fit_clustering

DIM = 512


def _blob(rng: np.random.Generator, center: np.ndarray, n: int, scale: float = 0.05) -> np.ndarray:
    return center + scale * rng.standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture()
def regimes() -> tuple[np.random.Generator, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    centers = [rng.standard_normal(DIM).astype(np.float32) for _ in range(4)]
    return rng, centers


@pytest.fixture()
def fitted(regimes):
    rng, centers = regimes
    ref = np.concatenate([_blob(rng, c, 150) for c in centers[:3]])  # regime 3 is unseen at fit time
    state, labels = fit_clustering(ref, ClusteringSettings(pca_dims=8), min_cluster_size=30)
    return state, labels


def test_reference_clusters_get_ids_0_to_k_minus_1(fitted) -> None:
    state, labels = fitted
    assert state.centers.shape[0] == 3
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    # each reference regime maps to exactly one id
    assert [len(set(labels[i * 150 : (i + 1) * 150].tolist())) for i in range(3)] == [1, 1, 1]


def test_known_regimes_keep_their_fitted_ids_and_never_announce_new(fitted, regimes) -> None:
    rng, centers = regimes
    state, labels = fitted
    expected = {k: int(labels[k * 150]) for k in range(3)}
    cl = OnlineClusterer(state, ClusteringSettings(pca_dims=8))
    for k in (2, 0, 1, 2, 0):
        for z in _blob(rng, centers[k], 20):
            a = cl.learn_predict_one(z)
            assert a.cluster == expected[k]
            assert not a.is_new
            assert 0.0 <= a.novelty <= 1.5
    assert cl.n_clusters == 3


def test_a_new_regime_creates_one_new_id_announced_exactly_once(fitted, regimes) -> None:
    rng, centers = regimes
    state, labels = fitted
    settings = ClusteringSettings(pca_dims=8, new_min_points=5)
    cl = OnlineClusterer(state, settings)
    for z in _blob(rng, centers[0], 10):
        cl.learn_predict_one(z)
    out = [cl.learn_predict_one(z) for z in _blob(rng, centers[3], 40)]
    new = [a for a in out if a.is_new]
    assert len(new) == 1 and new[0].cluster == 3
    first = out.index(new[0])
    assert first == settings.new_min_points - 1  # founded as soon as enough frames agree
    assert all(a.cluster == PENDING for a in out[:first])
    assert all(a.cluster == 3 and not a.is_new for a in out[first + 1 :])
    assert all(a.novelty > settings.assign_factor for a in out[:first])
    # going back to a known regime reuses its old id: nothing was renumbered
    back = [cl.learn_predict_one(z) for z in _blob(rng, centers[0], 5)]
    assert {a.cluster for a in back} == {int(labels[0])}
    assert cl.n_clusters == 4


def test_isolated_outlier_frames_stay_pending_and_found_nothing(fitted, regimes) -> None:
    rng, centers = regimes
    state, labels = fitted
    cl = OnlineClusterer(state, ClusteringSettings(pca_dims=8))
    out = []
    for i, z in enumerate(_blob(rng, centers[1], 40)):
        if i % 4 == 3:
            z = rng.standard_normal(DIM).astype(np.float32) * 3  # a glitch frame
        out.append(cl.learn_predict_one(z))
    glitches = out[3::4]
    assert all(a.cluster == PENDING and not a.is_new for a in glitches)
    assert {a.cluster for i, a in enumerate(out) if i % 4 != 3} == {int(labels[150])}
    assert cl.n_clusters == 3


def test_two_regimes_inside_one_reference_cluster_get_two_ids(fitted, regimes) -> None:
    # a run's own noise sets the resolution: a shift far beyond it is a new regime, even when the
    # coarse reference cluster would cover both
    rng, centers = regimes
    state, labels = fitted
    cl = OnlineClusterer(state, ClusteringSettings(pca_dims=8))
    shifted = centers[0] + 0.12 * np.linalg.norm(centers[0]) * state.components[0] / np.linalg.norm(state.components[0])
    first = [cl.learn_predict_one(z) for z in _blob(rng, centers[0], 20, scale=0.02)]
    second = [cl.learn_predict_one(z) for z in _blob(rng, shifted, 20, scale=0.02)]
    assert {a.cluster for a in first} == {int(labels[0])}
    ids = {a.cluster for a in second[3:]}
    assert len(ids) == 1 and ids.isdisjoint({int(labels[0])})
    assert sum(a.is_new for a in first + second) == 1


def test_state_round_trips_through_npz_without_pickle(fitted, regimes, tmp_path) -> None:
    rng, centers = regimes
    state, _ = fitted
    path = state.save(tmp_path / "clustering.npz")
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"mean", "components", "centers", "radii", "counts", "scale"}
    loaded = ClusterState.load(path)
    zs = _blob(rng, centers[1], 10)
    a = [OnlineClusterer(state).learn_predict_one(z) for z in zs]
    b = [OnlineClusterer(loaded).learn_predict_one(z) for z in zs]
    assert a == b


def test_fresh_clusterers_do_not_share_state(fitted, regimes) -> None:
    rng, centers = regimes
    state, _ = fitted
    one = OnlineClusterer(state, ClusteringSettings(pca_dims=8, new_min_points=5))
    for z in _blob(rng, centers[3], 10):
        one.learn_predict_one(z)
    assert one.n_clusters == 4
    assert OnlineClusterer(state, ClusteringSettings(pca_dims=8)).n_clusters == 3


RECLUSTER = ClusteringSettings(pca_dims=8, recluster_every=3)  # re-clustering is off unless a bundle turns it on


def _ramp_run(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, n_a: int = 40, ramp: int = 20,
              n_b: int = 40, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Phase a, a linear ramp of `ramp` frames into phase b, phase b; (latents, phase per frame)."""
    t = np.concatenate([np.zeros(n_a), np.linspace(0, 1, ramp + 2)[1:-1], np.ones(n_b)]).astype(np.float32)
    lat = a[None] + t[:, None] * (b - a)[None] + noise * rng.standard_normal((len(t), DIM)).astype(np.float32)
    phase = np.concatenate([np.zeros(n_a + ramp // 2, int), np.ones(len(t) - n_a - ramp // 2, int)])
    return lat.astype(np.float32), phase


@pytest.fixture()
def ramp(fitted, regimes):
    rng, centers = regimes
    state, _ = fitted
    # phase b: phase a moved inside the same reference cluster, far beyond the run's noise
    b = centers[0] + 0.15 * np.linalg.norm(centers[0]) * state.components[1] / np.linalg.norm(state.components[1])
    return _ramp_run(rng, centers[0], b)


def test_a_ramp_between_two_phases_merges_in_the_drifting_centre_but_re_clustering_splits_it(fitted, ramp) -> None:
    from sklearn.metrics import adjusted_rand_score

    state, _ = fitted
    lat, phase = ramp
    old = OnlineClusterer(state, ClusteringSettings(pca_dims=8, recluster_every=0))
    old_ids = [old.learn_predict_one(z).cluster for z in lat]
    assert len(set(old_ids[-30:]) | set(old_ids[:30])) == 1  # the EMA centre followed the ramp: one id

    cl = OnlineClusterer(state, RECLUSTER)
    out = [cl.learn_predict_one(z) for z in lat]
    first_id = out[0].cluster
    assert {a.cluster for a in out[:40]} == {first_id}  # phase a keeps its id: nothing renumbered
    tail = {a.cluster for a in out[-30:]}
    assert len(tail) == 1 and first_id not in tail  # phase b's frames get their own id, live
    b_id = tail.pop()
    announced = [a for a in out if a.is_new]
    corr = cl.corrections()
    assert [c for c, _ in corr.new_clusters] + [a.cluster for a in announced] == [b_id]
    final = cl.labels()
    plateau = np.r_[0:40, 60:100]  # the ramp's frames (40..59) belong to neither phase, as evaluate scores it
    assert adjusted_rand_score(phase[plateau], final[plateau]) == 1.0
    assert adjusted_rand_score(phase[plateau], np.asarray(old_ids)[plateau]) == 0.0
    # corrections only moved points between the two phases' ids (or from none yet), and say what they hold now
    for i, c in zip(corr.indices, corr.clusters, strict=True):
        assert c in (first_id, b_id) and c != out[i].cluster and out[i].cluster in (first_id, b_id, PENDING)
        assert final[i] == c


def test_ids_are_never_renumbered_only_moved_to_a_new_or_owning_id(fitted, ramp, regimes) -> None:
    rng, centers = regimes
    state, labels = fitted
    lat, _ = ramp
    # a, ramp, b, then back to a and on to a known regime
    lat = np.concatenate([lat, _blob(rng, centers[0], 20, 0.01), _blob(rng, centers[2], 20, 0.01)])
    cl = OnlineClusterer(state, RECLUSTER)
    sent: dict[int, int] = {}
    announced: set[int] = set(range(cl.n_reference))
    for i, z in enumerate(lat):
        a = cl.learn_predict_one(z)
        if a.is_new:
            assert a.cluster not in announced
            announced.add(a.cluster)
        assert a.cluster == PENDING or a.cluster in announced
        sent[i] = a.cluster
        corr = cl.corrections()
        for c, _ in corr.new_clusters:
            assert c not in announced
            announced.add(c)
        for j, c in zip(corr.indices, corr.clusters, strict=True):
            assert j < i and c in announced and c != sent[j]
            sent[j] = c
    final = cl.labels()
    assert [sent[i] for i in range(len(lat))] == final.tolist()
    # every id that was ever given still names frames: nothing was merged away
    assert {c for c in sent.values() if c >= 0} == announced & set(final.tolist())
    assert final[-20:].tolist() == [int(labels[300])] * 20


def test_sync_re_clustering_is_deterministic(fitted, ramp) -> None:
    state, _ = fitted
    lat, _ = ramp
    runs = []
    for _ in range(2):
        cl = OnlineClusterer(state, RECLUSTER)
        runs.append(([cl.learn_predict_one(z) for z in lat], cl.corrections()))
    assert runs[0] == runs[1]


def test_manual_mode_re_clusters_only_when_asked_and_applies_late_labels(fitted, ramp) -> None:
    from operators.clustering import density_labels

    state, _ = fitted
    lat, _ = ramp
    cl = OnlineClusterer(state, RECLUSTER, mode="manual")
    for z in lat[:80]:
        cl.learn_predict_one(z, index=1000 + len(cl.labels()))
    assert not cl.corrections() and cl.recluster_due()
    snap = cl.snapshot()
    for z in lat[80:]:  # frames keep coming while a worker clusters the snapshot
        cl.learn_predict_one(z, index=1000 + len(cl.labels()))
    cl.apply_labels(density_labels(*cl.density_args(snap)), snap[1])
    corr = cl.corrections()
    assert len(corr.new_clusters) == 1 and corr.indices
    assert all(1000 <= i < 1080 for i in corr.indices)  # frame numbers, inside the snapshot only


SPREAD = ClusteringSettings(pca_dims=8, recluster_every=0, spread_factor=2.0)  # a regime's reach from its spread


def test_a_tight_phase_does_not_follow_a_ramp_into_the_next_with_a_reach_from_its_own_spread(fitted, ramp) -> None:
    from sklearn.metrics import adjusted_rand_score

    state, _ = fitted
    lat, phase = ramp
    cl = OnlineClusterer(state, SPREAD)  # no re-clustering: the live ids alone
    out = [cl.learn_predict_one(z) for z in lat]
    first_id = out[0].cluster
    assert {a.cluster for a in out[:40]} == {first_id}
    tail = {a.cluster for a in out[-30:]}
    assert len(tail) == 1 and first_id not in tail  # phase b has its own id, as it is sent
    assert [a.cluster for a in out if a.is_new] == list(tail)  # announced once
    plateau = np.r_[0:40, 60:100]
    assert adjusted_rand_score(phase[plateau], np.asarray([a.cluster for a in out])[plateau]) == 1.0


def test_a_phase_drifting_steadily_keeps_one_id_with_a_reach_from_its_own_spread(fitted, regimes) -> None:
    rng, centers = regimes
    state, _ = fitted
    # one phase moving at a constant pace, as far in all as the ramp above, over 100 frames
    far = centers[0] + 0.15 * np.linalg.norm(centers[0]) * state.components[1] / np.linalg.norm(state.components[1])
    t = np.linspace(0, 1, 100, dtype=np.float32)[:, None]
    lat = centers[0] + t * (far - centers[0]) + 0.05 * rng.standard_normal((100, DIM)).astype(np.float32)
    cl = OnlineClusterer(state, SPREAD)
    assert len({cl.learn_predict_one(z).cluster for z in lat}) == 1


def test_one_far_first_member_does_not_widen_a_regimes_reach_for_long(fitted, regimes) -> None:
    _, centers = regimes
    state, _ = fitted
    axes = state.components / np.linalg.norm(state.components, axis=1, keepdims=True)
    phase = centers[3] / np.linalg.norm(centers[3])  # a phase no reference cluster holds

    def at(*offsets: float) -> np.ndarray:  # a frame of that phase, moved along the clustering's first axes
        return (phase + sum(o * axes[k] for k, o in enumerate(offsets))).astype(np.float32)

    cl = OnlineClusterer(state, replace(SPREAD, spread_weight=0.05))
    cid = cl.learn_predict_one(at()).cluster
    assert cl.learn_predict_one(at(0.2)).cluster == cid  # its first member arrives from afar (a ramp's end)
    for i in range(12):  # then the phase settles, its frames about 0.03 from the centre
        assert cl.learn_predict_one(at(0, 0.01 * (-1) ** i, 0.01 * (-1) ** (i // 2))).cluster == cid
    # a frame 0.1 away: within reach had the spread's EMA started at the far member (0.95^12, about half of it,
    # would still be there), beyond it now that the first members count equally
    assert cl.learn_predict_one(at(0, 0, 0, 0.1)).cluster == PENDING


def test_without_a_spread_factor_the_reach_is_tau_as_before(fitted, ramp) -> None:
    state, _ = fitted
    lat, _ = ramp
    ids = []
    for settings in (ClusteringSettings(pca_dims=8), ClusteringSettings(pca_dims=8, spread_factor=0.0,
                                                                          spread_weight=0.5)):
        cl = OnlineClusterer(state, settings)
        ids.append([cl.learn_predict_one(z).cluster for z in lat])
    assert ids[0] == ids[1]


STILL = replace(RECLUSTER, run_min_cluster_size=6, still_factor=3.0)  # re-cluster the still frames only


def _phases_run(points: list[np.ndarray], plateaus: list[int], ramp: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Plateaus of these lengths at `points` joined by ramps; (latents, phase per frame, -1 on a ramp)."""
    segments, phase = [], []
    for k, p in enumerate(points):
        if k:
            t = np.linspace(0, 1, ramp + 2, dtype=np.float32)[1:-1, None]
            segments.append(points[k - 1] + t * (p - points[k - 1]))
            phase += [-1] * ramp
        segments.append(np.repeat(p[None], plateaus[k], 0))
        phase += [k] * plateaus[k]
    lat = np.concatenate(segments) + 0.02 * np.random.default_rng(seed).standard_normal((len(phase), DIM))
    return lat.astype(np.float32), np.asarray(phase)


def test_still_frames_are_the_plateaus_and_a_ramp_between_them_is_moving(fitted, regimes) -> None:
    from operators.clustering import still_frames

    _, centers = regimes
    state, _ = fitted
    far = centers[1]
    lat, _ = _phases_run([centers[0], far], [20, 20], ramp=10, seed=0)
    still = still_frames(state.reduce(lat), 3, 3.0)
    assert not still[23:27].any()  # the ramp's middle (frames 20..29)
    assert still[:17].all() and still[33:].all()  # the plateaus, a window away from the ramp
    # the newest frames have no whole window after them: not judged yet, so a run's live frame is clustered
    assert still_frames(state.reduce(lat[:25]), 3, 3.0)[-2:].all()
    assert still_frames(state.reduce(lat), 3, 0.0).all()  # factor 0: every frame is clustered


def test_re_clustering_still_frames_tells_a_phase_from_an_earlier_one_it_resembles(fitted, regimes) -> None:
    from sklearn.metrics import adjusted_rand_score

    _, centers = regimes
    state, _ = fitted
    axes = state.components / np.linalg.norm(state.components, axis=1, keepdims=True)
    size = np.linalg.norm(centers[0])
    # phase a; a ramp to phase b; a ramp to a', which is phase a plus a feature (a sibling: near a, not a)
    a, b = centers[0], centers[0] + 0.1 * size * axes[1]
    sibling = a + 0.03 * size * axes[2]
    perfect = {}
    for name, settings in (("all frames", replace(STILL, still_factor=0.0)), ("still frames", STILL)):
        scores = []
        for seed in range(10):
            lat, phase = _phases_run([a, b, sibling], [15, 12, 15], ramp=12, seed=seed)
            cl = OnlineClusterer(state, settings)
            for z in lat:
                cl.learn_predict_one(z)
            plateau = phase >= 0
            scores.append(adjusted_rand_score(phase[plateau], cl.labels()[plateau]))
        perfect[name] = sum(s == 1.0 for s in scores)
    # the ramps' frames no longer chain a' to a, nor widen a's cluster until the split test cannot see a'
    assert perfect["still frames"] >= 9 and perfect["all frames"] <= 4


def test_density_labels_of_still_frames_leave_a_ramps_middle_out_and_attach_its_ends(fitted, regimes) -> None:
    from operators.clustering import density_labels, still_frames

    _, centers = regimes
    state, _ = fitted
    lat, _ = _phases_run([centers[0], centers[1]], [20, 20], ramp=10, seed=0)
    z = state.reduce(lat)
    labels = density_labels(z, 6, 3, 0.0, "eom", 3, 3.0)
    assert len(set(labels[:20])) == 1 and len(set(labels[33:])) == 1 and labels[0] != labels[-1] >= 0
    assert (labels[23:27] == -1).all()  # mid-ramp: far from both phases
    moving = ~still_frames(z, 3, 3.0)
    near_a = np.flatnonzero(moving[:20])  # plateau frames judged moving because the ramp is in their window
    assert len(near_a) and (labels[near_a] == labels[0]).all()
