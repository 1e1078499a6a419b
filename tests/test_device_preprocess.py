"""Preprocessing on the device: the ONNX graph gives what the host Preprocessor gives, and the fused session's
latents and points are the host path's, on the CPU execution provider (what a GPU changes is measured by
scripts/gpu_checks.sh, docs/scaling.md).

Tolerances, and why: the graph computes in float32 after one Cast where the reference accumulates in float64;
masks and bin sums are exact for integer frames, so what is left is float32 rounding in the mean, log1p and
window (a few ulps of values in [0, 1]): measured at most 2.5e-7 on every case here, held to IMAGE_ATOL = 1e-6
(the percentile positions in float32 instead of float64 already break it: 6e-6). Through the encoder the
latents differ by at most 1.4e-6 of the largest (LATENT_RTOL = 1e-5) and the 2-D points by 4e-6 in a map
30 wide (POINT_ATOL = 1e-4).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from operators.bundle import ModelBundle
from operators.device_preprocess import INPUT, SESSIONS_KEPT, preprocess_graph
from operators.preprocess import Preprocessor, PreprocessSpec
from operators.providers import preprocess_on_device
from operators.workers.compute import FrameCompute
from stream.config import ServeSettings
from stream.detector import PILATUS3_2M
from stream.synthetic import generate_scan

IMAGE_ATOL = 1e-6
LATENT_RTOL = 1e-5
POINT_ATOL = 1e-4
SPEC = PreprocessSpec()


def on_device(frames: np.ndarray, spec: PreprocessSpec = SPEC) -> np.ndarray:
    """(B, H, W) raw frames through the preprocessing graph alone, on the CPU provider."""
    model = preprocess_graph(spec, frames.shape[1:], frames.dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: np.ascontiguousarray(frames)})[0]


def on_host(frames: np.ndarray, spec: PreprocessSpec = SPEC) -> np.ndarray:
    return Preprocessor(spec).batch(list(frames))


def assert_same_images(frames: np.ndarray, spec: PreprocessSpec = SPEC) -> None:
    got, want = on_device(frames, spec), on_host(frames, spec)
    assert got.shape == want.shape == (len(frames), 1, spec.size, spec.size)
    np.testing.assert_allclose(got, want, rtol=0, atol=IMAGE_ATOL)
    assert want.max() > 0.5  # the frames are not all masked: the comparison says something


@pytest.fixture(scope="module")
def pilatus_frames() -> np.ndarray:
    """Synthetic PILATUS3 2M frames (int32, -1 in the module gaps, hot and dead pixels) of two scenarios."""
    return np.stack([f.image for scenario in ("film_formation", "crystallization")
                     for f in generate_scan(scenario, 2, seed=11)])  # fmt: skip


def ring(shape: tuple[int, int], seed: int = 0, dtype: type = np.int32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - 0.45 * h, xx - 0.55 * w)
    return rng.poisson(5 + 400 * np.exp(-((r - min(h, w) / 4) ** 2) / 60.0)).astype(dtype)


def test_synthetic_pilatus_frames_preprocess_on_the_device_as_on_the_host(pilatus_frames: np.ndarray) -> None:
    assert (pilatus_frames < 0).any()  # module gaps are in: the static mask and the -1s are exercised
    assert_same_images(pilatus_frames)


def test_gaps_saturated_and_hot_pixels_are_masked_as_on_the_host() -> None:
    img = ring(PILATUS3_2M.shape, seed=1)
    img[PILATUS3_2M.gap_mask()] = 500_000  # garbage in the module gaps: only the static mask removes it
    img[300:310, 200:900] = -2  # a dead stripe
    img[500, 500:520] = 2_000_000  # saturated
    img[700, 400] = 50_000  # isolated hot pixels, one at each edge of a row
    img[800, 0] = 900_000
    img[801, -1] = 900_000
    img[900, 600:602] = 40_000  # two bright neighbours: not hot, kept as in the reference
    assert_same_images(img[None])


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint32, np.float32])
def test_every_detector_dtype_is_preprocessed_as_on_the_host(dtype: type) -> None:
    frames = np.stack([ring(PILATUS3_2M.shape, seed=s, dtype=dtype) for s in (2, 3)])
    frames[:, 40:60, :] = np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else -1  # a gap of the dtype's flag
    assert_same_images(frames)


def test_an_eiger_frame_with_its_2_32_minus_1_gaps_is_preprocessed_as_on_the_host() -> None:
    img = ring((2162, 2068), seed=4, dtype=np.uint32)  # EIGER2 X 4M, no static mask of that shape
    img[:, 1030:1040] = 2**32 - 1
    img[1100:1137, :] = 2**32 - 1
    assert_same_images(img[None])


@pytest.mark.parametrize("shape", [(619, 487), (300, 200), (120, 90)], ids=["non-square", "small", "tiny"])
def test_non_square_and_small_frames_are_preprocessed_as_on_the_host(shape: tuple[int, int]) -> None:
    # frames under 512 px are binned 1:1 then resized up as the host does (cv2 linear / nearest)
    img = ring(shape, seed=5)
    img[shape[0] // 3, :] = -1
    assert_same_images(img[None])


def test_a_frame_without_a_valid_sampled_bin_gives_zeros_as_on_the_host() -> None:
    img = np.full((1024, 1024), -1, np.int32)
    img[2, 2] = 100  # one valid pixel, in bin (1, 1): between the sampled bins (stride 3), so no window
    assert on_host(img[None]).max() == 0
    np.testing.assert_array_equal(on_device(img[None]), on_host(img[None]))


@pytest.fixture(scope="module")
def fused_bundle() -> Iterator[ModelBundle]:
    yield ModelBundle.load(device="cpu", device_preprocess="on")


def test_the_fused_session_encodes_raw_frames_to_the_host_paths_latents(
    fused_bundle: ModelBundle, default_bundle: ModelBundle, pilatus_frames: np.ndarray
) -> None:
    assert fused_bundle.frame_encoder is not None and default_bundle.frame_encoder is None  # CPU: off by default
    fused, fused_features = fused_bundle.frame_encoder.encode_frames(list(pilatus_frames))
    host, host_features = default_bundle.encode(default_bundle.preprocessor.batch(list(pilatus_frames)))
    assert fused.shape == host.shape == (len(pilatus_frames), default_bundle.latent_dim)
    assert np.abs(fused - host).max() <= LATENT_RTOL * np.abs(host).max()
    # the clustering's input comes out of the same session, as the host path computes it
    assert fused_features.shape == host_features.shape
    assert np.abs(fused_features - host_features).max() <= LATENT_RTOL * np.abs(host_features).max()


def test_a_batch_of_mixed_shapes_is_encoded_in_frame_order_and_few_shapes_are_kept(
    fused_bundle: ModelBundle, default_bundle: ModelBundle
) -> None:
    shapes = [(200 + 10 * k, 150) for k in range(SESSIONS_KEPT + 1)]
    frames = [ring(shape, seed=k) for k, shape in enumerate(shapes)] + [ring(shapes[0], seed=9)]
    fused, fused_features = fused_bundle.frame_encoder.encode_frames(frames)
    host, host_features = default_bundle.encode(default_bundle.preprocessor.batch(frames))
    assert np.abs(fused - host).max() <= LATENT_RTOL * np.abs(host).max()
    assert np.abs(fused_features - host_features).max() <= LATENT_RTOL * np.abs(host_features).max()
    assert fused_bundle.frame_encoder._session.cache_info().currsize == SESSIONS_KEPT  # bounded, most recent


def test_the_compute_path_gives_the_same_points_with_device_preprocessing(pilatus_frames: np.ndarray) -> None:
    indices = list(range(len(pilatus_frames)))
    bad = np.zeros((2, 3, 4), np.int32)  # not a frame: rejected at preprocessing either way
    images = [*pilatus_frames, bad]
    host = FrameCompute(None, device="cpu", max_batch=8, device_preprocess="off")
    fused = FrameCompute(None, device="cpu", max_batch=8, device_preprocess="on")
    assert host.bundle.frame_encoder is None and fused.bundle.frame_encoder is not None
    want = host.compute([*indices, 99], images)
    got = fused.compute([*indices, 99], images)
    assert [c.index for c in got] == [c.index for c in want] == [*indices, 99]
    assert got[-1].reject_reason == want[-1].reject_reason == "preprocess_error"
    for g, w in zip(got[:-1], want[:-1], strict=True):
        np.testing.assert_allclose(g.xy, w.xy, rtol=0, atol=POINT_ATOL)
        assert np.abs(g.latent - w.latent).max() <= LATENT_RTOL * np.abs(w.latent).max()
        if w.features is not None:  # the bundle's clustering takes its cluster features
            assert np.abs(g.features - w.features).max() <= LATENT_RTOL * np.abs(w.features).max()


def test_device_preprocessing_is_on_for_gpu_encoders_by_default_and_selectable() -> None:
    assert not preprocess_on_device("auto", "cpu")
    assert preprocess_on_device("auto", "cuda") and preprocess_on_device("auto", "tensorrt")
    assert preprocess_on_device("on", "cpu") and not preprocess_on_device("off", "cuda")
    with pytest.raises(ValueError, match="device_preprocess"):
        preprocess_on_device("gpu", "cuda")
    assert ServeSettings().device_preprocess == "auto"
    assert ServeSettings(device_preprocess="on").device_preprocess == "on"
    with pytest.raises(ValueError):
        ServeSettings(device_preprocess="yes")
