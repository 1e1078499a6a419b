"""Scoring on the independent family: the onset lag of each phase, and a run through the serving path."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from operators.bundle import ModelBundle
from operators.model.evaluate import evaluate_independent, evaluate_independent_run, onset_lags
from stream.independent import PHASES, PILATUS_1M, VALIDATION_SEEDS, draw_run

R = -1  # a ramp frame
P = -1  # a pending frame (no id yet)


def _labels(*parts: tuple[int, int]) -> np.ndarray:
    return np.concatenate([np.full(n, label) for label, n in parts])


# phase 0 for 5 frames, a 3-frame ramp, phase 1 for 5, a 2-frame ramp, phase 2 for 5
LABELS = _labels((0, 5), (R, 3), (1, 5), (R, 2), (2, 5))


def test_a_phase_whose_new_id_comes_two_frames_after_its_ramp_has_lag_two() -> None:
    ids = [0] * 5 + [0] * 3 + [0, 0, 1, 1, 1] + [1] * 2 + [2] * 5
    assert onset_lags(LABELS, ids) == [0, 2, 0]


def test_pending_frames_do_not_count_as_an_id() -> None:
    ids = [P, P, 0, 0, 0] + [0] * 3 + [P, P, P, 1, 1] + [1] * 2 + [2] * 5
    assert onset_lags(LABELS, ids) == [2, 3, 0]


def test_an_id_founded_during_the_ramp_counts_from_the_ramps_end() -> None:
    ids = [0] * 5 + [0, 1, 1] + [1] * 5 + [1, 1] + [2] * 5
    assert onset_lags(LABELS, ids) == [0, 0, 0]


def test_a_phase_that_only_ever_carries_an_earlier_phases_id_never_gets_its_own() -> None:
    ids = [0] * 5 + [0] * 3 + [1] * 5 + [1] * 2 + [0, 0, 1, 0, 0]
    assert onset_lags(LABELS, ids) == [0, 0, None]


def test_an_id_first_seen_after_the_phase_ended_is_not_its_onset() -> None:
    ids = [0] * 5 + [0] * 3 + [0] * 5 + [3] * 2 + [3] * 5
    assert onset_lags(LABELS, ids) == [0, None, 0]


def test_a_correction_that_gives_the_phase_its_own_id_sets_its_onset() -> None:
    ids = [0] * 5 + [0] * 3 + [0] * 5 + [0] * 2 + [2] * 5
    # after frame 11 (phase 1's fourth frame) re-clustering moves frames 8..11 to a new id 1
    corrections = [(11, f, 1) for f in range(8, 12)]
    assert onset_lags(LABELS, ids, corrections) == [0, 3, 0]


def test_a_correction_that_gives_an_earlier_phase_the_same_id_takes_it_away() -> None:
    ids = [0] * 5 + [0] * 3 + [1] * 5 + [1] * 2 + [2] * 5
    corrections = [(8, f, 1) for f in range(5)]  # as phase 1 gets id 1, phase 0's frames are moved to 1 too
    assert onset_lags(LABELS, ids, corrections) == [0, None, 0]


def test_held_out_seeds_are_refused_while_settings_are_chosen_on_validation() -> None:
    with pytest.raises(ValueError, match="not validation seeds"):
        evaluate_independent(split="validation", seeds=(42_000,))


def test_an_independent_run_is_scored_through_the_serving_path(default_bundle: ModelBundle) -> None:
    seed = next(s for s in VALIDATION_SEEDS if draw_run(s).setup.detector == PILATUS_1M)
    spec = draw_run(seed, 55)
    r = evaluate_independent_run(default_bundle, seed, 55)
    assert [o.phase for o in r.onsets] == [PHASES[p] for p in spec.order]
    assert [o.ramp_end for o in r.onsets] == [s.start for s in spec.segments]
    assert r.plateau_frames == int((spec.labels() >= 0).sum()) and -0.5 <= r.ari <= 1.0
    assert r.max_onset_lag == (None if any(o.lag is None for o in r.onsets) else max(o.lag for o in r.onsets))
    assert asdict(r)["onsets"][0].keys() == {"phase", "ramp_frames", "ramp_end", "lag"}
