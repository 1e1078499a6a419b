"""Broad training states: generic transmission scattering on several detector grids, the beam anywhere.

The project's scenarios are one beamline's experiments on one detector. What they cannot teach the encoder is
what a change of phase looks like in general: a new feature appears (a set of rings, equally spaced orders,
arcs, Bragg spots on existing rings, form-factor oscillations), while within a phase everything drifts a
little (amplitudes, flux, background, positions by a few per cent). `generate_sibling_pairs` draws states of
that kind and renders each twice under such drift (a pair: the same phase), and renders a sibling state that
is the same state plus one feature (a hard negative: another phase), so that a contrastive term can make a
feature's appearance larger in the latent than any drift.

Everything here is drawn in pixel radii and converted to q at the view's geometry, so a state means the same
image on any detector grid and at any beam position. The grids are generic module layouts, not any real
detector's; gap pixels read -1 and saturated pixels 2**20 - 1 as the renderer writes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from stream.detector import PILATUS3_2M, Detector
from stream.synthetic.generator import SyntheticFrame, draw_defects
from stream.synthetic.scene import Arc, Flat, Peak, Porod, Renderer, ScanGeometry, Scene, Spot, q_of_radius

__all__ = ["BROAD_DETECTORS", "DEFAULT_WEIGHTS", "FEATURES", "BroadState", "generate_sibling_pairs"]

BROAD_DETECTORS: tuple[Detector, ...] = (
    PILATUS3_2M,
    Detector("grid-4x4", module_shape=(256, 256), modules=(4, 4), gaps=(10, 10)),
    Detector("grid-6x2", module_shape=(300, 600), modules=(6, 2), gaps=(20, 8), pixel_size_m=75e-6),
    Detector("grid-2x3", module_shape=(512, 512), modules=(2, 3), gaps=(12, 12), pixel_size_m=100e-6),
)
# What a phase can add to a state. "spots" needs rings or orders to sit on.
FEATURES = ("halo", "oscillations", "rings", "orders", "arcs", "spots")
# How likely each feature is as a sibling's new one, against 1 for a feature not named (read-only).
DEFAULT_WEIGHTS: Mapping[str, int] = MappingProxyType({"spots": 2})
WAVELENGTH_A = 1.0
_BROAD_STREAM = 7373  # random-stream id of broad pairs, apart from the scenarios' and training pairs'
_DRIFT_RADIUS = 0.03  # relative drift of every feature's radius within a phase
_DRIFT_AMPLITUDE = 0.3  # log-normal sigma of each feature's amplitude drift within a phase
_FLUX_RANGE = (0.2, 5.0)


@dataclass(frozen=True)
class Ring:
    """A radial peak at `r_px` from the beam; `arc` = (centre azimuth, azimuthal sigma) makes it an arc pair."""

    r_px: float
    width_px: float
    height: float  # counts per pixel at unit flux
    eta: float = 0.0
    arc: tuple[float, float] | None = None


@dataclass(frozen=True)
class BroadState:
    """One phase's scattering, in pixel units: a diffuse base plus features, each a tuple of rings/spots."""

    porod: tuple[float, float]  # (plateau counts, knee radius px)
    flat: float
    features: tuple[tuple[str, tuple[Ring, ...]], ...]
    spots: tuple[Spot, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.features) + (("spots",) if self.spots else ())

    def scene(self, g: ScanGeometry, pixel_m: float) -> Scene:
        def q(r_px: float) -> float:
            return float(q_of_radius(r_px * pixel_m, g))

        comps: list = [Porod(self.porod[0], q(self.porod[1])), Flat(self.flat)]
        for _, rings in self.features:
            for ring in rings:
                q0, sigma = q(ring.r_px), q(ring.r_px + ring.width_px) - q(ring.r_px)
                if ring.arc is None:
                    comps.append(Peak(q0, sigma, ring.height, ring.eta))
                else:
                    comps.append(Arc(q0, sigma, ring.height, ring.arc[0], ring.arc[1], ring.eta, fold=2))
        return Scene((*comps, *self.spots))

    def drifted(self, rng: np.random.Generator) -> BroadState:
        """The same phase a little later: each feature's amplitude and radius moved, the background grown."""
        scale = 1.0 + rng.uniform(-_DRIFT_RADIUS, _DRIFT_RADIUS)

        def amp() -> float:
            return float(np.exp(rng.normal(0.0, _DRIFT_AMPLITUDE)))

        features = []
        for name, rings in self.features:
            a = amp()  # one factor per feature: a feature's rings or orders grow and fade together
            features.append((name, tuple(replace(r, r_px=r.r_px * scale, height=r.height * a) for r in rings)))
        a_spots = amp()
        spots = tuple(replace(s, d_row=s.d_row * scale, d_col=s.d_col * scale, amplitude=s.amplitude * a_spots)
                      for s in self.spots)
        return BroadState((self.porod[0] * amp(), self.porod[1] * scale), self.flat * rng.uniform(0.7, 1.5),
                          tuple(features), spots)


def generate_sibling_pairs(
    n_groups: int, *, seed: int = 0, weights: Mapping[str, int] | None = None
) -> Iterator[tuple[tuple[SyntheticFrame, SyntheticFrame], tuple[SyntheticFrame, SyntheticFrame]]]:
    """Yield `n_groups` of (pair of a state, pair of that state plus one feature), each pair two drifted views
    on one detector and beam position (+-3 px). Phase ids: 0 for the state, 1 for its sibling (within a group
    only: ids do not name a feature). `weights`: how many times likelier than a feature not named each named
    feature is as the sibling's feature (Bragg spots only where the state has rings or orders to put them on);
    None: `DEFAULT_WEIGHTS`, the groups the first embedding was trained on."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    if n_groups < 0:
        raise ValueError(f"n_groups must be >= 0, got {n_groups}")
    unknown = set(weights) - set(FEATURES)
    if unknown or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights name features of {FEATURES} with weights >= 0, not {dict(weights)}")
    renderers = {det.name: Renderer(det) for det in BROAD_DETECTORS}
    for i in range(n_groups):
        rng = np.random.default_rng([seed, _BROAD_STREAM, i])
        det = BROAD_DETECTORS[int(rng.integers(len(BROAD_DETECTORS)))]
        geom = _geometry(rng, det)
        r_max = _r_max(det, geom)
        state = _draw_state(rng, r_max)
        sibling = _with_feature(rng, state, r_max, weights)
        hot, dead = draw_defects(rng, det)
        group = []
        for phase, s in enumerate((state, sibling)):
            views = []
            for view in (0, 1):
                g = _jittered(rng, geom, det)
                image = renderers[det.name].render(s.drifted(rng).scene(g, det.pixel_size_m), g,
                                                   seed=seed * 4 + 2 * phase + view, index=i, hot=hot, dead=dead)
                views.append(SyntheticFrame(image, i, phase, "+".join(s.names), 0.0, g))
            group.append((views[0], views[1]))
        yield group[0], group[1]


def _geometry(rng: np.random.Generator, det: Detector) -> ScanGeometry:
    h, w = det.shape
    # the beam anywhere: mostly inside, sometimes near an edge or a corner
    margin = 0.02 if rng.uniform() < 0.3 else 0.15
    row = int(rng.uniform(margin, 1 - margin) * (h - 1))
    col = int(rng.uniform(margin, 1 - margin) * (w - 1))
    return ScanGeometry(
        distance_m=float(rng.uniform(0.4, 5.0)),
        wavelength_a=WAVELENGTH_A,
        beam_center=(row, col),
        beamstop_radius_px=float(rng.uniform(4.0, 25.0)),
        arm_angle_deg=float(rng.uniform(0.0, 360.0)),
        arm_half_width_px=float(rng.uniform(2.0, 8.0)),
        flux=float(np.exp(rng.uniform(*np.log(_FLUX_RANGE)))),
    )


def _jittered(rng: np.random.Generator, g: ScanGeometry, det: Detector) -> ScanGeometry:
    h, w = det.shape
    dr, dc = (int(v) for v in rng.integers(-3, 4, size=2))
    centre = (min(h - 1, max(0, g.beam_center[0] + dr)), min(w - 1, max(0, g.beam_center[1] + dc)))
    return replace(g, beam_center=centre, flux=g.flux * float(np.exp(rng.uniform(-0.5, 0.5))))


def _r_max(det: Detector, g: ScanGeometry) -> float:
    """The distance from the beam to the farthest corner: the largest radius the frame shows."""
    h, w = det.shape
    return float(max(math.hypot(r, c) for r in (g.beam_center[0], h - 1 - g.beam_center[0])
                     for c in (g.beam_center[1], w - 1 - g.beam_center[1])))


def _draw_state(rng: np.random.Generator, r_max: float) -> BroadState:
    porod = (float(np.exp(rng.uniform(np.log(5.0), np.log(500.0)))), float(rng.uniform(15.0, 120.0)))
    flat = float(np.exp(rng.uniform(np.log(0.05), np.log(3.0))))
    state = BroadState(porod, flat, ())
    for _ in range(int(rng.integers(0, 3))):
        state = _with_feature(rng, state, r_max, {"spots": 0})
    return state


def _with_feature(rng: np.random.Generator, state: BroadState, r_max: float,
                  weights: Mapping[str, int]) -> BroadState:
    """`state` plus one feature it does not have, each as likely as its weight (1 where not named); Bragg spots
    only on rings or orders the state has."""
    has = set(state.names)
    choices = [f for f in FEATURES if f not in has and f != "spots" for _ in range(weights.get(f, 1))]
    if "spots" not in has and has & {"rings", "orders"}:
        choices += ["spots"] * weights.get("spots", 1)
    name = str(rng.choice(choices))
    if name == "spots":
        return replace(state, spots=_spots(rng, state))
    return replace(state, features=(*state.features, (name, _rings(rng, name, state, r_max))))


def _rings(rng: np.random.Generator, name: str, state: BroadState, r_max: float) -> tuple[Ring, ...]:
    base = state.porod[0]
    lo, hi = 30.0, 0.85 * r_max

    def height(rel_lo: float, rel_hi: float) -> float:
        return base * float(np.exp(rng.uniform(np.log(rel_lo), np.log(rel_hi))))

    if name == "halo":
        r = float(rng.uniform(lo, hi))
        return (Ring(r, r * float(rng.uniform(0.08, 0.25)), height(0.02, 0.3), eta=0.5),)
    if name == "oscillations":  # form-factor maxima: broad, evenly spaced, falling steeply
        period = float(rng.uniform(25.0, max(30.0, hi / 4)))
        h0 = height(0.05, 0.5)
        return tuple(Ring(period * (k + 1.43), period * 0.22, h0 / (k + 1) ** 3) for k in range(5)
                     if period * (k + 1.43) < hi)
    if name == "orders":  # equally spaced Bragg orders, sometimes oriented
        r1 = float(rng.uniform(lo, hi / 3))
        arc = (float(rng.uniform(0, 180)), float(rng.uniform(8, 40))) if rng.uniform() < 0.4 else None
        h0 = height(0.02, 0.5)
        return tuple(Ring(r1 * n, 1.0 + r1 * 0.03 * n, h0 / n**2, arc=arc) for n in range(1, 5) if r1 * n < hi)
    if name == "arcs":
        r = float(rng.uniform(lo, hi))
        return (Ring(r, float(rng.uniform(2.0, 12.0)), height(0.02, 0.5),
                     arc=(float(rng.uniform(0, 180)), float(rng.uniform(5, 30)))),)
    # rings: Debye-Scherrer rings at unrelated radii
    n = int(rng.integers(2, 8))
    radii = np.sort(rng.uniform(lo, hi, size=n))
    return tuple(Ring(float(r), float(rng.uniform(1.0, 4.0)), height(0.01, 0.4)) for r in radii)


def _spots(rng: np.random.Generator, state: BroadState) -> tuple[Spot, ...]:
    rings = [r for name, rs in state.features if name in ("rings", "orders") for r in rs]
    out = []
    for _ in range(int(rng.integers(4, 40))):
        ring = rings[int(rng.integers(len(rings)))]
        chi = math.radians(float(rng.uniform(0.0, 360.0)))
        rel = float(np.exp(rng.uniform(np.log(0.5), np.log(20.0))))
        out.append(Spot(-ring.r_px * math.sin(chi), ring.r_px * math.cos(chi), float(rng.uniform(1.0, 4.0)),
                        ring.height * rel))
    return tuple(out)
