"""What the shipped default bundle is for: on a held-out synthetic run it names the run's phases with
online cluster ids and draws one continuous trajectory per phase (issue 3's acceptance figures, one seed per
scenario).

Seed 9001 is held out from training and from every tuning sweep (`operators.model.tune_clustering` refuses
it), so this is the figure `python -m operators.model.evaluate` reports, run one frame at a time through the
serving path.
"""

from __future__ import annotations

import pytest

from operators.bundle import ModelBundle
from operators.model.evaluate import HELDOUT_SEEDS, SCENARIOS, evaluate_run

FRAMES = 120


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_default_bundle_separates_the_phases_of_a_held_out_run(
    default_bundle: ModelBundle, scenario: str
) -> None:
    r = evaluate_run(default_bundle, scenario, HELDOUT_SEEDS[0], FRAMES)
    assert r.ari >= 0.8, f"{scenario}: ARI {r.ari:.3f} of cluster ids against phases"
    assert r.continuity_ratio < 1.0, f"{scenario}: a jump inside one phase as large as a change of phase"
