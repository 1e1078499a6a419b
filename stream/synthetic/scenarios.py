"""Time-resolved scattering scenarios with ground-truth phase labels.

Each scenario is a sequence of structural phases; inside a phase the structure evolves slowly
(a scene is a function of the progress p in [0, 1] through the phase), and at a phase boundary the
new phase nucleates: the end state of the old phase and the start state of the new one are
cross-faded (phase coexistence) over a few frames. Every frame is labelled by its dominant phase.

q values are in 1/Angstrom and amplitudes in expected counts per pixel at unit flux; the
geometries are those of a PILATUS3 2M at 10 keV (1.24 Angstrom), scaled with the detector size
for other detectors so that the same q range lands on it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from stream.detector import PILATUS3_2M, Detector
from stream.synthetic.scene import Arc, Flat, Peak, Porod, Rods, ScanGeometry, Scene, Spot

WAVELENGTH_A = 1.24  # 10 keV


@dataclass(frozen=True)
class Variation:
    """Per-scan (or, for training, per-frame) nuisance parameters of the sample."""

    q_scale: float  # all feature positions x this (ring positions vary by a few percent)
    width_scale: float  # all feature widths x this
    amps: tuple[float, ...]  # per-feature amplitude multipliers
    chi_offset: float  # degrees added to feature orientations

    @staticmethod
    def draw(rng: np.random.Generator) -> Variation:
        return Variation(
            q_scale=float(rng.uniform(0.97, 1.03)),
            width_scale=float(rng.uniform(0.85, 1.15)),
            amps=_draw_amps(rng),
            chi_offset=float(rng.uniform(-20.0, 20.0)),
        )

    def with_new_amps(self, rng: np.random.Generator) -> Variation:
        """The same structure (positions, widths, orientation) with freshly drawn feature amplitudes."""
        return replace(self, amps=_draw_amps(rng))


def _draw_amps(rng: np.random.Generator) -> tuple[float, ...]:
    return tuple(float(a) for a in np.exp(rng.uniform(np.log(0.7), np.log(1.4), size=8)))


@dataclass(frozen=True)
class GeometryTemplate:
    """A scenario's nominal geometry on a PILATUS3 2M."""

    distance_m: float
    beam_center_frac: tuple[float, float]  # (row, col) as fractions of (H, W)
    beamstop_radius_px: float
    arm_angle_deg: float
    arm_half_width_px: float
    alpha_i_deg: float | None = None
    alpha_c_deg: float = 0.1

    def realise(self, detector: Detector, jitter: tuple[int, int], flux: float) -> ScanGeometry:
        h, w = detector.shape
        # Keep the q range: scale the distance with the detector's physical width.
        scale = (w * detector.pixel_size_m) / (PILATUS3_2M.width * PILATUS3_2M.pixel_size_m)
        px_scale = w / PILATUS3_2M.width
        row = min(h - 1, max(0, round(self.beam_center_frac[0] * (h - 1)) + jitter[0]))
        col = min(w - 1, max(0, round(self.beam_center_frac[1] * (w - 1)) + jitter[1]))
        return ScanGeometry(
            distance_m=self.distance_m * scale,
            wavelength_a=WAVELENGTH_A,
            beam_center=(int(row), int(col)),
            beamstop_radius_px=max(1.0, self.beamstop_radius_px * px_scale),
            arm_angle_deg=self.arm_angle_deg,
            arm_half_width_px=max(0.5, self.arm_half_width_px * px_scale),
            alpha_i_deg=self.alpha_i_deg,
            alpha_c_deg=self.alpha_c_deg,
            flux=flux,
        )


SceneFn = Callable[[int, float, Variation, ScanGeometry, Detector], Scene]


@dataclass(frozen=True)
class ScenarioSpec:
    """A scenario: its phases in order and where (fraction of the run) each later phase begins."""

    name: str
    description: str
    phases: tuple[str, ...]
    boundaries: tuple[float, ...]  # len(phases) - 1 fractions of the run, increasing; () for training
    geometry: GeometryTemplate | None  # None for training (each frame picks its phase's scenario)

    def phase_at(self, index: int, n_frames: int) -> int:
        """Ground-truth phase id of frame `index` in a run of `n_frames` (dominant phase)."""
        return sum(1 for b in self.boundaries if index >= b * n_frames)


# --------------------------------------------------------------------------------------------
# Scenes per scenario: scene(phase, progress, variation, geometry, detector)
# --------------------------------------------------------------------------------------------


def _film_formation(phase: int, p: float, v: Variation, g: ScanGeometry, d: Detector) -> Scene:
    """PFSA ionomer film formation (paper, section 3.2): solvent halo at low q -> semi-crystalline
    aggregates give an arch inside the solvent peak -> hydrophilic domains give a higher-q peak."""
    qs, ws, a = v.q_scale, v.width_scale, v.amps
    halo = (1.0 - 0.25 * p, 0.7 - 0.35 * p, 0.3 * (1.0 - p) + 0.03)[phase]
    comps: list = [
        Peak(0.12 * qs, 0.06 * ws, 60.0 * a[0] * halo, eta=0.6),  # solvent scattering halo
        Porod(2000.0 * a[1] * (1.0, 1.0 + 0.8 * p, 1.8)[phase], 0.012 * qs),
        Flat(1.0 * a[2]),
    ]
    if phase >= 1:  # aggregates nucleate (25 counts) and grow; the arch sharpens as they order
        arch = 25.0 + 55.0 * p if phase == 1 else 80.0
        chi_w = 28.0 - (4.0 * p if phase == 1 else 4.0 + 4.0 * p)
        comps.append(Arc(0.11 * qs, 0.02 * ws, arch * a[3], 90.0 + v.chi_offset, chi_w, eta=0.3, fold=2))
    if phase == 2:  # ionomer peak appears and moves to higher q as the domains shrink on drying
        comps.append(Peak((0.25 + 0.02 * p) * qs, 0.03 * ws, (20.0 + 40.0 * p) * a[4], eta=0.5))
    return Scene(tuple(comps))


_CRYSTAL_Q = (1.05, 1.22, 1.50, 1.69, 1.91)
_CRYSTAL_AMP = (250.0, 120.0, 300.0, 90.0, 60.0)


def _crystallization(phase: int, p: float, v: Variation, g: ScanGeometry, d: Detector) -> Scene:
    """WAXS of a polymer crystallising from the melt: amorphous halo -> sharp Debye-Scherrer rings."""
    qs, ws, a = v.q_scale, v.width_scale, v.amps
    x = 0.0 if phase == 0 else 0.35 + 0.5 * p  # crystallinity
    comps: list = [
        Peak((1.38 + 0.02 * p * (phase == 0)) * qs, 0.16 * ws, 80.0 * a[0] * (1.0 - x), eta=0.5),
        Peak(0.75 * qs, 0.2 * ws, 15.0 * a[1], eta=0.5),
        Porod(300.0 * a[2], 0.05),
        Flat(3.0 * a[2]),
    ]
    if phase == 1:
        sigma = (0.012 - 0.005 * p) * ws  # crystallites grow: Scherrer width narrows
        for i, (q0, amp) in enumerate(zip(_CRYSTAL_Q, _CRYSTAL_AMP, strict=True)):
            comps.append(Peak(q0 * qs, sigma, amp * x * a[3 + i], eta=0.2))
    return Scene(tuple(comps))


def _gisaxs_ordering(phase: int, p: float, v: Variation, g: ScanGeometry, d: Detector) -> Scene:
    """GISAXS of a block-copolymer film annealing: disordered correlation ring -> Bragg rods."""
    qs, ws, a = v.q_scale, v.width_scale, v.amps
    q_star = 0.022 * qs
    ring = (1.0, 0.5 - 0.3 * p)[phase]
    alpha_i = math.radians(g.alpha_i_deg or 0.0)
    specular_rows = g.distance_m * math.tan(2.0 * alpha_i) / d.pixel_size_m
    comps: list = [
        Peak(q_star, 0.006 * ws, 40.0 * a[0] * ring, eta=0.5),  # liquid-like correlation peak
        Peak(0.0, 0.006 * ws, 150.0 * a[1], eta=1.0),  # Ornstein-Zernike diffuse halo
        Porod(4000.0 * a[2], 0.003),
        Flat(0.3 * a[2]),
        Spot(-specular_rows, 0.0, max(0.7, 2.0 * d.width / PILATUS3_2M.width), 5000.0 * a[5]),
    ]
    if phase == 1:
        comps.append(Rods(q_star, (0.0012 - 0.0004 * p) * ws, (60.0 + 60.0 * p) * a[3], orders=3))
    return Scene(tuple(comps))


def _shear_alignment(phase: int, p: float, v: Variation, g: ScanGeometry, d: Detector) -> Scene:
    """SAXS of a lamellar phase under shear: isotropic powder rings -> oriented arcs."""
    qs, ws, a = v.q_scale, v.width_scale, v.amps
    q1 = 0.045 * qs
    orders = ((1, 200.0), (2, 30.0), (3, 40.0))
    aligned = 0.0 if phase == 0 else 0.6 + 0.4 * p  # oriented volume fraction
    chi_w = 25.0 - 15.0 * p  # orientation distribution narrows as shear continues
    comps: list = [Porod(3000.0 * a[0], 0.006), Flat(0.8 * a[1])]
    for m, amp in orders:
        amp *= a[2 + m]
        if aligned < 1.0:
            comps.append(Peak(m * q1, 0.0025 * ws, amp * (1.0 - aligned), eta=0.3))
        if aligned > 0.0:
            # Same integrated intensity per ring: an arc pair of width chi_w holds 360 deg of ring.
            peak = amp * aligned * 360.0 / (2.0 * math.sqrt(2.0 * math.pi) * chi_w)
            comps.append(Arc(m * q1, 0.0025 * ws, peak, v.chi_offset, chi_w, eta=0.3, fold=2))
    return Scene(tuple(comps))


@dataclass(frozen=True)
class _Scenario:
    spec: ScenarioSpec
    scene: SceneFn
    fade_fraction: float = 0.03  # cross-fade width as a fraction of the run (2..8 frames)


_TRANSMISSION_SAXS = {"beamstop_radius_px": 18.0, "arm_angle_deg": 90.0, "arm_half_width_px": 6.0}

_SCENARIOS: dict[str, _Scenario] = {
    s.spec.name: s
    for s in (
        _Scenario(
            ScenarioSpec(
                "film_formation",
                "PFSA ionomer film formation (SAXS, 1.5 m): solvent halo, then an aggregate arch grows "
                "inside the solvent peak, then a higher-q ionomer peak appears as the solvent evaporates.",
                ("dispersion", "aggregation", "ionomer_domains"),
                (0.35, 0.65),
                GeometryTemplate(1.5, (0.55, 0.52), **_TRANSMISSION_SAXS),
            ),
            _film_formation,
        ),
        _Scenario(
            ScenarioSpec(
                "crystallization",
                "Polymer crystallisation (WAXS, 0.3 m): broad amorphous halo, then sharp Debye-Scherrer "
                "rings appear at half-time and grow as the halo fades.",
                ("amorphous", "crystalline"),
                (0.5,),
                GeometryTemplate(
                    0.3, (0.5, 0.5), beamstop_radius_px=22.0, arm_angle_deg=90.0, arm_half_width_px=7.0
                ),
            ),
            _crystallization,
        ),
        _Scenario(
            ScenarioSpec(
                "gisaxs_ordering",
                "Block-copolymer film annealing (GISAXS, 3 m, incidence 0.15 deg): sample horizon, Yoneda "
                "band and a disordered correlation ring, then Bragg rods of lateral order appear.",
                ("gi_disordered", "gi_ordered"),
                (0.5,),
                GeometryTemplate(
                    3.0,
                    (0.85, 0.5),
                    beamstop_radius_px=10.0,
                    arm_angle_deg=270.0,
                    arm_half_width_px=4.0,
                    alpha_i_deg=0.15,
                    alpha_c_deg=0.10,
                ),
            ),
            _gisaxs_ordering,
        ),
        _Scenario(
            ScenarioSpec(
                "shear_alignment",
                "Lamellar phase under shear (SAXS, 2 m): isotropic Debye-Scherrer rings turn into "
                "anisotropic arcs that narrow as the orientation improves.",
                ("isotropic", "aligned"),
                (0.45,),
                GeometryTemplate(2.0, (0.5, 0.5), **_TRANSMISSION_SAXS),
            ),
            _shear_alignment,
        ),
    )
}

# Training mode: every phase of every scenario, in this order; the phase id is the index here.
TRAINING_PHASES: tuple[tuple[str, int], ...] = tuple(
    (name, i) for name, s in _SCENARIOS.items() for i in range(len(s.spec.phases))
)

TRAINING_SPEC = ScenarioSpec(
    "training",
    "Random states across all phases of all scenarios (random phase, progress, nuisance parameters, "
    "and sometimes coexistence with a neighbouring phase), i.i.d. per frame, for training data.",
    tuple(_SCENARIOS[name].spec.phases[i] for name, i in TRAINING_PHASES),
    (),
    None,
)

SCENARIOS: Mapping[str, ScenarioSpec] = MappingProxyType(
    {**{name: s.spec for name, s in _SCENARIOS.items()}, "training": TRAINING_SPEC}
)


def scenario_id(name: str) -> int:
    """A stable integer for a scenario name (seeds per-scenario random streams)."""
    return zlib.crc32(name.encode())
