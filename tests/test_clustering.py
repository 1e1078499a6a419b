"""Online clustering: stable ids, new regimes announced once, state round trip without pickle."""

from __future__ import annotations

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
