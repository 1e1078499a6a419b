"""The shared preprocessing: shape, dtype, masking of gaps / bad / hot pixels, aspect, out buffer."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from operators.preprocess import PreprocessError, Preprocessor, PreprocessSpec
from stream.detector import PILATUS3_2M


def _frame(seed: int = 0, shape: tuple[int, int] = PILATUS3_2M.shape) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    lam = 5 + 200 * np.exp(-((r - 300) ** 2) / 200.0)  # a ring on a flat background
    img = rng.poisson(lam).astype(np.int32)
    img[PILATUS3_2M.gap_mask()] = -1
    return img


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor()


def test_full_frame_becomes_one_square_float32_image_in_unit_range(pre) -> None:
    out = pre(_frame())
    assert out.shape == (1, 512, 512) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.9


def test_aspect_is_kept_by_padding_the_short_side(pre) -> None:
    out = pre(_frame())
    nh, nw, top, left = pre.geometry(PILATUS3_2M.shape)
    assert (nh, top) == (512, 0)
    assert nw == round(1475 * 512 / 1679) and left == (512 - nw) // 2
    assert np.all(out[0, :, :left] == 0) and np.all(out[0, :, left + nw :] == 0)


def test_gap_pixel_values_do_not_leak_into_the_image(pre) -> None:
    img = _frame()
    loud = img.copy()
    loud[PILATUS3_2M.gap_mask()] = 500_000  # garbage in the gaps must be ignored, not averaged in
    np.testing.assert_array_equal(pre(img), pre(loud))


def test_negative_saturated_and_hot_pixels_are_masked(pre) -> None:
    img = _frame()
    bad = img.copy()
    bad[100, 100] = -2  # bad pixel flag
    bad[200, 300] = 2**20  # saturated
    bad[400, 700] = 50_000  # isolated hot pixel
    bad[401, 900] = 999_000  # hot, just below saturation
    a, b = pre(img), pre(bad)
    # only the bins of the four pixels may change, and only slightly (one of ~10 pixels left out)
    diff = np.abs(a - b)
    assert diff.max() < 0.05
    assert (diff > 1e-6).sum() <= 4


def test_out_buffer_is_filled_in_place_and_returned(pre) -> None:
    buf = np.full((1, 512, 512), 7.0, np.float32)
    res = pre(_frame(), out=buf)
    assert res is buf
    np.testing.assert_array_equal(buf, pre(_frame()))


def test_same_frame_gives_the_same_result_for_any_integer_or_float_dtype(pre) -> None:
    img = _frame()
    ok = img >= 0
    u16 = np.where(ok, img, 0).astype(np.uint16)
    base = pre(np.where(ok, img, -1).astype(np.int32))
    as_float = pre(np.where(ok, img, np.nan).astype(np.float32))
    np.testing.assert_allclose(base, as_float, atol=1e-6)
    assert pre(u16).shape == (1, 512, 512)


def test_read_only_views_are_accepted(pre) -> None:
    img = _frame()
    view = np.frombuffer(img.tobytes(), dtype=np.int32).reshape(img.shape)
    assert not view.flags.writeable
    np.testing.assert_array_equal(pre(view), pre(img))


def test_frames_of_other_shapes_are_resized_without_the_pilatus_mask() -> None:
    pre = Preprocessor(PreprocessSpec(size=64))
    out = pre(np.random.default_rng(1).poisson(10, (100, 300)).astype(np.uint16))
    nh, nw, top, _left = pre.geometry((100, 300))
    assert (nh, nw) == (21, 64)
    assert np.all(out[0, :top] == 0) and np.all(out[0, top + nh :] == 0)
    assert out[0, top : top + nh].max() == pytest.approx(1.0)


def test_bad_input_gets_a_clear_error(pre) -> None:
    with pytest.raises(PreprocessError, match="2-D"):
        pre(np.zeros((3, 4, 5), np.int32))
    with pytest.raises(PreprocessError, match="numeric"):
        pre(np.array([["a"]]))
    with pytest.raises(PreprocessError, match="out must be"):
        pre(_frame(), out=np.empty((512, 512), np.float32))


def test_an_all_masked_frame_gives_zeros(pre) -> None:
    out = pre(np.full(PILATUS3_2M.shape, -1, np.int32))
    assert not out.any()


def test_spec_round_trips_through_a_dict() -> None:
    spec = PreprocessSpec(size=256, high_percentile=99.5)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert Preprocessor.from_spec(spec.to_dict()).spec == spec


def test_small_frames_are_interpolated_up_without_holes() -> None:
    pre = Preprocessor(PreprocessSpec(size=128, detector=None))
    _yy, xx = np.mgrid[0:40, 0:60]
    img = (100 + 10 * xx).astype(np.int32)  # a smooth ramp
    out = pre(img)[0]
    nh, nw, top, left = pre.geometry(img.shape)
    inside = out[top + 1 : top + nh - 1, left + 1 : left + nw - 1]
    assert inside.shape[1] > 60 and (np.diff(inside, axis=1) >= -1e-6).all()  # monotone, no zero stripes
    assert inside[:, -1].mean() > 0.9


def test_big_endian_frames_give_the_same_result(pre) -> None:
    img = _frame()
    np.testing.assert_array_equal(pre(img.astype(">i4")), pre(img))


@pytest.mark.parametrize("shape", [PILATUS3_2M.shape, (195, 487), (37, 53)])
def test_splitting_the_frame_across_threads_gives_the_identical_result(pre, shape) -> None:
    img = _frame(3, shape) if shape == PILATUS3_2M.shape else np.random.default_rng(3).poisson(50, shape)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(Preprocessor(threads=threads)(img), pre(img))


def test_consecutive_frames_do_not_leak_into_each_other_through_reused_buffers(pre) -> None:
    a, b = _frame(4), _frame(5)
    first_a = pre(a).copy()
    pre(b)
    np.testing.assert_array_equal(pre(a), first_a)


def test_memory_stays_bounded_however_many_frame_shapes_a_sender_invents() -> None:
    pre = Preprocessor(PreprocessSpec(detector=None))
    pre(np.ones((64, 64), np.int32))  # kernels loaded before measuring
    per_shape = 512 * 444 * (8 + 8 + 4 + 1)  # the bins of one shape: sums, counts, means, flags (~4.8 MB)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(40):
            pre(np.ones((600 + i, 520), np.int32))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 6 * per_shape, f"{held / 2**20:.0f} MiB held after 40 shapes"
    # a shape seen before, evicted since, gives the same result as in a fresh preprocessor
    img = np.random.default_rng(6).poisson(50, (600, 520))
    np.testing.assert_array_equal(pre(img), Preprocessor(PreprocessSpec(detector=None))(img))


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, np.dtype(">f2")])
def test_half_and_extended_precision_frames_give_the_result_of_their_values(pre, dtype) -> None:
    img = np.random.default_rng(7).poisson(50, (195, 487))
    np.testing.assert_array_equal(pre(img.astype(dtype)), pre(img.astype(np.float64)))
