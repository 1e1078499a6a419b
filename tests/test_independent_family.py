"""The independent family: deterministic runs, honest labels, every ordering, real detector frames."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from operators.preprocess import PreprocessSpec
from stream.independent import (
    EIGER2_4M,
    HELDOUT_SEEDS,
    MAX_RAMP,
    MIN_PLATEAU,
    MIN_RAMP,
    PHASES,
    PILATUS_1M,
    RAMP,
    VALIDATION_SEEDS,
    DetectorGeometry,
    Renderer,
    RunSpec,
    draw_run,
)
from stream.independent._kernel import POISSON_TABLE, poisson_counts
from stream.independent.runs import DISORDERED, LAMELLAR, POWDER, TEXTURED

ALL_SEEDS = (*VALIDATION_SEEDS, *HELDOUT_SEEDS)


def _seed_on(detector: DetectorGeometry) -> int:
    return next(s for s in VALIDATION_SEEDS if draw_run(s).setup.detector == detector)


@pytest.fixture(scope="module")
def pilatus() -> Renderer:
    return Renderer(draw_run(_seed_on(PILATUS_1M)))


def test_a_seed_always_gives_the_same_run_and_the_same_frames(pilatus: Renderer) -> None:
    spec = pilatus.spec
    assert draw_run(spec.seed) == spec
    again = Renderer(draw_run(spec.seed))
    np.testing.assert_array_equal(again.frame(7).image, pilatus.frame(7).image)
    assert not np.array_equal(pilatus.frame(8).image, pilatus.frame(7).image)
    assert draw_run(spec.seed + 1) != spec


@pytest.mark.parametrize("n_frames", [55, 120, 400])
def test_labels_follow_the_phase_schedule(n_frames: int) -> None:
    for seed in ALL_SEEDS[::5]:
        spec = draw_run(seed, n_frames)
        labels, midpoint = spec.labels(), spec.midpoint_labels()
        assert (
            len(labels) == n_frames
            and spec.segments[0].ramp_start == 0
            and spec.segments[-1].stop == n_frames
        )
        assert [s.phase for s in spec.segments] == list(spec.order) and sorted(spec.order) == [0, 1, 2, 3]
        for prev, seg in itertools.pairwise(spec.segments):
            assert seg.ramp_start == prev.stop
            assert (labels[seg.ramp_start : seg.start] == RAMP).all()
            ramp = midpoint[
                seg.ramp_start : seg.start
            ]  # the old phase, then the new one from the midpoint on
            assert (
                set(ramp) <= {prev.phase, seg.phase} and (np.diff((ramp == seg.phase).astype(int)) >= 0).all()
            )
        for seg in spec.segments:
            assert seg.stop - seg.start >= MIN_PLATEAU
            assert (labels[seg.start : seg.stop] == seg.phase).all() and (
                midpoint[seg.start : seg.stop] == seg.phase
            ).all()


def test_frames_carry_their_schedule_label(pilatus: Renderer) -> None:
    spec = pilatus.spec
    seg = spec.segments[1]
    ramp_frame, plateau_frame = pilatus.frame(seg.ramp_start), pilatus.frame(seg.start)
    assert (ramp_frame.label, ramp_frame.phase) == (RAMP, spec.segments[0].phase)
    assert (plateau_frame.label, plateau_frame.phase) == (seg.phase, seg.phase)


def test_every_ordering_of_the_four_phases_appears_in_each_split() -> None:
    assert not set(VALIDATION_SEEDS) & set(HELDOUT_SEEDS)
    for seeds in (VALIDATION_SEEDS, HELDOUT_SEEDS):
        runs = [draw_run(s) for s in seeds]
        assert {r.order for r in runs} == set(itertools.permutations(range(len(PHASES))))
        assert {r.setup.detector.name for r in runs} == {PILATUS_1M.name, EIGER2_4M.name}
        assert {r.material.regime for r in runs} == {"saxs", "waxs"}


def test_ramps_last_5_to_40_frames_and_mix_the_phases_linearly() -> None:
    ramps = [seg.ramp_frames for s in ALL_SEEDS for seg in draw_run(s).segments[1:]]
    assert min(ramps) >= MIN_RAMP and max(ramps) <= MAX_RAMP
    assert min(ramps) <= 8 and max(ramps) >= 35  # the range is used, not just its middle
    spec = draw_run(VALIDATION_SEEDS[0])
    prev, seg = spec.segments[:2]
    a, b = spec.phase_state(prev.phase, 1.0), spec.phase_state(seg.phase, 0.0)
    for i in range(seg.ramp_start, seg.start):
        w = (i - seg.ramp_start + 1) / (seg.ramp_frames + 1)
        assert spec.state(i) == a.lerp(b, w)


def test_a_run_too_short_for_four_phases_and_their_ramps_is_refused() -> None:
    with pytest.raises(ValueError, match="frames"):
        draw_run(VALIDATION_SEEDS[0], 4 * MIN_PLATEAU + 3 * MIN_RAMP - 1)


@pytest.mark.parametrize("detector", [PILATUS_1M, EIGER2_4M], ids=lambda d: d.name)
def test_frames_have_the_detector_geometry_and_dtype_and_masked_gaps(detector: DetectorGeometry) -> None:
    renderer = Renderer(draw_run(_seed_on(detector)))
    image = renderer.frame(3).image
    h, w = detector.shape
    assert (w, h) == {"PILATUS 1M": (981, 1043), "EIGER2 X 4M": (2068, 2162)}[detector.name]
    assert image.shape == (h, w) and image.dtype == np.dtype(detector.dtype)
    (mh, mw), (gr, gc) = detector.module_px, detector.gaps_px
    assert (image[mh : mh + gr] == detector.gap_value).all() and (
        image[:, mw : mw + gc] == detector.gap_value
    ).all()
    status = detector.pixel_status()
    assert (image[status == 2] == detector.bad_value).all() and (status == 2).sum() > 0
    # the preprocessor masks them without knowing the detector: negative, or above its saturation
    saturation = PreprocessSpec().saturation
    masked = (image.astype(np.int64) < 0) | (image >= saturation)
    np.testing.assert_array_equal(masked, status > 0)
    assert image[status == 0].max() > 20  # scattering, not an empty frame


def test_lamellar_is_the_disordered_phase_plus_lamellar_peaks_only() -> None:
    spec = next(s for s in map(draw_run, VALIDATION_SEEDS) if s.setup.detector == PILATUS_1M)
    for p in (0.0, 0.4, 1.0):
        plain, plus = spec.phase_state(DISORDERED, p), spec.phase_state(LAMELLAR, p)
        assert plus.lamellar > 0 and plain.lamellar == 0
        assert plus == type(plain)(**{**plain.__dict__, "lamellar": plus.lamellar})
    renderer = Renderer(spec)
    i = 30
    diff = renderer.expected(spec.phase_state(LAMELLAR, 0.5), i) - renderer.expected(
        spec.phase_state(DISORDERED, 0.5), i
    )
    assert diff.min() >= -1e-3 * diff.max()
    # the difference peaks on the first lamellar order, q = 2 pi / d(t)
    r, c = np.unravel_index(np.argmax(diff), diff.shape)
    st, m = spec.setup, spec.material
    q = st.q_at(np.hypot(r - st.beam_rc[0], c - st.beam_rc[1]))
    q1 = 2 * np.pi / (m.period_a * (1 + m.period_growth * spec.time(i)))
    assert abs(q - q1) < 0.05 * q1


def test_textured_is_the_powder_phase_plus_bragg_spots_only(pilatus: Renderer) -> None:
    spec = pilatus.spec
    for p in (0.0, 0.4, 1.0):
        plain, plus = spec.phase_state(POWDER, p), spec.phase_state(TEXTURED, p)
        assert plus.spots > 0 and plain.spots == 0
        assert plus == type(plain)(**{**plain.__dict__, "spots": plus.spots})
    i = 40
    spotted = pilatus.expected(spec.phase_state(TEXTURED, 0.5), i)
    diff = spotted - pilatus.expected(spec.phase_state(POWDER, 0.5), i)
    assert diff.min() >= -1e-3 * diff.max() and diff.max() > 0
    assert 0 < (diff > 1e-3 * diff.max()).mean() < 0.01  # a few small spots, nothing else


def test_counts_are_poisson_distributed_around_the_expected_counts(pilatus: Renderer) -> None:
    out = np.empty(400_000, np.int64)
    for lam in (0.02, 0.7, 5.0, 29.0, 80.0):
        poisson_counts(np.full(out.size, lam), np.uint64(11), POISSON_TABLE, out)
        assert out.mean() == pytest.approx(lam, rel=0.02 + 3 / np.sqrt(lam * out.size))
        assert out.var() == pytest.approx(lam, rel=0.03 + 6 / np.sqrt(lam * out.size))
        if lam < 1:
            assert (out == 0).mean() == pytest.approx(np.exp(-lam), rel=0.01)
    spec: RunSpec = pilatus.spec
    frame = pilatus.frame(20).image
    valid = spec.setup.detector.pixel_status() == 0
    expected = pilatus.expected(spec.state(20), 20)
    assert frame[valid].mean() == pytest.approx(expected[valid].mean(), rel=0.01)
