"""Training caches: rendered once through the shared preprocessing, reused, and batched as training needs."""

from __future__ import annotations

import numpy as np
import pytest

from operators.model.data import FrameCache, PairCache, ensure_cache, ensure_pair_cache, load_cache
from operators.model.fit import load_reference
from operators.preprocess import PreprocessSpec
from stream.synthetic import SCENARIOS

SPEC = PreprocessSpec(size=64)


def test_a_frame_cache_holds_preprocessed_frames_with_their_phases(tmp_path) -> None:
    cache = ensure_cache(tmp_path / "frames", scenario="crystallization", n_frames=3, seed=1, spec=SPEC,
                         progress=False)
    assert isinstance(cache, FrameCache) and cache.images.shape == (3, 64, 64)
    assert cache.phase_names == ["amorphous", "amorphous", "crystalline"]
    batch = cache.batch(np.array([2, 0]))
    assert batch.shape == (2, 1, 64, 64) and batch.dtype == np.float32 and 0 <= batch.min() <= batch.max() <= 1


def test_a_pair_cache_batches_first_views_then_second_views_of_the_same_pairs(tmp_path) -> None:
    cache = ensure_pair_cache(tmp_path / "pairs", n_pairs=3, seed=4, spec=SPEC, progress=False)
    assert isinstance(cache, PairCache) and cache.images.shape == (3, 2, 64, 64) and cache.views == 2
    assert isinstance(load_cache(tmp_path / "pairs"), PairCache)
    batch = cache.batch(np.array([2, 0]))
    assert batch.shape == (4, 1, 64, 64)
    np.testing.assert_array_equal(batch[1, 0], cache.images[2, 0] / np.float32(255))  # row i: view 1 of pair i
    np.testing.assert_array_equal(batch[3, 0], cache.images[2, 1] / np.float32(255))  # row B + i: its view 2
    assert not np.array_equal(cache.images[0, 0], cache.images[0, 1])
    names = [cache.meta["scenarios"][k] for k in cache.scenarios]
    assert all(SCENARIOS["training"].phases[p] in SCENARIOS[name].phases for p, name in zip(cache.phases, names))


def test_an_existing_cache_is_reused_and_a_different_request_re_renders(tmp_path) -> None:
    stem = tmp_path / "pairs"
    ensure_pair_cache(stem, n_pairs=2, seed=4, spec=SPEC, progress=False)
    stamp = stem.with_suffix(".npy").stat().st_mtime_ns
    ensure_pair_cache(stem, n_pairs=2, seed=4, spec=SPEC, progress=False)
    assert stem.with_suffix(".npy").stat().st_mtime_ns == stamp
    assert len(ensure_pair_cache(stem, n_pairs=3, seed=4, spec=SPEC, progress=False)) == 3


def test_reference_frames_cannot_come_from_a_pair_cache(tmp_path) -> None:
    ensure_pair_cache(tmp_path / "pairs", n_pairs=1, seed=0, spec=SPEC, progress=False)
    with pytest.raises(ValueError, match="training pairs"):
        load_reference(tmp_path / "pairs", None, 0, SPEC)
