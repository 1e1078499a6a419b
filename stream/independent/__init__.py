"""An independent family of labelled scattering runs: evaluation the model cannot have been tuned to.

Written apart from `stream.synthetic` (the training generator): it imports nothing from it, and its physics,
geometries and schedules are its own (see `runs` for the phases, `physics` for the scattering laws,
`detectors` for the PILATUS 1M and EIGER2 X 4M). Transmission SAXS or WAXS with the beam anywhere on the
sensor, four phases per run in every ordering over the seeds, ramps of 5-40 frames, and two pairs of phases
where one is the other plus a feature.

    from stream.independent import VALIDATION_SEEDS, Renderer, draw_run
    spec = draw_run(VALIDATION_SEEDS[0], n_frames=120)
    for frame in Renderer(spec):
        frame.image, frame.label, frame.phase

Named "independent", not "heldout": it holds both a validation split (choose settings on it) and a held-out
split (score once), `VALIDATION_SEEDS` and `HELDOUT_SEEDS`.
"""

from stream.independent.detectors import DETECTORS, EIGER2_4M, PILATUS_1M, DetectorGeometry
from stream.independent.runs import (
    HELDOUT_SEEDS,
    MAX_RAMP,
    MIN_PLATEAU,
    MIN_RAMP,
    ORDERINGS,
    PHASES,
    RAMP,
    VALIDATION_SEEDS,
    Amplitudes,
    IndependentFrame,
    Renderer,
    RunSpec,
    Segment,
    draw_run,
)

__all__ = [
    "DETECTORS",
    "EIGER2_4M",
    "HELDOUT_SEEDS",
    "MAX_RAMP",
    "MIN_PLATEAU",
    "MIN_RAMP",
    "ORDERINGS",
    "PHASES",
    "PILATUS_1M",
    "RAMP",
    "VALIDATION_SEEDS",
    "Amplitudes",
    "DetectorGeometry",
    "IndependentFrame",
    "Renderer",
    "RunSpec",
    "Segment",
    "draw_run",
]
