"""Preprocessed frame caches: synthetic scans rendered through the shared preprocessing, stored as uint8.

A cache is `<stem>.npy` (N, S, S) uint8 (the [0, 1] preprocessed image x 255; 1/255 steps are far below
the noise) plus `<stem>.json` with the preprocessing spec, scenario, seed and ground-truth phase labels.
uint8 keeps 3,000 frames at 512x512 under 1 GB and reads fast through a memory map.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from operators.preprocess import Preprocessor, PreprocessSpec

log = logging.getLogger(__name__)


@dataclass
class FrameCache:
    images: np.ndarray  # (N, S, S) uint8 memmap
    phases: np.ndarray  # (N,) int64
    phase_names: list[str]
    meta: dict

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 in [0, 1] for the given indices."""
        return (self.images[np.sort(idx)][:, None].astype(np.float32)) / 255.0

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

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    spec = spec or PreprocessSpec()
    pre = Preprocessor(spec)
    s = spec.size
    tmp = stem.with_suffix(".partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_frames, s, s))
    phases = np.zeros(n_frames, np.int64)
    names: dict[int, str] = {}
    buf = np.empty((1, s, s), np.float32)
    frames = generate_scan(scenario, n_frames, seed=seed)
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, total=n_frames, desc=f"render {scenario} seed {seed}", mininterval=5)
    for i, fr in enumerate(frames):
        pre(fr.image, out=buf)
        arr[i] = np.rint(buf[0] * 255.0).astype(np.uint8)
        phases[i] = fr.phase
        names[fr.phase] = fr.phase_name
    arr.flush()
    del arr
    tmp.replace(stem.with_suffix(".npy"))
    np.save(stem.with_suffix(".phases.npy"), phases)
    meta = {"scenario": scenario, "seed": seed, "n_frames": n_frames, "preprocessing": spec.to_dict(),
            "phase_names": {str(k): v for k, v in sorted(names.items())}}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    log.info("cache %s: %d frames of %s (seed %d)", stem, n_frames, scenario, seed)
    return load_cache(stem)


def load_cache(stem: Path) -> FrameCache:
    stem = Path(stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    images = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    phases = np.load(stem.with_suffix(".phases.npy"))
    names = [meta["phase_names"].get(str(int(p)), str(int(p))) for p in phases]
    return FrameCache(images=images, phases=phases, phase_names=names, meta=meta)


def ensure_cache(stem: Path, **kwargs) -> FrameCache:
    stem = Path(stem)
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".npy").is_file():
        cache = load_cache(stem)
        want = {k: kwargs[k] for k in ("scenario", "n_frames", "seed") if k in kwargs}
        if all(cache.meta.get(k) == v for k, v in want.items()):
            return cache
    return build_cache(stem, **kwargs)
