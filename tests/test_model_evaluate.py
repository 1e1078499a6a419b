"""Evaluation figures: boundary contrast tells a sharp change of phase from one lost in a phase's drift."""

from __future__ import annotations

import math

import numpy as np

from operators.model.evaluate import boundary_contrast


def _run(step: float, drift_per_frame: float, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3-d trajectory: two phases of n/2 frames drifting along x, the second offset by `step` along y."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    phases = (t >= n // 2).astype(int)
    x = np.stack([drift_per_frame * t, step * phases, np.zeros(n)], axis=1)
    return x + rng.normal(0, 0.05, x.shape), phases


def test_a_jump_larger_than_the_drift_inside_either_phase_scores_above_one() -> None:
    x, phases = _run(step=10.0, drift_per_frame=0.1)
    assert boundary_contrast(x, phases) > 3.0


def test_a_boundary_hidden_in_the_drift_of_its_phases_scores_below_one() -> None:
    x, phases = _run(step=1.0, drift_per_frame=0.2)
    assert boundary_contrast(x, phases) < 0.5


def test_the_weakest_boundary_decides_and_one_phase_has_none() -> None:
    x, phases = _run(step=10.0, drift_per_frame=0.1)
    three = np.concatenate([x, x[-1] + np.array([0.0, 0.5, 0.0]) + x - x[0]])
    assert boundary_contrast(three, np.concatenate([phases, phases + 2])) < boundary_contrast(x, phases)
    assert math.isnan(boundary_contrast(x[:20], np.zeros(20, int)))
