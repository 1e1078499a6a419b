"""Training on from what was shipped: the encoder recovered from a bundle, the broad training family, the learned
clustering reduction and the encoder's contrastive fine-tune (issue 15's tools; operators.model).

What users of these tools rely on: a recovered encoder computes exactly what the bundle serves; a sibling state is
its state plus one feature, seen on the same detector and beam; a learned reduction keeps what tells phases apart
where PCA keeps drift; a fine-tune stopped part-way resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

BUNDLE = Path(__file__).resolve().parents[1] / "operators" / "bundles" / "default"


def test_the_encoder_recovered_from_a_bundle_reproduces_its_onnx_latents() -> None:
    from operators.model.recover import PARITY_RTOL, check_parity, recover_encoder

    model, manifest = recover_encoder(BUNDLE)
    assert check_parity(model, BUNDLE, manifest, seed=3) <= PARITY_RTOL


def test_a_broad_sibling_is_its_state_plus_one_feature_on_the_same_detector_and_beam() -> None:
    from stream.synthetic.broad import FEATURES, generate_sibling_pairs

    groups = list(generate_sibling_pairs(3, seed=5))
    assert len(groups) == 3
    for state_pair, sibling_pair in groups:
        frames = [*state_pair, *sibling_pair]
        assert len({f.image.shape for f in frames}) == 1, "one detector for the whole group"
        rows, cols = zip(*(f.geometry.beam_center for f in frames), strict=True)
        assert max(rows) - min(rows) <= 6 and max(cols) - min(cols) <= 6, "the beam wanders +-3 px, no more"
        state = set(filter(None, state_pair[0].phase_name.split("+")))
        sibling = set(filter(None, sibling_pair[0].phase_name.split("+")))
        assert state < sibling and len(sibling - state) == 1 and sibling <= set(FEATURES)
        assert not np.array_equal(state_pair[0].image, state_pair[1].image), "two views, two drifts"
    again = next(iter(generate_sibling_pairs(1, seed=5)))
    assert np.array_equal(again[1][0].image, groups[0][1][0].image), "a seed gives the same frames"


def test_a_siblings_feature_is_as_common_as_its_weight_asks() -> None:
    from stream.synthetic.broad import generate_sibling_pairs

    def added(**weights: int) -> list[tuple[set[str], str]]:  # (the state's features, the sibling's new one)
        out = []
        for state, sibling in generate_sibling_pairs(12, seed=9, weights=weights):
            has = set(filter(None, state[0].phase_name.split("+")))
            out.append((has, (set(sibling[0].phase_name.split("+")) - has).pop()))
        return out

    assert all(new != "spots" for _, new in added(spots=0))
    heavy = [new for has, new in added(spots=1000) if has & {"rings", "orders"}]  # where there are rings for spots
    assert heavy and all(new == "spots" for new in heavy)
    orders = [new for has, new in added(spots=0, orders=1000) if "orders" not in has]
    assert orders and all(new == "orders" for new in orders)
    with pytest.raises(ValueError, match="weights"):
        next(generate_sibling_pairs(1, weights={"spots": -1}))
    with pytest.raises(ValueError, match="weights"):
        next(generate_sibling_pairs(1, weights={"sparkles": 2}))


def _pairs(rng: np.random.Generator, groups: int, dims: int = 16):
    """Latent pairs where views differ by a large drift along dims 0-1 and siblings by a small step along dim 5."""
    from operators.model.fit_reduction import PairLatents

    base = rng.normal(0, 1, (groups, 1, 1, dims)) * 0.05
    drift = np.zeros((groups, 2, 2, dims))
    drift[..., :2] = rng.normal(0, 1.0, (groups, 2, 2, 2))
    feature = np.zeros((groups, 2, 1, dims))
    feature[:, 1, :, 5] = 0.3
    noise = rng.normal(0, 0.01, (groups, 2, 2, dims))
    broad = (base + drift + feature + noise + 3.0 * np.eye(dims)[7]).astype(np.float32)
    project = broad[:, 0].copy()
    return PairLatents(broad, project, np.arange(groups))


def test_a_learned_reduction_keeps_the_feature_where_pca_keeps_the_drift() -> None:
    from operators.model.fit_reduction import ReductionSettings, learn_reduction, pca_start, score_pairs

    rng = np.random.default_rng(0)
    train, val = _pairs(rng, 400), _pairs(rng, 100)
    settings = ReductionSettings(dims=2, steps=300, groups_per_batch=16, project_per_batch=8, lr=3e-2)
    pca = score_pairs(val, *pca_start(train.all_latents(), 2, 0))
    learned = score_pairs(val, *learn_reduction(train, settings))
    assert pca.sibling_over_view < 1.0, "PCA's two dimensions are the drift's"
    assert learned.sibling_over_view > 3.0, f"the learned reduction keeps the feature ({learned})"


def test_the_clustering_takes_a_given_reduction_as_it_is() -> None:
    from operators.clustering import ClusteringSettings, fit_clustering

    rng = np.random.default_rng(1)
    latents = rng.normal(0, 1, (200, 12)).astype(np.float32)
    mean, comps = np.zeros(12, np.float32), np.eye(12, dtype=np.float32)[:3] * 2.0
    state, _ = fit_clustering(latents, ClusteringSettings(), reduction=(mean, comps))
    assert np.array_equal(state.components, comps) and np.array_equal(state.mean, mean)
    with pytest.raises(ValueError, match="reduction of 12-d latents"):
        fit_clustering(latents, ClusteringSettings(), reduction=(mean, comps[:, :5]))


def test_a_contrastive_fine_tune_stopped_part_way_resumes_where_it_stopped(tmp_path: Path) -> None:
    import torch

    from operators.bundle import ModelBundle
    from operators.model.contrast_tune import TuneSettings, tune
    from operators.model.metric_data import build
    from operators.model.recover import recover_encoder

    bundle = ModelBundle.load(BUNDLE)
    data = tmp_path / "pairs"
    build(bundle, data, broad_groups=2, project_pairs=2, seed=4, images=True)
    model, _ = recover_encoder(BUNDLE)
    init = tmp_path / "recovered.pt"
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, init)
    settings = TuneSettings(init=str(init), data=[str(data)], out=str(tmp_path / "run"), steps=2, groups=1,
                            project=1, ckpt_every=1, threads=1)
    tune(settings)
    first = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert first["step"] == 2
    assert first["extra"]["history"][0]["anchor"] < 1e-8, "the first step starts from the recovered encoder"
    settings.steps, settings.resume = 3, True
    tune(settings)
    resumed = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == 3
    assert [h["step"] for h in resumed["extra"]["history"]] == [1, 2, 3]
    assert resumed["extra"]["history"][:2] == first["extra"]["history"]
