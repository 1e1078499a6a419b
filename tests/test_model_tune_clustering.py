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


def test_grid_varies_only_the_settings_it_is_given(default_bundle) -> None:
    base = default_bundle.clustering_settings
    cands = grid(base, {"drift": [0.1, 0.2], "still_factor": [0.0, 2.0, 3.0], "spread_factor": None})
    assert len(cands) == 6
    assert {(c.drift, c.still_factor) for c in cands} == {(d, k) for d in (0.1, 0.2) for k in (0.0, 2.0, 3.0)}
    assert all(replace(c, drift=base.drift, still_factor=base.still_factor) == base for c in cands)
    assert grid(base, {}) == [base]  # nothing varied: the bundle's own setting
