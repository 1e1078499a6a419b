"""Runs of the independent family: four phases in a seed-given order, linear ramps between them, rendered.

A run is drawn from its seed alone (`draw_run`): the detector and beam geometry, the sample's material
parameters, the phase order, the schedule and the per-frame flux. `Renderer` turns it into frames.

Phases (each run has all four; `ORDERINGS[(7 * seed) % 24]` gives the order, so any 24 consecutive seeds
hold every ordering once, and consecutive seeds do not share a first phase):
- disordered: the particles' form factor (SAXS: polydisperse spheres) or an amorphous halo (WAXS), Porod;
- lamellar:   the disordered phase plus lamellar Bragg orders (isotropic rings, or arcs when oriented);
- powder:     Debye-Scherrer rings of a cubic crystal, weaker disordered scattering;
- textured:   the powder phase plus Bragg spots on its rings (large grains).
lamellar = disordered + one feature, and textured = powder + one feature: at the same time and progress
their parameters differ in that feature's amplitude only.

Inside a phase its amplitudes drift with its progress; the material drifts with the run's time (particles
grow, the lattice and the lamellar period change by a few percent, flux decays and flickers, background
grows), so a clusterer has to follow phases, not drift. Between phases a ramp of 5-40 frames mixes the
amplitudes linearly, from the old phase's end to the new phase's start.

Labels: a plateau frame is labelled with its phase; a ramp frame with RAMP (-1): a mix of two phases
belongs to neither, so ARI is scored on plateau frames. `midpoint_labels` gives ramp frames the phase they
ramp into from the ramp's midpoint on (mixing weight >= 0.5), for a figure that does count them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from stream.independent import physics
from stream.independent._kernel import POISSON_TABLE, expected_counts, frame_key, sample_counts
from stream.independent.detectors import DETECTORS, DetectorGeometry

PHASES = ("disordered", "lamellar", "powder", "textured")
DISORDERED, LAMELLAR, POWDER, TEXTURED = range(4)
RAMP = -1
ORDERINGS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(len(PHASES))))
# Settings are chosen on VALIDATION_SEEDS; HELDOUT_SEEDS are scored once, for the chosen one. 24 seeds each:
# every ordering once per split.
VALIDATION_SEEDS = range(41_000, 41_024)
HELDOUT_SEEDS = range(42_000, 42_024)
MIN_RAMP, MAX_RAMP = 5, 40
MIN_PLATEAU = 10  # frames of a phase after its ramp: enough to see whether its own id comes within 5
# mixed into every seed, so that no other generator's seed gives this family's random streams
_FAMILY_SALT = 0x1DE9_5EED
_RADIAL_BINS_PER_PX = 2
_AZIMUTHAL_BINS = 720


@dataclass(frozen=True)
class Setup:
    """Transmission geometry: the beam hits `beam_rc` (row, column; sub-pixel, anywhere on the sensor)."""

    detector: DetectorGeometry
    beam_rc: tuple[float, float]
    distance_m: float
    wavelength_a: float
    beamstop_px: float  # radius of the beamstop's disc
    arm_angle_deg: float  # direction of its holding arm (0 = right, 90 = up)
    arm_half_width_px: float

    def q_at(self, r_px: np.ndarray | float) -> np.ndarray:
        two_theta = np.arctan(np.asarray(r_px, np.float64) * self.detector.pixel_m / self.distance_m)
        return 4 * np.pi / self.wavelength_a * np.sin(two_theta / 2)

    def r_at(self, q: np.ndarray | float) -> np.ndarray:
        two_theta = 2 * np.arcsin(np.clip(np.asarray(q) * self.wavelength_a / (4 * np.pi), 0, 1))
        return self.distance_m * np.tan(two_theta) / self.detector.pixel_m

    @property
    def dq_per_px(self) -> float:
        """q per pixel near the beam: the finest ring the geometry can resolve."""
        return 2 * np.pi * self.detector.pixel_m / (self.wavelength_a * self.distance_m)


@dataclass(frozen=True)
class Material:
    """What the sample is made of, and how it drifts over the run's time t in [0, 1]."""

    regime: str  # "saxs": particles, nm periods; "waxs": amorphous halo, Angstrom periods
    q_ref: float  # q at the median pixel radius: the run's scale
    flux: float
    flux_decay: float  # relative loss over the run
    flat: float  # counts per pixel (fluorescence, air)
    flat_growth: float
    # disordered scattering, scaled to `disorder_counts` at its peak
    radius_a: float  # SAXS: mean sphere radius
    polydispersity: float
    radius_growth: float
    halo_q: float  # WAXS: first-shell position
    halo_width: float
    halo_shift: float
    disorder_counts: float
    porod_q: float
    porod_alpha: float
    porod_counts: float  # at porod_q
    # lamellar stack
    period_a: float
    bilayer_fraction: float
    lamellar_width: float  # first order's sigma, relative to its q
    period_growth: float
    orientation_kappa: float  # 0: isotropic rings; > 0: arcs, exp(kappa cos^2(chi - chi0))
    orientation_chi_deg: float
    lamellar_counts: float
    # cubic crystal
    lattice: str
    lattice_a: float
    lattice_growth: float
    ring_width: float  # sigma relative to q
    debye_waller_u: float  # Angstrom (SAXS: nm-scale displacements of the particles)
    ring_counts: float  # strongest ring's peak
    # Bragg spots on the rings: (ring index, chi in degrees, radial sigma px, tangential sigma px, height
    # relative to its ring's peak)
    spots: tuple[tuple[int, float, float, float, float], ...]


@dataclass(frozen=True)
class Amplitudes:
    """How much of each component a state has (1 = the material's full amount)."""

    disorder: float = 0.0
    porod: float = 0.0
    lamellar: float = 0.0
    rings: float = 0.0
    spots: float = 0.0

    def lerp(self, other: Amplitudes, w: float) -> Amplitudes:
        return Amplitudes(
            **{f.name: (1 - w) * getattr(self, f.name) + w * getattr(other, f.name) for f in fields(self)}
        )


@dataclass(frozen=True)
class Segment:
    """A phase in the run: its ramp is frames [ramp_start, start), its plateau [start, stop)."""

    phase: int
    ramp_start: int
    start: int
    stop: int

    @property
    def ramp_frames(self) -> int:
        return self.start - self.ramp_start


@dataclass(frozen=True)
class RunSpec:
    seed: int
    n_frames: int
    setup: Setup
    material: Material
    order: tuple[int, ...]
    segments: tuple[Segment, ...]
    phase_amplitudes: tuple[tuple[Amplitudes, Amplitudes], ...]  # per phase: (at progress 0, at progress 1)
    flicker: tuple[float, ...]  # per-frame flux factor
    noise_key: int

    @property
    def split(self) -> str:
        return (
            "validation"
            if self.seed in VALIDATION_SEEDS
            else "heldout"
            if self.seed in HELDOUT_SEEDS
            else "other"
        )

    def labels(self) -> np.ndarray:
        """Per frame: the phase of a plateau frame, RAMP for a ramp frame."""
        out = np.full(self.n_frames, RAMP, np.int64)
        for s in self.segments:
            out[s.start : s.stop] = s.phase
        return out

    def midpoint_labels(self) -> np.ndarray:
        """Per frame: a ramp frame takes the phase it ramps into from its midpoint (weight >= 0.5) on."""
        out = self.labels()
        for prev, s in itertools.pairwise(self.segments):
            for i in range(s.ramp_start, s.start):
                out[i] = s.phase if self._ramp_weight(s, i) >= 0.5 else prev.phase
        return out

    def phase_state(self, phase: int, progress: float) -> Amplitudes:
        a, b = self.phase_amplitudes[phase]
        return a.lerp(b, progress)

    def state(self, i: int) -> Amplitudes:
        """Frame i's amplitudes: its phase at its progress, or a linear mix inside a ramp."""
        for k, s in enumerate(self.segments):
            if s.ramp_start <= i < s.stop:
                if i >= s.start:
                    return self.phase_state(s.phase, (i - s.start) / max(1, s.stop - s.start - 1))
                prev = self.phase_state(self.segments[k - 1].phase, 1.0)
                return prev.lerp(self.phase_state(s.phase, 0.0), self._ramp_weight(s, i))
        raise IndexError(f"frame {i} outside a run of {self.n_frames}")

    def time(self, i: int) -> float:
        return i / max(1, self.n_frames - 1)

    @staticmethod
    def _ramp_weight(s: Segment, i: int) -> float:
        return (i - s.ramp_start + 1) / (s.ramp_frames + 1)


@dataclass(frozen=True)
class IndependentFrame:
    index: int
    image: np.ndarray  # (H, W) counts in the detector's dtype; gaps and bad pixels carry its marker values
    label: int  # phase, or RAMP
    phase: int  # midpoint rule: never RAMP


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _draw_setup(rng: np.random.Generator) -> tuple[Setup, bool]:
    """(the geometry, whether it is SAXS: a long camera; else WAXS: a short one)."""
    det = DETECTORS[int(rng.integers(len(DETECTORS)))]
    h, w = det.shape
    if rng.random() < 0.4:  # near an edge: one coordinate 2-10 % from a side
        near = rng.uniform(0.02, 0.10)
        fr, fc = rng.uniform(0.25, 0.75), (near if rng.random() < 0.5 else 1 - near)
        if rng.random() < 0.5:
            fr, fc = fc, fr
    else:
        fr, fc = rng.uniform(0.25, 0.75, 2)
    saxs = rng.random() < 0.5
    distance = rng.uniform(1.5, 5.0) if saxs else rng.uniform(0.12, 0.35)
    mm = 1e-3 / det.pixel_m
    setup = Setup(
        detector=det,
        beam_rc=(float(fr * (h - 1)), float(fc * (w - 1))),
        distance_m=float(distance),
        wavelength_a=float(rng.uniform(0.7, 1.55)),
        beamstop_px=float(rng.uniform(1.5, 3.0) * mm if saxs else rng.uniform(1.0, 2.0) * mm),
        arm_angle_deg=float(rng.uniform(0, 360)),
        arm_half_width_px=float(rng.uniform(0.5, 1.0) * mm),
    )
    return setup, saxs


def _median_radius_px(setup: Setup) -> float:
    h, w = setup.detector.shape
    r, c = np.mgrid[0:h:8, 0:w:8]
    return float(np.median(np.hypot(r - setup.beam_rc[0], c - setup.beam_rc[1])))


def _draw_material(rng: np.random.Generator, setup: Setup, saxs: bool) -> Material:
    q_ref = float(setup.q_at(_median_radius_px(setup)))
    q_lo = float(setup.q_at(1.3 * setup.beamstop_px))
    lattice = physics.LATTICES[int(rng.integers(len(physics.LATTICES)))]
    first_s = {"fcc": 3, "bcc": 2, "sc": 1}[lattice]
    period = 2 * np.pi / (rng.uniform(0.2, 0.45) * q_ref)
    for _ in range(100):  # first ring apart from the first lamellar order, so the phases do not share a peak
        q_ring = rng.uniform(0.3, 0.6) * q_ref
        if abs(q_ring - 2 * np.pi / period) > 0.08 * q_ref:
            break
    lattice_a = 2 * np.pi * math.sqrt(first_s) / q_ring
    # grains large enough to diffract alone: a few px across (beam footprint, mosaicity along the ring)
    spots = tuple(
        (int(rng.integers(0, 4)), float(rng.uniform(0, 360)), s_rad, s_rad * float(rng.uniform(1.0, 4.0)),
         _log_uniform(rng, 3.0, 20.0))
        for s_rad in rng.uniform(1.5, 4.0, int(rng.integers(15, 51))))  # fmt: skip
    oriented = rng.random() < 0.5
    return Material(
        regime="saxs" if saxs else "waxs",
        q_ref=q_ref,
        flux=_log_uniform(rng, 0.4, 2.5),
        flux_decay=float(rng.uniform(0.0, 0.3)),
        flat=float(rng.uniform(0.3, 3.0) if saxs else rng.uniform(0.5, 4.0)),
        flat_growth=float(rng.uniform(0, 0.6)),
        radius_a=float(4.493 / (rng.uniform(0.25, 0.6) * q_ref)),
        polydispersity=float(rng.uniform(0.05, 0.12)),
        radius_growth=float(rng.uniform(-0.04, 0.08)),
        halo_q=float(rng.uniform(0.5, 0.9) * q_ref),
        halo_width=float(rng.uniform(0.08, 0.15)),
        halo_shift=float(rng.uniform(-0.03, 0.03)),
        disorder_counts=_log_uniform(rng, 300, 3000) if saxs else _log_uniform(rng, 20, 120),
        porod_q=q_lo,
        porod_alpha=float(rng.uniform(3.3, 4.0)),
        porod_counts=_log_uniform(rng, 200, 2000) if saxs else _log_uniform(rng, 20, 200),
        period_a=float(period),
        bilayer_fraction=float(rng.uniform(0.25, 0.45)),
        lamellar_width=float(rng.uniform(0.01, 0.03)),
        period_growth=float(rng.uniform(-0.05, 0.05)),
        orientation_kappa=float(rng.uniform(2, 8)) if oriented else 0.0,
        orientation_chi_deg=float(rng.uniform(0, 180)),
        lamellar_counts=_log_uniform(rng, 80, 400) if saxs else _log_uniform(rng, 30, 150),
        lattice=lattice,
        lattice_a=float(lattice_a),
        lattice_growth=float(rng.uniform(-0.03, 0.02)),
        ring_width=float(rng.uniform(0.004, 0.012)),
        debye_waller_u=float(rng.uniform(0.15, 0.4) / q_ref),
        ring_counts=_log_uniform(rng, 60, 400) if saxs else _log_uniform(rng, 40, 300),
        spots=spots,
    )


def _draw_schedule(rng: np.random.Generator, order: tuple[int, ...], n_frames: int) -> tuple[Segment, ...]:
    n_ph = len(order)
    budget = n_frames - n_ph * MIN_PLATEAU
    if budget < (n_ph - 1) * MIN_RAMP:
        raise ValueError(
            f"a run of {n_ph} phases needs >= {n_ph * MIN_PLATEAU + (n_ph - 1) * MIN_RAMP} frames"
        )
    while True:
        ramps = rng.integers(MIN_RAMP, min(MAX_RAMP, budget) + 1, n_ph - 1)
        if ramps.sum() <= budget:
            break
    spare = budget - int(ramps.sum())
    share = rng.dirichlet(np.full(n_ph, 2.0)) * spare
    plateaus = np.floor(share).astype(int)
    plateaus[np.argsort(plateaus - share)[: spare - plateaus.sum()]] += 1  # largest remainders
    plateaus += MIN_PLATEAU
    segments, pos = [], 0
    for k, phase in enumerate(order):
        ramp = int(ramps[k - 1]) if k else 0
        segments.append(Segment(phase, pos, pos + ramp, pos + ramp + int(plateaus[k])))
        pos = segments[-1].stop
    return tuple(segments)


def _draw_phase_amplitudes(rng: np.random.Generator) -> tuple[tuple[Amplitudes, Amplitudes], ...]:
    dis0, dis1 = (
        Amplitudes(disorder=1.0, porod=1.0),
        Amplitudes(disorder=rng.uniform(0.75, 1.3), porod=rng.uniform(0.8, 1.25)),
    )
    lam0, lam1 = rng.uniform(0.35, 0.7), 1.0
    pd0, pp0 = rng.uniform(0.25, 0.5), rng.uniform(0.4, 0.9)
    pow0 = Amplitudes(disorder=pd0, porod=pp0, rings=rng.uniform(0.45, 0.8))
    pow1 = Amplitudes(disorder=pd0 * rng.uniform(0.7, 1.1), porod=pp0 * rng.uniform(0.8, 1.2), rings=1.0)
    spot0, spot1 = rng.uniform(0.35, 0.7), 1.0

    def plus(a: Amplitudes, **feature: float) -> Amplitudes:
        return Amplitudes(**{**{f.name: getattr(a, f.name) for f in fields(a)}, **feature})

    return (
        (dis0, dis1),
        (plus(dis0, lamellar=lam0), plus(dis1, lamellar=lam1)),
        (pow0, pow1),
        (plus(pow0, spots=spot0), plus(pow1, spots=spot1)),
    )


def draw_run(seed: int, n_frames: int = 120) -> RunSpec:
    """Everything about run `seed` except its pixels (cheap)."""
    # one stream per aspect: changing how one is drawn leaves the others of every seed as they were
    geometry, sample, schedule, phases, beam = (
        np.random.default_rng([_FAMILY_SALT, seed, k]) for k in range(5)
    )
    setup, saxs = _draw_setup(geometry)
    order = ORDERINGS[(7 * seed) % len(ORDERINGS)]  # 7 is coprime to 24: 24 consecutive seeds, 24 orderings
    return RunSpec(
        seed=seed,
        n_frames=n_frames,
        setup=setup,
        material=_draw_material(sample, setup, saxs),
        order=order,
        segments=_draw_schedule(schedule, order, n_frames),
        phase_amplitudes=_draw_phase_amplitudes(phases),
        flicker=tuple(float(v) for v in beam.normal(1.0, 0.02, n_frames)),
        noise_key=int(beam.integers(0, 2**63)),
    )


class Renderer:
    """Frames of one run. Per-pixel geometry is computed once; a frame is 1-D profiles plus one pixel pass."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        st, det = spec.setup, spec.setup.detector
        h, w = det.shape
        dr = (np.arange(h, dtype=np.float32) - np.float32(st.beam_rc[0]))[:, None]
        dc = (np.arange(w, dtype=np.float32) - np.float32(st.beam_rc[1]))[None, :]
        r = np.hypot(dr, dc)
        self._rbin = (r * _RADIAL_BINS_PER_PX).astype(np.int32).reshape(-1)
        chi = np.arctan2(-dr, dc)  # up is +chi, as the detector is seen from the sample
        self._chibin = ((np.degrees(chi) % 360) * (_AZIMUTHAL_BINS / 360)).astype(np.uint16).reshape(-1)
        self._chibin[self._chibin >= _AZIMUTHAL_BINS] = 0
        self._q = st.q_at((np.arange(int(self._rbin.max()) + 1) + 0.5) / _RADIAL_BINS_PER_PX)
        two_theta = np.arctan(r * np.float32(det.pixel_m / st.distance_m))
        # solid angle of a flat pixel ~ cos^3(2 theta); horizontal linear polarisation:
        # 1 - sin^2(2 theta) cos^2(chi)
        factor = np.cos(two_theta) ** 3 * (1 - (np.sin(two_theta) * np.cos(chi)) ** 2)
        arm = np.radians(st.arm_angle_deg)
        along, across = dc * np.cos(arm) - dr * np.sin(arm), dc * np.sin(arm) + dr * np.cos(arm)
        factor[(r <= st.beamstop_px) | ((along >= 0) & (np.abs(across) <= st.arm_half_width_px))] = 0.0
        factor *= det.module_gains()[det.module_index()]  # gaps index the last entry
        self._factor = factor.astype(np.float32).reshape(-1)
        self._status = np.ascontiguousarray(det.pixel_status()).reshape(-1)
        chi_deg = (np.arange(_AZIMUTHAL_BINS) + 0.5) * (360 / _AZIMUTHAL_BINS)
        m = spec.material
        g = np.exp(m.orientation_kappa * np.cos(np.radians(chi_deg - m.orientation_chi_deg)) ** 2)
        self._azimuthal = (g / g.mean()).astype(np.float32)
        self._extra = np.zeros(h * w, np.float32)
        self._spot_windows: list[np.ndarray] = []
        self._labels, self._midpoint = spec.labels(), spec.midpoint_labels()
        # reflections at the starting lattice constant, with margin for the lattice drift; scaled per frame
        self._q_hkl0, self._mult = physics.cubic_reflections(m.lattice, m.lattice_a, 1.1 * float(self._q[-1]))

    def __iter__(self) -> Iterator[IndependentFrame]:
        return (self.frame(i) for i in range(self.spec.n_frames))

    def frame(self, i: int) -> IndependentFrame:
        spec, det = self.spec, self.spec.setup.detector
        iso, radial = self._profiles(spec.state(i), i)
        out = np.empty(det.shape, det.dtype)
        sample_counts(self._rbin, self._chibin, self._factor, iso, radial, self._azimuthal, self._extra,
                      self._status, np.uint64(frame_key(spec.noise_key, i)), det.gap_value, det.bad_value,
                      det.max_count, POISSON_TABLE, out.reshape(-1))  # fmt: skip
        return IndependentFrame(i, out, int(self._labels[i]), int(self._midpoint[i]))

    def expected(self, state: Amplitudes, i: int) -> np.ndarray:
        """(H, W) float32 expected counts of `state` at frame i's time and flux (no noise, gaps 0)."""
        iso, radial = self._profiles(state, i)
        out = np.empty(self.spec.setup.detector.shape, np.float32)
        expected_counts(self._rbin, self._chibin, self._factor, iso, radial, self._azimuthal, self._extra,
                        out.reshape(-1))  # fmt: skip
        out[self.spec.setup.detector.pixel_status() > 0] = 0.0
        return out

    def _profiles(self, a: Amplitudes, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(isotropic, oriented) expected counts per radial bin at frame i; paints the spots into extra."""
        spec, m, st, q = self.spec, self.spec.material, self.spec.setup, self._q
        t = spec.time(i)
        flux = m.flux * (1 - m.flux_decay * t) * spec.flicker[i]
        if m.regime == "saxs":
            disorder = physics.schulz_spheres(q, m.radius_a * (1 + m.radius_growth * t), m.polydispersity)
        else:
            hq = m.halo_q * (1 + m.halo_shift * t)
            disorder = physics.halo(q, hq, m.halo_width * hq)
        iso = a.disorder * m.disorder_counts * disorder
        iso += a.porod * m.porod_counts * physics.porod(q, m.porod_q, m.porod_alpha)
        iso += m.flat * (1 + m.flat_growth * t)
        d = m.period_a * (1 + m.period_growth * t)
        q1 = 2 * np.pi / d
        radial = (
            a.lamellar
            * m.lamellar_counts
            * physics.lamellar(q, d, m.bilayer_fraction, m.lamellar_width * q1 + 1.2 * st.dq_per_px)
        )
        q_hkl = self._q_hkl0 / (1 + m.lattice_growth * t)  # the lattice constant drifts
        form = np.interp(q_hkl, q, disorder) if m.regime == "saxs" else np.ones_like(q_hkl)
        weight = self._mult * form * np.exp(-((m.debye_waller_u * q_hkl) ** 2)) / q_hkl**2
        ring_profile, peaks = physics.rings(q, q_hkl, weight, m.ring_width * q_hkl + 1.2 * st.dq_per_px)
        iso += a.rings * m.ring_counts * ring_profile
        self._paint_spots(a.spots * m.ring_counts, q_hkl, peaks)
        return (flux * iso).astype(np.float32), (flux * radial).astype(np.float32)

    def _paint_spots(self, height: float, q_hkl: np.ndarray, peaks: np.ndarray) -> None:
        for idx in self._spot_windows:
            self._extra[idx] = 0.0
        self._spot_windows = []
        if height <= 0:
            return
        st = self.spec.setup
        h, w = st.detector.shape
        r0, c0 = st.beam_rc
        for ring, chi_deg, s_rad, s_tan, rel in self.spec.material.spots:
            if ring >= len(q_hkl) or peaks[ring] <= 0:
                continue
            rr = float(st.r_at(q_hkl[ring]))
            chi = math.radians(chi_deg)
            cr, cc = r0 - rr * math.sin(chi), c0 + rr * math.cos(chi)
            half = int(4 * max(s_rad, s_tan)) + 1
            rows = np.arange(max(0, int(cr) - half), min(h, int(cr) + half + 2))
            cols = np.arange(max(0, int(cc) - half), min(w, int(cc) + half + 2))
            if rows.size == 0 or cols.size == 0:
                continue  # the spot's part of the ring is off the sensor
            y, x = rows[:, None] - cr, cols[None, :] - cc
            radial = -y * math.sin(chi) + x * math.cos(chi)  # along the ring's radius
            tangential = -y * math.cos(chi) - x * math.sin(chi)
            val = (
                height
                * rel
                * peaks[ring]
                * np.exp(-0.5 * ((radial / s_rad) ** 2 + (tangential / s_tan) ** 2))
            )
            idx = (rows[:, None] * w + cols[None, :]).reshape(-1)
            self._extra[idx] += val.reshape(-1).astype(np.float32)
            self._spot_windows.append(idx)
