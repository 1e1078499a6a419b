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


# Film formation's halo -> aggregate-arch boundary is the open part of issue 3: in the pixels it is a smaller
# change than the drift inside either phase (boundary contrast ~0.3-0.4), and the encoder does not sharpen it
# the way it sharpens the other scenarios' boundaries, so the online clusters cut it late (ARI ~0.71 on 9001).
# strict: the day a bundle passes, this marker must go.
_FILM_ONSET = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="issue 3: film formation's aggregation onset is cut late")


@pytest.mark.parametrize(
    "scenario", [pytest.param(s, marks=_FILM_ONSET) if s == "film_formation" else s for s in SCENARIOS])
def test_default_bundle_separates_the_phases_of_a_held_out_run(
    default_bundle: ModelBundle, scenario: str
) -> None:
    r = evaluate_run(default_bundle, scenario, HELDOUT_SEEDS[0], FRAMES)
    assert r.ari >= 0.8, f"{scenario}: ARI {r.ari:.3f} of cluster ids against phases"
    assert r.continuity_ratio < 1.0, f"{scenario}: a jump inside one phase as large as a change of phase"
