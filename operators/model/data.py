"""Preprocessed frame caches: synthetic scans rendered through the shared preprocessing, stored as uint8.

A cache is `<stem>.npy` (N, S, S) uint8 (the [0, 1] preprocessed image x 255; 1/255 steps are far below
the noise) plus `<stem>.json` with the preprocessing spec, scenario, seed and ground-truth phase labels.
uint8 keeps 3,000 frames at 512x512 under 1 GB and reads fast through a memory map.

A pair cache (`"kind": "pairs"` in its json) holds (N, 2, S, S): two views of one training state under
independent nuisance draws (`stream.synthetic.generator.generate_training_pairs`), for the contrastive term
of training. `load_cache` returns either; both hand out batches of (views x B, 1, S, S).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from operators.preprocess import Preprocessor, PreprocessSpec

log = logging.getLogger(__name__)


@dataclass
class FrameCache:
    images: np.ndarray  # (N, S, S) uint8 memmap
    phases: np.ndarray  # (N,) int64
    phase_names: list[str]
    meta: dict
    views: ClassVar[int] = 1

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 in [0, 1] for the given indices."""
        return (self.images[np.sort(idx)][:, None].astype(np.float32)) / 255.0

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class PairCache:
    images: np.ndarray  # (N, 2, S, S) uint8 memmap: two views of each training state
    phases: np.ndarray  # (N,) int64, shared by both views
    meta: dict
    views: ClassVar[int] = 2

    @property
    def scenarios(self) -> np.ndarray:
        """(N,) int: which scenario each pair shows (an index into meta["scenarios"])."""
        of_phase = np.asarray(self.meta["phase_scenario"], np.int64)  # training phase id -> scenario index
        return of_phase[self.phases]

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """(2B, 1, S, S) float32 in [0, 1]: the first views of the given pairs, then their second views
        in the same order, so row i and row B + i are one pair."""
        pairs = self.images[np.sort(idx)]
        return np.concatenate([pairs[:, 0], pairs[:, 1]])[:, None].astype(np.float32) / 255.0

    def __len__(self) -> int:
        return len(self.images)


def build_cache(
    stem: Path,
    *,
    scenario: str = "training",
    n_frames: int = 2000,
    seed: int = 0,
    spec: PreprocessSpec | None = None,
    progress: bool = True,
) -> FrameCache:
    """Render `n_frames` of `scenario` with `seed`, preprocess them, and store them as a cache."""
    from stream.synthetic import generate_scan

    spec = spec or PreprocessSpec()
    names: dict[int, str] = {}

    def items():
        for fr in generate_scan(scenario, n_frames, seed=seed):
            names[fr.phase] = fr.phase_name
            yield (fr.image,), fr.phase

    _store(Path(stem), items(), n_frames, 1, spec, f"render {scenario} seed {seed}" if progress else None)
    meta = {"scenario": scenario, "seed": seed, "n_frames": n_frames, "preprocessing": spec.to_dict(),
            "phase_names": {str(k): v for k, v in sorted(names.items())}}
    Path(stem).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    log.info("cache %s: %d frames of %s (seed %d)", stem, n_frames, scenario, seed)
    return load_cache(stem)  # type: ignore[return-value]


def build_pair_cache(
    stem: Path, *, n_pairs: int = 1600, seed: int = 0, spec: PreprocessSpec | None = None, progress: bool = True
) -> PairCache:
    """Render `n_pairs` training pairs with `seed`, preprocess both views, and store them as a pair cache."""
    from stream.synthetic import generate_training_pairs

    spec = spec or PreprocessSpec()
    items = (((a.image, b.image), a.phase) for a, b in generate_training_pairs(n_pairs, seed=seed))
    _store(Path(stem), items, n_pairs, 2, spec, f"render training pairs seed {seed}" if progress else None)
    meta = {"kind": "pairs", "scenario": "training", "seed": seed, "n_pairs": n_pairs,
            "preprocessing": spec.to_dict(), **_phase_scenarios()}
    Path(stem).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    log.info("pair cache %s: %d pairs of training states (seed %d)", stem, n_pairs, seed)
    return load_pair_cache(stem)


def _phase_scenarios() -> dict:
    """The scenarios of the training phases: `scenarios` (names) and `phase_scenario` (phase id -> index)."""
    from stream.synthetic.scenarios import TRAINING_PHASES

    names = list(dict.fromkeys(name for name, _ in TRAINING_PHASES))
    return {"scenarios": names, "phase_scenario": [names.index(name) for name, _ in TRAINING_PHASES]}


def _store(
    stem: Path,
    items: Iterator[tuple[tuple[np.ndarray, ...], int]],
    n: int,
    views: int,
    spec: PreprocessSpec,
    progress: str | None,
) -> None:
    """Preprocess `n` items of (raw frames of each view, phase) into `<stem>.npy` and `<stem>.phases.npy`.

    The array is written under a temporary name and renamed when complete: an interrupted render never
    leaves a cache that looks whole."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    pre = Preprocessor(spec)
    s = spec.size
    tmp = stem.with_suffix(".partial.npy")
    shape = (n, s, s) if views == 1 else (n, views, s, s)  # frame caches keep their (N, S, S) layout
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    dst = arr.reshape(n, views, s, s)  # a view: writes land in the file
    phases = np.zeros(n, np.int64)
    buf = np.empty((1, s, s), np.float32)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=n, desc=progress, mininterval=5)
    for i, (frames, phase) in enumerate(items):
        for v, image in enumerate(frames):
            pre(image, out=buf)
            dst[i, v] = np.rint(buf[0] * 255.0).astype(np.uint8)
        phases[i] = phase
    arr.flush()
    del arr, dst
    tmp.replace(stem.with_suffix(".npy"))
    np.save(stem.with_suffix(".phases.npy"), phases)


def load_cache(stem: Path) -> FrameCache | PairCache:
    """A frame cache, or a pair cache when its json says so."""
    stem = Path(stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    if meta.get("kind") == "pairs":
        return load_pair_cache(stem)
    images = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    phases = np.load(stem.with_suffix(".phases.npy"))
    names = [meta["phase_names"].get(str(int(p)), str(int(p))) for p in phases]
    return FrameCache(images=images, phases=phases, phase_names=names, meta=meta)


def load_pair_cache(stem: Path) -> PairCache:
    stem = Path(stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    if meta.get("kind") != "pairs":
        raise ValueError(f"{stem.with_suffix('.json')} describes a frame cache, not a pair cache")
    images = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"{stem.with_suffix('.npy')} holds {images.shape}, not (N, 2, S, S) pairs")
    return PairCache(images=images, phases=np.load(stem.with_suffix(".phases.npy")), meta=meta)


def ensure_cache(stem: Path, **kwargs) -> FrameCache:
    stem = Path(stem)
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".npy").is_file():
        cache = load_cache(stem)
        want = {k: kwargs[k] for k in ("scenario", "n_frames", "seed") if k in kwargs}
        if isinstance(cache, FrameCache) and all(cache.meta.get(k) == v for k, v in want.items()):
            return cache
    return build_cache(stem, **kwargs)


def ensure_pair_cache(stem: Path, *, n_pairs: int, seed: int, **kwargs) -> PairCache:
    """The pair cache at `stem` if it holds `n_pairs` of `seed`, else render it."""
    stem = Path(stem)
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".npy").is_file():
        cache = load_cache(stem)
        if isinstance(cache, PairCache) and (cache.meta["n_pairs"], cache.meta["seed"]) == (n_pairs, seed):
            return cache
    return build_pair_cache(stem, n_pairs=n_pairs, seed=seed, **kwargs)
