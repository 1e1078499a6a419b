"""Scattering scenes and their rendering onto a detector.

A `Scene` is a list of scattering components (rings, arcs, halos, Porod background, GISAXS rods,
spots) in physical units (q in 1/Angstrom, angles in degrees, amplitudes in expected counts per
pixel at unit flux). A `ScanGeometry` says where the sample sits relative to the detector
(distance, wavelength, beam centre, beamstop, grazing incidence). `Renderer` turns the two into
int32 detector frames with Poisson counting noise, hot/dead pixels, 20-bit saturation and gaps.

Speed: the polar coordinates of every pixel are precomputed once per detector on a canvas twice
the detector's size, so any integer beam centre is a view into it (beam-centre jitter is free).
Per frame only 1-D tables are evaluated (radial profile on 0.5 px radius bins, azimuthal profile on
0.5 degree bins, per-row and per-column GISAXS terms); the per-pixel work is two lookups and the
Poisson draw, in numba kernels (see _kernels.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from stream.detector import PILATUS3_2M, Detector
from stream.synthetic._kernels import (
    POISSON_CDF,
    POISSON_GUIDE,
    Z_TABLE,
    draw_counts,
    frame_key,
    render_expected,
)

RADIAL_BINS_PER_PX = 2  # radial table resolution: 0.5 px, finer than any ring we draw
AZIMUTH_BINS = 720  # 0.5 degree azimuthal table resolution


# --------------------------------------------------------------------------------------------
# Components. Every one has an `amplitude` (expected counts per pixel at unit flux) so that a
# scene can be scaled and two scenes cross-faded by scaling their components.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """Isotropic radial peak (Debye-Scherrer ring when narrow, diffuse halo when broad).

    Pseudo-Voigt in q: (1-eta) Gaussian(sigma) + eta Lorentzian of the same FWHM, height `amplitude`.
    q0 = 0 with eta = 1 is an Ornstein-Zernike diffuse halo around the beam.
    """

    q0: float
    sigma: float
    amplitude: float
    eta: float = 0.0

    def radial(self, q: np.ndarray) -> np.ndarray:
        return self.amplitude * _pseudo_voigt(q - self.q0, self.sigma, self.eta)


@dataclass(frozen=True)
class Arc:
    """Anisotropic ring segment(s): a radial pseudo-Voigt times an azimuthal Gaussian.

    chi0: centre azimuth in degrees (0 = +x to the right, 90 = up); chi_sigma: azimuthal width
    (degrees); fold: number of equally spaced copies around the ring (2 for the centrosymmetric
    pairs of transmission scattering, 1 for a single arch).
    """

    q0: float
    sigma: float
    amplitude: float
    chi0: float
    chi_sigma: float
    eta: float = 0.0
    fold: int = 2

    def radial(self, q: np.ndarray) -> np.ndarray:
        return self.amplitude * _pseudo_voigt(q - self.q0, self.sigma, self.eta)

    def azimuthal(self, chi_deg: np.ndarray) -> np.ndarray:
        out = np.zeros_like(chi_deg)
        for m in range(self.fold):
            d = (chi_deg - self.chi0 - m * 360.0 / self.fold + 180.0) % 360.0 - 180.0
            out += np.exp(-0.5 * (d / self.chi_sigma) ** 2)
        return out


@dataclass(frozen=True)
class Porod:
    """Low-q background: plateau `amplitude` below q_c, falling as q^-4 (Porod's law) above."""

    amplitude: float
    q_c: float

    def radial(self, q: np.ndarray) -> np.ndarray:
        return self.amplitude / (1.0 + (q / self.q_c) ** 4)


@dataclass(frozen=True)
class Flat:
    """q-independent background (fluorescence, air and window scattering)."""

    amplitude: float

    def radial(self, q: np.ndarray) -> np.ndarray:
        return np.full_like(q, self.amplitude)


@dataclass(frozen=True)
class Rods:
    """GISAXS Bragg rods of a laterally ordered film: streaks along q_z at q_y = +-m * q_spacing.

    Order m has height amplitude / m**2 and Lorentzian half-width sigma_qy; intensity falls along
    q_z as 1 / (1 + (q_z / qz_decay)^2) (vertical form factor of the film).
    """

    q_spacing: float
    sigma_qy: float
    amplitude: float
    orders: int = 3
    qz_decay: float = 0.08

    def columns(self, qy: np.ndarray) -> np.ndarray:
        out = np.zeros_like(qy)
        for m in range(1, self.orders + 1):
            for sign in (-1.0, 1.0):
                out += (self.amplitude / m**2) / (
                    1.0 + ((qy - sign * m * self.q_spacing) / self.sigma_qy) ** 2
                )
        return out

    def rows(self, qz: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + (qz / self.qz_decay) ** 2)


@dataclass(frozen=True)
class Spot:
    """A small 2-D Gaussian at a pixel offset from the beam centre (e.g. the GISAXS specular beam)."""

    d_row: float
    d_col: float
    sigma_px: float
    amplitude: float


Component = Peak | Arc | Porod | Flat | Rods | Spot


@dataclass(frozen=True)
class Scene:
    """What the sample scatters: a tuple of components, at unit flux."""

    components: tuple[Component, ...]

    def scaled(self, factor: float) -> Scene:
        return Scene(tuple(replace(c, amplitude=c.amplitude * factor) for c in self.components))

    @staticmethod
    def blend(a: Scene, b: Scene, w: float) -> Scene:
        """Phase coexistence: volume fractions (1 - w) of `a` and w of `b` scatter incoherently."""
        if w <= 0.0:
            return a
        if w >= 1.0:
            return b
        return Scene(a.scaled(1.0 - w).components + b.scaled(w).components)


@dataclass(frozen=True)
class ScanGeometry:
    """Sample-detector geometry of a scan.

    beam_center: (row, col) of the direct beam in pixels (integers: jitter is whole pixels).
    Beamstop: a disc of `beamstop_radius_px` on the beam with an arm of half-width
    `arm_half_width_px` towards azimuth `arm_angle_deg` (0 = right, 90 = up), transmitting
    `beamstop_transmission` of the intensity. For grazing incidence, `alpha_i_deg` is the incidence
    angle and `alpha_c_deg` the film's critical angle; the sample horizon is alpha_i above the beam.
    """

    distance_m: float
    wavelength_a: float
    beam_center: tuple[int, int]
    beamstop_radius_px: float = 15.0
    arm_angle_deg: float = 90.0
    arm_half_width_px: float = 5.0
    beamstop_transmission: float = 1e-4
    alpha_i_deg: float | None = None
    alpha_c_deg: float = 0.1
    flux: float = 1.0  # multiplies every component (exposure time x beam current)

    @property
    def grazing(self) -> bool:
        return self.alpha_i_deg is not None

    def horizon_row(self, pixel_size_m: float) -> float:
        """Row of the sample horizon (grazing incidence only)."""
        if self.alpha_i_deg is None:
            raise ValueError("horizon is defined only for grazing incidence")
        return self.beam_center[0] - self.distance_m * math.tan(math.radians(self.alpha_i_deg)) / pixel_size_m


def q_of_radius(r_m: np.ndarray | float, geometry: ScanGeometry) -> np.ndarray:
    """Momentum transfer q = 4 pi sin(theta) / lambda (1/Angstrom) at radius r (m) from the beam."""
    two_theta = np.arctan(np.asarray(r_m, dtype=np.float64) / geometry.distance_m)
    return 4.0 * np.pi * np.sin(two_theta / 2.0) / geometry.wavelength_a


def q_map(detector: Detector, geometry: ScanGeometry) -> np.ndarray:
    """q (1/Angstrom) at every pixel centre, (H, W) float64. Independent of the renderer's tables."""
    h, w = detector.shape
    rows = (np.arange(h) - geometry.beam_center[0]) * detector.pixel_size_m
    cols = (np.arange(w) - geometry.beam_center[1]) * detector.pixel_size_m
    return q_of_radius(np.hypot(rows[:, None], cols[None, :]), geometry)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PolarCanvas:
    """Radial/azimuthal bin index of every pixel on a (2H-1, 2W-1) canvas centred on its middle."""

    rbin: np.ndarray  # uint16, radius * RADIAL_BINS_PER_PX, rounded
    chibin: np.ndarray  # uint16, azimuth in AZIMUTH_BINS bins, 0 = +x, counter-clockwise (up)
    n_rbins: int


@lru_cache(maxsize=4)
def _polar_canvas(shape: tuple[int, int]) -> _PolarCanvas:
    # A memo of a pure function of the frame shape; the arrays are read-only.
    h, w = shape
    # One quadrant (|dy|, |dx|) holds every radius and every angle modulo reflection: compute it
    # once and mirror it into the four quadrants (4x fewer hypot/arctan2 evaluations).
    ady = np.arange(h, dtype=np.float32)[:, None]
    adx = np.arange(w, dtype=np.float32)[None, :]
    quad_r = np.rint(np.hypot(ady, adx) * RADIAL_BINS_PER_PX).astype(np.uint16)
    quad_a = np.degrees(np.arctan2(ady, adx))  # 0..90 degrees from the +x axis
    rbin = np.empty((2 * h - 1, 2 * w - 1), dtype=np.uint16)
    chi = np.empty((2 * h - 1, 2 * w - 1), dtype=np.float32)
    cy, cx = h - 1, w - 1  # canvas centre; rows grow downwards, chi counter-clockwise from +x
    for flip_y, flip_x, angle in (
        (True, False, quad_a),  # up-right
        (True, True, 180.0 - quad_a),  # up-left
        (False, True, 180.0 + quad_a),  # down-left
        (False, False, (360.0 - quad_a) % 360.0),  # down-right
    ):
        rows = slice(cy, None, -1) if flip_y else slice(cy, None)
        cols = slice(cx, None, -1) if flip_x else slice(cx, None)
        rbin[rows, cols] = quad_r
        chi[rows, cols] = angle
    chibin = (chi * (AZIMUTH_BINS / 360.0)).astype(np.uint16)
    np.minimum(chibin, AZIMUTH_BINS - 1, out=chibin)
    rbin.flags.writeable = False
    chibin.flags.writeable = False
    return _PolarCanvas(rbin=rbin, chibin=chibin, n_rbins=int(quad_r.max()) + 1)


@dataclass
class Renderer:
    """Renders scenes onto one detector. Not thread-safe (reuses a scratch buffer); cheap to create
    after the first one per detector shape (the polar canvas is shared, read-only)."""

    detector: Detector = PILATUS3_2M
    _canvas: _PolarCanvas = field(init=False, repr=False)
    _lam: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        h, w = self.detector.shape
        if 2 * max(h, w) * RADIAL_BINS_PER_PX >= np.iinfo(np.uint16).max:
            raise ValueError(f"detector {self.detector.name} too large for 16-bit radial bins")
        self._canvas = _polar_canvas(self.detector.shape)
        self._lam = np.empty(self.detector.shape, dtype=np.float32)
        r_px = np.arange(self._canvas.n_rbins, dtype=np.float64) / RADIAL_BINS_PER_PX
        self._r_m = r_px * self.detector.pixel_size_m
        self._chi_deg = (np.arange(AZIMUTH_BINS) + 0.5) * (360.0 / AZIMUTH_BINS)

    def expected(self, scene: Scene, geometry: ScanGeometry) -> np.ndarray:
        """Expected counts per pixel (float32, (H, W)), before noise and detector defects.

        Returns the renderer's scratch buffer: copy it if you keep it past the next call.
        """
        det = self.detector
        h, w = det.shape
        brow, bcol = geometry.beam_center
        if not (0 <= brow < h and 0 <= bcol < w):
            raise ValueError(f"beam centre {geometry.beam_center} outside the {h}x{w} detector")
        q = q_of_radius(self._r_m, geometry)
        # Solid angle of a flat pixel falls as cos^3(2 theta); same factor for every component.
        solid = np.cos(np.arctan(self._r_m / geometry.distance_m)) ** 3 * geometry.flux
        iso = np.zeros_like(q)
        arcs_r: list[np.ndarray] = []
        arcs_a: list[np.ndarray] = []
        cart_c: list[np.ndarray] = []
        cart_r: list[np.ndarray] = []
        spots: list[Spot] = []
        qy_cols = qz_rows = None
        for comp in scene.components:
            if comp.amplitude == 0.0:
                continue
            if isinstance(comp, Arc):
                arcs_r.append(comp.radial(q) * solid)
                arcs_a.append(comp.azimuthal(self._chi_deg))
            elif isinstance(comp, Rods):
                if qy_cols is None:
                    qy_cols, qz_rows = self._grazing_q(geometry)
                cart_c.append(comp.columns(qy_cols) * geometry.flux)
                cart_r.append(comp.rows(qz_rows))
            elif isinstance(comp, Spot):
                spots.append(comp)
            else:
                iso += comp.radial(q)
        iso *= solid
        # Synchrotron beams are polarised in the horizontal plane: scattering is weakened by
        # 1 - sin^2(2 theta) cos^2(chi). Separable, so it is one more anisotropic term; only
        # worth its cost at wide angles (below 2 theta ~ 2 degrees it is < 0.1 %).
        sin2_2theta = np.sin(np.arctan(self._r_m / geometry.distance_m)) ** 2
        if sin2_2theta[min(len(sin2_2theta) - 1, 2 * max(h, w))] > 1e-3:
            arcs_r.append(-iso * sin2_2theta)
            arcs_a.append(np.cos(np.radians(self._chi_deg)) ** 2)
        rowfac = self._row_factor(geometry)
        off_r, off_c = h - 1 - brow, w - 1 - bcol  # the detector's window on the polar canvas
        rb = self._canvas.rbin[off_r : off_r + h, off_c : off_c + w]
        cb = self._canvas.chibin[off_r : off_r + h, off_c : off_c + w]
        arm = math.radians(geometry.arm_angle_deg)
        render_expected(
            rb,
            cb,
            iso.astype(np.float32),
            _stack(arcs_r, q.size),
            _stack(arcs_a, AZIMUTH_BINS),
            _stack(cart_c, w),
            _stack(cart_r, h),
            rowfac,
            float(brow),
            float(bcol),
            float(geometry.beamstop_radius_px),
            math.cos(arm),
            math.sin(arm),
            float(geometry.arm_half_width_px),
            float(geometry.beamstop_transmission),
            self._lam,
        )
        for spot in spots:
            self._add_spot(spot, geometry)
        return self._lam

    def render(
        self,
        scene: Scene,
        geometry: ScanGeometry,
        *,
        seed: int,
        index: int,
        hot: tuple[np.ndarray, np.ndarray] | None = None,
        dead: np.ndarray | None = None,
    ) -> np.ndarray:
        """A detector frame: int32 (H, W) Poisson counts, saturating at 2**20 - 1, gaps = -1.

        Noise depends only on (seed, index). hot = (flat pixel indices, counts) of hot pixels,
        dead = flat indices of dead pixels (always 0 counts).
        """
        lam = self.expected(scene, geometry)
        out = np.empty(self.detector.shape, dtype=np.int32)
        draw_counts(
            lam, frame_key(seed, index), self.detector.gap_mask(), POISSON_CDF, POISSON_GUIDE, Z_TABLE, out
        )
        flat = out.reshape(-1)
        if hot is not None:
            flat[hot[0]] = hot[1]
        if dead is not None:
            flat[dead] = 0
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _grazing_q(self, g: ScanGeometry) -> tuple[np.ndarray, np.ndarray]:
        """(q_y per column, q_z per row) for grazing incidence, in 1/Angstrom."""
        h, w = self.detector.shape
        p, k0 = self.detector.pixel_size_m, 2.0 * np.pi / g.wavelength_a
        two_theta_f = np.arctan((np.arange(w) - g.beam_center[1]) * p / g.distance_m)
        alpha_i = math.radians(g.alpha_i_deg or 0.0)
        alpha_f = np.arctan((g.beam_center[0] - np.arange(h)) * p / g.distance_m) - alpha_i
        qy = k0 * np.sin(two_theta_f)
        qz = k0 * (np.sin(alpha_f) + math.sin(alpha_i))
        return qy, np.where(alpha_f > 0.0, qz, 0.0)

    def _row_factor(self, g: ScanGeometry) -> np.ndarray:
        """Per-row intensity factor: 1 in transmission; for grazing incidence the Fresnel
        transmission |T(alpha_f)|^2 (peaks at the critical angle: the Yoneda band) above the
        sample horizon and the sample's shadow below it."""
        h = self.detector.shape[0]
        if not g.grazing:
            return np.ones(h, dtype=np.float32)
        p = self.detector.pixel_size_m
        alpha_i = math.radians(g.alpha_i_deg or 0.0)
        alpha_f = np.arctan((g.beam_center[0] - np.arange(h)) * p / g.distance_m) - alpha_i
        sin_c2 = math.sin(math.radians(g.alpha_c_deg)) ** 2
        beta = 0.02 * sin_c2  # small absorption keeps |T|^2 finite (~4) at the critical angle
        s = np.sin(np.clip(alpha_f, 0.0, None))
        t = 2.0 * s / (s + np.sqrt(s.astype(np.complex128) ** 2 - sin_c2 + 2j * beta))
        above = np.abs(t) ** 2
        # The film shadows everything below its horizon; soften the edge over ~1 px.
        edge = 1.0 / (1.0 + np.exp(-alpha_f / (0.7 * p / g.distance_m)))
        shadow = 2e-3
        return (shadow + (above - shadow) * edge).astype(np.float32)

    def _add_spot(self, spot: Spot, g: ScanGeometry) -> None:
        h, w = self.detector.shape
        r0 = g.beam_center[0] + spot.d_row
        c0 = g.beam_center[1] + spot.d_col
        half = math.ceil(4 * spot.sigma_px)
        r_lo, r_hi = max(0, int(r0) - half), min(h, int(r0) + half + 1)
        c_lo, c_hi = max(0, int(c0) - half), min(w, int(c0) + half + 1)
        if r_lo >= r_hi or c_lo >= c_hi:
            return
        rr = np.arange(r_lo, r_hi)[:, None] - r0
        cc = np.arange(c_lo, c_hi)[None, :] - c0
        patch = spot.amplitude * g.flux * np.exp(-0.5 * (rr**2 + cc**2) / spot.sigma_px**2)
        self._lam[r_lo:r_hi, c_lo:c_hi] += patch.astype(np.float32)


def _pseudo_voigt(dq: np.ndarray, sigma: float, eta: float) -> np.ndarray:
    gauss = np.exp(-0.5 * (dq / sigma) ** 2)
    if eta <= 0.0:
        return gauss
    hwhm = sigma * math.sqrt(2.0 * math.log(2.0))
    return (1.0 - eta) * gauss + eta / (1.0 + (dq / hwhm) ** 2)


def _stack(rows: list[np.ndarray], n: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, n), dtype=np.float32)
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)

