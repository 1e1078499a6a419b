"""Synthetic scattering frames: detector geometry, physics of the features, scenario timelines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream.detector import PILATUS3_2M, Detector
from stream.synthetic import (
    GAP_VALUE,
    SATURATION,
    SCENARIOS,
    Arc,
    Flat,
    Peak,
    Renderer,
    ScanGeometry,
    Scene,
    generate_scan,
    generate_training_pairs,
    phase_labels,
    q_map,
)

SMALL = Detector(name="test 2x3", module_shape=(40, 60), modules=(3, 2), gaps=(5, 3))
SCAN_SCENARIOS = [name for name in SCENARIOS if name != "training"]


# --- detector geometry -----------------------------------------------------------------------


def test_pilatus_frame_is_1679_high_and_1475_wide() -> None:
    assert PILATUS3_2M.shape == (1679, 1475)
    assert len(PILATUS3_2M.module_origins()) == 24


def test_pilatus_gaps_are_17_px_between_module_rows_and_7_px_between_module_columns() -> None:
    mask = PILATUS3_2M.gap_mask()
    expected_rows = [r for k in range(1, 8) for r in range(k * 212 - 17, k * 212)]  # 195 px module + 17 gap
    expected_cols = [c for k in range(1, 3) for c in range(k * 494 - 7, k * 494)]  # 487 px module + 7 gap
    assert PILATUS3_2M.gap_rows().tolist() == expected_rows
    assert PILATUS3_2M.gap_columns().tolist() == expected_cols
    assert np.flatnonzero(mask.all(axis=1)).tolist() == expected_rows
    assert np.flatnonzero(mask.all(axis=0)).tolist() == expected_cols
    assert int((~mask).sum()) == 24 * 487 * 195  # every sensitive pixel belongs to a module
    for r0, c0 in PILATUS3_2M.module_origins():
        assert not mask[r0 : r0 + 195, c0 : c0 + 487].any()


def test_gap_mask_is_cached_and_read_only() -> None:
    mask = SMALL.gap_mask()
    assert mask is SMALL.gap_mask()
    with pytest.raises(ValueError):
        mask[0, 0] = True


def test_detector_describes_other_module_grids() -> None:
    assert SMALL.shape == (3 * 40 + 2 * 5, 2 * 60 + 1 * 3)
    assert SMALL.gap_rows().tolist() == [40, 41, 42, 43, 44, 85, 86, 87, 88, 89]
    assert SMALL.gap_columns().tolist() == [60, 61, 62]
    assert SMALL == Detector(name="test 2x3", module_shape=(40, 60), modules=(3, 2), gaps=(5, 3))
    with pytest.raises(ValueError):
        Detector(name="bad", module_shape=(0, 10), modules=(1, 1), gaps=(0, 0))


# --- frames ----------------------------------------------------------------------------------


def test_frames_are_int32_counts_with_gaps_at_minus_one() -> None:
    frame = next(generate_scan("film_formation", 1, seed=2))
    gaps = PILATUS3_2M.gap_mask()
    assert frame.image.dtype == np.int32 and frame.image.shape == PILATUS3_2M.shape
    assert (frame.image[gaps] == GAP_VALUE).all()
    sensitive = frame.image[~gaps]
    assert sensitive.min() >= 0 and sensitive.max() <= SATURATION
    assert sensitive.mean() > 1.0  # real counts, not an empty frame


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_scenario_renders_on_a_small_detector(scenario: str) -> None:
    frames = list(generate_scan(scenario, 3, seed=1, detector=SMALL, frame_period_s=0.5))
    for i, f in enumerate(frames):
        assert f.image.shape == SMALL.shape and f.image.dtype == np.int32
        assert (f.image[SMALL.gap_mask()] == GAP_VALUE).all()
        assert (f.image[~SMALL.gap_mask()] >= 0).all()
        assert f.index == i and f.t == pytest.approx(0.5 * i)
        assert f.phase_name == SCENARIOS[scenario].phases[f.phase]


def test_same_seed_gives_identical_scans() -> None:
    a = list(generate_scan("crystallization", 4, seed=7, detector=SMALL))
    b = list(generate_scan("crystallization", 4, seed=7, detector=SMALL))
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_array_equal(fa.image, fb.image)
        assert (fa.phase, fa.geometry) == (fb.phase, fb.geometry)


def test_different_seeds_give_different_frames_and_nuisance() -> None:
    frames = [next(generate_scan("shear_alignment", 1, seed=s)) for s in range(4)]
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            assert not np.array_equal(frames[i].image, frames[j].image)
    # beam centre, flux and so on are redrawn per seed: held-out seeds are unseen geometries
    assert len({(f.geometry.beam_center, f.geometry.flux) for f in frames}) == 4


def test_consecutive_frames_have_independent_noise() -> None:
    a, b = list(generate_scan("crystallization", 2, seed=0, detector=SMALL))
    sensitive = ~SMALL.gap_mask()
    assert not np.array_equal(a.image[sensitive], b.image[sensitive])


def test_unknown_scenario_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        generate_scan("nope", 3)  # at the call, before iterating
    for name in SCENARIOS:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        generate_scan("film_formation", -1)
    assert list(generate_scan("film_formation", 0)) == []


# --- physics ---------------------------------------------------------------------------------


def _geometry(**kw: object) -> ScanGeometry:
    base: dict[str, object] = {"distance_m": 2.0, "wavelength_a": 1.24, "beam_center": (900, 700)}
    return ScanGeometry(**{**base, "beamstop_radius_px": 10.0, **kw})  # type: ignore[arg-type]


def _masked_mean(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean over sensitive pixels (>= 0) along an axis; NaN where a line is all gap."""
    ok = (image >= 0) & (image < HOT)
    n = ok.sum(axis=axis)
    total = np.where(ok, image, 0).sum(axis=axis, dtype=float)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


# Analysis masks gaps and hot pixels (constant 1e3..1e6 counts), as a beamline's mask would;
# no scattering feature in these scenarios reaches this level away from the beamstop.
HOT = 2000


def _radial_profile(image: np.ndarray, q: np.ndarray, edges: np.ndarray) -> np.ndarray:
    ok = (image >= 0) & (image < HOT)
    idx = np.digitize(q[ok], edges) - 1
    inside = (idx >= 0) & (idx < edges.size - 1)
    sums = np.bincount(idx[inside], weights=image[ok][inside], minlength=edges.size - 1)
    counts = np.bincount(idx[inside], minlength=edges.size - 1)
    return sums / np.maximum(counts, 1)


@pytest.mark.parametrize("q0", [0.05, 0.1, 0.15])
def test_ring_radial_peak_is_at_its_q(q0: float) -> None:
    geometry = _geometry()
    image = Renderer().render(Scene((Peak(q0, 0.002, 500.0), Flat(1.0))), geometry, seed=1, index=0)
    assert image.max() < HOT
    q = q_map(PILATUS3_2M, geometry)
    edges = np.arange(0.02, 0.2, 0.0005)
    profile = _radial_profile(image, q, edges)
    peak_q = 0.5 * (edges[:-1] + edges[1:])[np.argmax(profile)]
    assert peak_q == pytest.approx(q0, abs=0.0005)
    assert profile.max() > 300.0  # ~500 counts, less the solid-angle fall-off


def test_ring_q_follows_distance_and_wavelength() -> None:
    # Same ring at a longer distance / shorter wavelength sits at a larger radius: q, not pixels.
    renderer = Renderer()
    for distance, wavelength in [(1.0, 1.24), (3.0, 1.24), (2.0, 0.8)]:
        g = _geometry(distance_m=distance, wavelength_a=wavelength)
        image = renderer.render(Scene((Peak(0.06, 0.001, 800.0),)), g, seed=0, index=0)
        r_px = math.hypot(
            *(
                np.unravel_index(np.argmax(np.where(image > 5000, 0, image)), image.shape)
                - np.array(g.beam_center)
            )
        )
        two_theta = 2.0 * math.asin(0.06 * wavelength / (4.0 * math.pi))
        expected_px = distance * math.tan(two_theta) / PILATUS3_2M.pixel_size_m
        assert r_px == pytest.approx(expected_px, abs=2.5)


def test_arc_is_brightest_along_its_orientation_and_opposite() -> None:
    geometry = _geometry()
    scene = Scene((Arc(0.08, 0.003, 400.0, chi0=30.0, chi_sigma=8.0, fold=2),))
    image = Renderer().render(scene, geometry, seed=3, index=0)
    rows, cols = np.indices(image.shape)
    chi = np.degrees(np.arctan2(-(rows - 900), cols - 700)) % 360.0
    ring = np.abs(q_map(PILATUS3_2M, geometry) - 0.08) < 0.003
    sectors = np.array([image[ring & (np.abs(chi - c) < 5) & (image >= 0)].mean() for c in range(5, 360, 10)])
    brightest = set(np.argsort(sectors)[-2:] * 10 + 5)
    assert brightest == {25, 205} or brightest == {35, 215} or brightest <= {25, 35, 205, 215}
    assert sectors.max() > 20 * np.median(sectors)


def test_wide_angle_scattering_is_weaker_along_the_horizontal_polarisation() -> None:
    g = _geometry(distance_m=0.3, beam_center=(900, 737), beamstop_radius_px=0.0, arm_half_width_px=0.0)
    image = Renderer().render(Scene((Flat(400.0),)), g, seed=2, index=0)
    r_px = 500  # 2 theta = atan(500 * 172 um / 0.3 m) = 16 degrees
    sin2 = math.sin(math.atan(r_px * PILATUS3_2M.pixel_size_m / g.distance_m)) ** 2
    horizontal = image[895:906, 737 + r_px - 5 : 737 + r_px + 6]  # chi = 0
    vertical = image[900 - r_px - 5 : 900 - r_px + 6, 732:743]  # chi = 90, same radius
    assert (horizontal >= 0).all() and (vertical >= 0).all()  # both patches on sensitive pixels
    ratio = horizontal.mean() / vertical.mean()
    assert ratio == pytest.approx(1.0 - sin2, abs=0.02)


def test_beamstop_and_arm_block_the_direct_beam() -> None:
    geometry = _geometry(arm_angle_deg=90.0, arm_half_width_px=4.0)
    image = Renderer().render(Scene((Flat(200.0),)), geometry, seed=0, index=0)
    r, c = geometry.beam_center
    assert image[r - 5 : r + 5, c - 5 : c + 5].max() <= 3  # behind the beamstop
    arm = image[5 : r - 20, c - 2 : c + 3]
    arm = arm[arm >= 0]
    assert arm.mean() < 1.0  # the arm runs up to the top edge
    assert image[r + 50 : r + 60, c - 2 : c + 3].mean() > 150  # but not down


def test_grazing_incidence_has_horizon_shadow_and_yoneda_band_at_the_critical_angle() -> None:
    g = _geometry(
        distance_m=3.0,
        beam_center=(1500, 700),
        alpha_i_deg=0.15,
        alpha_c_deg=0.1,
        beamstop_radius_px=5.0,
        arm_half_width_px=0.0,
    )
    image = Renderer().render(Scene((Flat(100.0),)), g, seed=0, index=0)[:, 100:600]
    rows = _masked_mean(image, axis=1)
    horizon = g.horizon_row(PILATUS3_2M.pixel_size_m)
    yoneda = horizon - 3.0 * math.tan(math.radians(0.1)) / PILATUS3_2M.pixel_size_m
    assert np.nanmax(rows[int(horizon) + 3 : int(horizon) + 40]) < 2.0  # sample shadow below horizon
    band = int(np.nanargmax(rows[: int(horizon)]))
    assert band == pytest.approx(yoneda, abs=2)
    assert rows[band] > 2.5 * np.nanmean(rows[100:200])  # |T|^2 peaks near 4 at alpha_c


@pytest.mark.parametrize("lam", [0.3, 3.0, 7.77, 15.99, 16.0, 40.0, 500.0])
def test_counts_follow_poisson_statistics(lam: float) -> None:
    # Far detector: flat illumination within 1e-6, so every pixel has the same expected count.
    g = _geometry(distance_m=1000.0, beamstop_radius_px=0.0, arm_half_width_px=0.0)
    image = Renderer().render(Scene((Flat(lam),)), g, seed=11, index=5)
    counts = image[~PILATUS3_2M.gap_mask()].astype(float)
    n = counts.size
    assert counts.mean() == pytest.approx(lam, abs=5 * math.sqrt(lam / n))
    assert counts.var() == pytest.approx(lam, rel=0.02)
    assert (counts == 0).mean() == pytest.approx(math.exp(-lam), abs=5 * math.sqrt(math.exp(-lam) / n) + 1e-6)
    # the whole distribution, not just its moments: every count's frequency within 5 sigma of the pmf
    ks = np.arange(int(lam + 4 * math.sqrt(lam)) + 1)
    pmf = np.exp(ks * math.log(lam) - lam - np.array([math.lgamma(k + 1.0) for k in ks]))
    freq = np.bincount(counts.astype(np.int64), minlength=ks.size)[: ks.size] / n
    np.testing.assert_array_less(np.abs(freq - pmf), 5 * np.sqrt(pmf / n) + 1e-5)


def test_hot_pixels_keep_their_counts_and_dead_pixels_read_zero() -> None:
    g = _geometry(beamstop_radius_px=0.0, arm_half_width_px=0.0)
    hot = (np.array([10, 20_000]), np.array([250_000, 4_000], dtype=np.int32))
    dead = np.array([30_000, 40_000])
    image = Renderer().render(Scene((Flat(50.0),)), g, seed=0, index=0, hot=hot, dead=dead).reshape(-1)
    assert image[hot[0]].tolist() == [250_000, 4_000]
    assert image[dead].tolist() == [0, 0]


def test_bright_pixels_saturate_at_the_20_bit_counter_depth() -> None:
    g = _geometry(beam_center=(10, 10), beamstop_radius_px=0.0, arm_half_width_px=0.0)
    image = Renderer(SMALL).render(Scene((Flat(5e6),)), g, seed=0, index=0)
    assert image[~SMALL.gap_mask()].max() == SATURATION


# --- scenarios -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCAN_SCENARIOS)
def test_phases_follow_the_documented_order(scenario: str) -> None:
    spec = SCENARIOS[scenario]
    n = 40
    labels = [f.phase for f in generate_scan(scenario, n, seed=4, detector=SMALL)]
    assert labels == phase_labels(scenario, n)
    assert labels == sorted(labels)  # never goes back
    assert sorted(set(labels)) == list(range(len(spec.phases)))  # every phase appears
    for k, b in enumerate(spec.boundaries, start=1):
        assert labels.index(k) == math.ceil(b * n)  # and starts where promised


def test_training_mode_samples_every_phase_of_every_scenario() -> None:
    spec = SCENARIOS["training"]
    frames = list(generate_scan("training", 60, seed=5, detector=SMALL))
    assert {f.phase for f in frames} == set(range(len(spec.phases)))
    assert all(f.phase_name == spec.phases[f.phase] for f in frames)
    assert len({f.geometry.beam_center for f in frames}) > 10  # nuisance redrawn per frame


def test_training_pairs_share_the_state_and_redraw_the_nuisance_per_view() -> None:
    pairs = list(generate_training_pairs(12, seed=3, detector=SMALL))
    assert all(a.phase == b.phase and a.phase_name == b.phase_name for a, b in pairs)
    assert len({a.phase for a, _ in pairs}) > 3
    assert all(a.geometry.flux != b.geometry.flux for a, b in pairs)
    assert any(a.geometry.beam_center != b.geometry.beam_center for a, b in pairs)
    again = list(generate_training_pairs(12, seed=3, detector=SMALL))
    assert all(np.array_equal(a.image, c.image) and np.array_equal(b.image, d.image)
               for (a, b), (c, d) in zip(pairs, again, strict=True))


def _sector_profile(frame, q_lo: float, q_hi: float) -> np.ndarray:
    """Mean counts in 10-degree azimuthal sectors of the annulus q_lo..q_hi."""
    g = frame.geometry
    q = q_map(PILATUS3_2M, g)
    rows, cols = np.indices(frame.image.shape)
    chi = np.degrees(np.arctan2(-(rows - g.beam_center[0]), cols - g.beam_center[1])) % 360.0
    ok = (q > q_lo) & (q < q_hi) & (frame.image >= 0) & (frame.image < HOT)
    sector = (chi[ok] // 10).astype(int)
    sums = np.bincount(sector, weights=frame.image[ok], minlength=36)
    counts = np.bincount(sector, minlength=36)
    return sums / np.maximum(counts, 1)


def _peakiness(frame, q_lo: float, q_hi: float) -> float:
    """Sharp-ring signal: largest excess of the fine radial profile over its running median."""
    q = q_map(PILATUS3_2M, frame.geometry)
    edges = np.arange(q_lo, q_hi, 0.004)
    profile = _radial_profile(frame.image, q, edges)
    smooth = np.array([np.median(profile[max(0, i - 6) : i + 7]) for i in range(profile.size)])
    return float(np.max(profile - smooth) / np.median(smooth))


def _rod_contrast(frame) -> float:
    """Column contrast above the GISAXS horizon: q_y = q* (first-order rod) vs 1.5 q*."""
    g = frame.geometry
    horizon = int(g.horizon_row(PILATUS3_2M.pixel_size_m))
    cols = _masked_mean(frame.image[horizon - 250 : horizon - 60], axis=0)
    k0 = 2 * math.pi / g.wavelength_a
    qy = k0 * np.sin(
        np.arctan((np.arange(cols.size) - g.beam_center[1]) * PILATUS3_2M.pixel_size_m / g.distance_m)
    )

    def near(q: float) -> float:
        return float(np.nanmean(cols[np.abs(np.abs(qy) - q) < 0.0008]))

    return max(near(q) for q in np.arange(0.020, 0.024, 0.0002)) / near(0.033)


def _film_arch(frame) -> float:
    sectors = _sector_profile(frame, 0.095, 0.125)
    return float(sectors.max() / np.median(sectors))


def _film_ionomer(frame) -> float:
    q = q_map(PILATUS3_2M, frame.geometry)
    edges = np.array([0.2, 0.22, 0.3, 0.36])
    prof = _radial_profile(frame.image, q, edges)
    return float(prof[1] / (0.5 * (prof[0] + prof[2])))


def _anisotropy(frame) -> float:
    sectors = _sector_profile(frame, 0.040, 0.050)
    return float(sectors.max() / sectors.min())


# (scenario, boundary number, measure, minimum jump factor after/before)
NEW_PHASE_SIGNATURES = [
    ("film_formation", 0, _film_arch, 1.3),
    ("film_formation", 1, _film_ionomer, 1.6),
    ("crystallization", 0, lambda f: _peakiness(f, 0.95, 1.98), 10.0),
    ("gisaxs_ordering", 0, _rod_contrast, 4.0),
    ("shear_alignment", 0, _anisotropy, 2.0),
]


@pytest.mark.parametrize(
    ("scenario", "boundary", "measure", "jump"),
    NEW_PHASE_SIGNATURES,
    ids=[f"{s}-{b}" for s, b, *_ in NEW_PHASE_SIGNATURES],
)
def test_new_phase_appears_where_promised(scenario: str, boundary: int, measure, jump: float) -> None:
    n = 24
    b = SCENARIOS[scenario].boundaries[boundary] * n
    before, after = math.floor(b) - 3, math.ceil(b) + 3
    frames = {f.index: f for f in generate_scan(scenario, n, seed=9) if f.index in (before, after)}
    assert frames[before].phase == boundary and frames[after].phase == boundary + 1
    assert measure(frames[after]) > jump * measure(frames[before])
