"""The offline clustering bound: a whole run clustered at once in its own PCA, by latent and by pixels."""

from __future__ import annotations

import numpy as np
import pytest

from operators.model.clustering_bound import bound_labels, bound_row, separability, standardised, summary
from operators.model.evaluate import pooled_pixels
from operators.model.tune_clustering import encode_runs
from stream.synthetic import generate_scan


def test_pixel_features_ignore_flux_and_offset() -> None:
    frames = np.random.default_rng(0).random((5, 8, 8))
    assert np.allclose(standardised(frames * 7.5 + 3.0), standardised(frames))
    assert standardised(frames).shape == (5, 64)


def test_two_phases_joined_by_a_ramp_get_two_labels_and_no_frame_is_left_unlabelled() -> None:
    rng = np.random.default_rng(1)
    a, b = np.zeros(16), np.r_[np.ones(4) * 3.0, np.zeros(12)]
    ramp = [a + (b - a) * t for t in np.linspace(0.1, 0.9, 12)]
    run = np.vstack([np.tile(a, (40, 1)), ramp, np.tile(b, (40, 1))]) + rng.normal(0, 0.1, (92, 16))
    labels = bound_labels(run)
    assert len(set(labels[:40])) == 1 and len(set(labels[-40:])) == 1 and labels[0] != labels[-1]
    assert (labels >= 0).all()  # a noise frame takes the label of the one before it


def test_separability_counts_phases_a_space_holds_apart_whatever_bridges_them() -> None:
    rng = np.random.default_rng(2)
    centres = np.eye(4, 16) * 3.0
    phases = np.repeat([0, -1, 1, -1, 2, -1, 3], 10)  # ramps (-1) are left out
    apart = centres[np.maximum(phases, 0)] + rng.normal(0, 0.1, (70, 16))
    assert separability(apart, phases) == pytest.approx(1.0)
    merged = apart.copy()
    merged[phases == 3] = centres[2] + rng.normal(0, 0.1, (10, 16))  # the last phase looks like the one before
    assert separability(merged, phases) < 0.9


def test_the_bound_follows_a_real_project_run_in_both_spaces(default_bundle) -> None:
    run = encode_runs(default_bundle, ("crystallization",), (7001,), 120, keep_pixels=True)[0]
    row = bound_row(run)
    assert (row.family, row.scenario, row.seed) == ("project", "crystallization", 7001)
    assert row.ari["served"] >= 0.9 and row.ari["pixels"] >= 0.9
    assert row.separable["served"] >= 0.9 and row.separable["pixels"] >= 0.9
    s = summary([row])
    assert s["project/served/ari"]["runs"] == 1
    assert s["project/pixels/separable"]["worst"] == pytest.approx(row.separable["pixels"])


def test_a_cluster_embedding_learns_to_pair_views_resumes_and_scores_a_run(default_bundle, tmp_path) -> None:
    pytest.importorskip("torch")
    from operators.model.cluster_embedding import Embedding, EmbeddingSettings, train_embedding
    from operators.model.metric_data import build

    data = tmp_path / "pairs"
    build(default_bundle, data, broad_groups=3, project_pairs=3, seed=4, images=True)
    def settings(out: str, **kw) -> EmbeddingSettings:
        return EmbeddingSettings(data=[str(data)], out=str(tmp_path / out), steps=40, groups=3, project=3,
                                 ckpt_every=10, threads=1, **kw)

    whole = settings("whole")
    ckpt = train_embedding(whole)
    loss = whole.history
    assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5]), f"the views learn to find each other ({loss})"
    train_embedding(settings("sittings", stop_at=25))
    resumed = settings("sittings", resume=True)
    train_embedding(resumed)
    assert resumed.history == pytest.approx(loss, rel=1e-4), "two sittings train as one run"
    spots = settings("spots", pool="mean+max")  # each block's maximum beside its mean: two input channels
    assert Embedding.load(train_embedding(spots)).pool == ("mean", "max")
    assert np.mean(spots.history[-5:]) < 0.5 * np.mean(spots.history[:5]), f"it learns too ({spots.history})"

    run = encode_runs(default_bundle, ("crystallization",), (7001,), 24, keep_pixels=True)[0]
    features = Embedding.load(ckpt)(run.pixels)
    assert features.shape == (24, 8 * whole.width)
    row = bound_row(run, Embedding.load(ckpt))
    assert set(row.ari) == set(row.separable) == {"served", "pixels", "embedding"}

    from operators.model.embedding_clustering import compare
    from operators.model.tune_clustering import encode_independent_runs, score_independent
    from stream.independent import VALIDATION_SEEDS

    independent = encode_independent_runs(default_bundle, (VALIDATION_SEEDS[0],), 60, keep_pixels=True)[0]
    shipped = default_bundle.clustering_settings
    latent, embedded = compare(default_bundle, Embedding.load(ckpt), [run, independent], [shipped], 40)
    assert (latent.space, embedded.space) == ("served", "embedding")
    served = score_independent(default_bundle.clustering_state, shipped, independent)
    assert latent.independent_mean == pytest.approx(served["ari"]), "the latent row is the clustering as served"
    assert latent.phases_after_a_ramp == embedded.phases_after_a_ramp == len(served["lags"]) - 1
    assert 0.0 <= embedded.project_worst <= embedded.project_mean <= 1.0


def test_kept_pixels_are_the_pooled_preprocessed_frames(default_bundle) -> None:
    run = encode_runs(default_bundle, ("crystallization",), (7001,), 2, keep_pixels=True)[0]
    first = next(iter(generate_scan("crystallization", 2, seed=7001)))
    size = default_bundle.input_size
    image = np.empty((1, size, size), np.float32)
    default_bundle.preprocessor(first.image, out=image)
    assert run.pixels.shape == (2, size // 4, size // 4)
    assert np.allclose(run.pixels[0], pooled_pixels(image[0], 4))


def test_a_run_encoded_without_its_pixels_is_refused(default_bundle) -> None:
    run = encode_runs(default_bundle, ("crystallization",), (7001,), 2)[0]
    with pytest.raises(ValueError, match="keep_pixels"):
        bound_row(run)
