"""Clustering tuning: a replayed setting scores exactly what evaluate scores, and held-out seeds stay held out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from operators.model.evaluate import HELDOUT_SEEDS, evaluate_run
from operators.model.tune_clustering import encode_runs, grid, sweep

FRAMES = 24


def test_replayed_settings_score_what_evaluate_scores(default_bundle) -> None:
    runs = encode_runs(default_bundle, ("crystallization",), (7001,), FRAMES)
    shipped = default_bundle.clustering_settings
    other = replace(shipped, drift=shipped.drift / 2, noise_factor=shipped.noise_factor * 2)
    rows = sweep(default_bundle.clustering_state, runs, [shipped, other])
    assert {tuple(sorted(r.settings.items())) for r in rows} == {
        tuple(sorted(shipped.to_dict().items())), tuple(sorted(other.to_dict().items()))}
    row = next(r for r in rows if r.settings == shipped.to_dict())
    evaluated = evaluate_run(default_bundle, "crystallization", 7001, FRAMES)
    assert row.ari["crystallization/7001"] == pytest.approx(evaluated.ari)
    assert rows[0].mean_ari >= rows[1].mean_ari


def test_tuning_refuses_heldout_seeds(default_bundle) -> None:
    with pytest.raises(ValueError, match="held out"):
        encode_runs(default_bundle, ("crystallization",), (HELDOUT_SEEDS[0],), FRAMES)


def test_grid_varies_only_drift_and_noise_factor(default_bundle) -> None:
    base = default_bundle.clustering_settings
    cands = grid(base, [0.1, 0.2], [10.0, 12.0, 14.0])
    assert len(cands) == 6
    assert {(c.drift, c.noise_factor) for c in cands} == {(d, n) for d in (0.1, 0.2) for n in (10.0, 12.0, 14.0)}
    assert all(replace(c, drift=base.drift, noise_factor=base.noise_factor) == base for c in cands)
