"""Physics-grounded synthetic X-ray scattering frames on a modular detector.

Used by training, the simulated beamline, tests, replay and benchmarks:

    from stream.synthetic import generate_scan, SCENARIOS
    for frame in generate_scan("film_formation", 300, seed=1):
        frame.image, frame.phase, frame.phase_name, frame.t

Frames are int32 counts with Poisson noise, 20-bit saturation, hot pixels (constant high counts),
dead pixels (0) and module gaps set to -1, as a PILATUS writes them: consumers must treat
negative pixels as masked (a 0 would look like a real measurement of no photons).
Imports nothing from the project except stream.detector.
"""

from stream.synthetic._kernels import GAP_VALUE, SATURATION
from stream.synthetic.generator import SyntheticFrame, generate_scan, generate_training_pairs, phase_labels
from stream.synthetic.scenarios import SCENARIOS, ScenarioSpec
from stream.synthetic.scene import (
    Arc,
    Flat,
    Peak,
    Porod,
    Renderer,
    Rods,
    ScanGeometry,
    Scene,
    Spot,
    q_map,
)

__all__ = [
    "GAP_VALUE",
    "SATURATION",
    "SCENARIOS",
    "Arc",
    "Flat",
    "Peak",
    "Porod",
    "Renderer",
    "Rods",
    "ScanGeometry",
    "ScenarioSpec",
    "Scene",
    "Spot",
    "SyntheticFrame",
    "generate_scan",
    "generate_training_pairs",
    "phase_labels",
    "q_map",
]
