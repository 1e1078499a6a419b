"""Latent pairs for learning the clustering's reduction: rendered, preprocessed and encoded as serving does.

    python -m operators.model.metric_data --bundle operators/bundles/default --out data/metric/s1 \
        --broad-groups 1200 --project-pairs 800 --seed 1

Two kinds of pairs, each two views of one phase under drift (the same phase: pull together):
- broad sibling groups (`stream.synthetic.broad`): a state and the same state plus one feature, each seen
  twice, on several detector grids with the beam anywhere: `broad` (G, 2, 2, D) = (group, state/sibling, view);
- the project's training pairs (`stream.synthetic.generate_training_pairs`): `project` (N, 2, D) with their
  training phase in `project_phase`.
Latents are the encoder's means of each frame preprocessed by the bundle's own preprocessor, batch 1: exactly
what a live run would hand the clusterer.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from operators.bundle import ModelBundle

log = logging.getLogger(__name__)


def _encode(bundle: ModelBundle, image: np.ndarray, buf: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    bundle.preprocessor(image, out=buf[0])
    if keep is not None:
        keep[...] = np.rint(buf[0, 0] * 255.0).astype(np.uint8)
    return bundle.encoder.encode(buf)[0].copy()


def build(bundle: ModelBundle, out: Path, *, broad_groups: int, project_pairs: int, seed: int,
          images: bool = False, weights: Mapping[str, int] | None = None) -> Path:
    """Write the pairs to ``out`` (.npz, .json; with ``images`` the frames too); ``weights``: the sibling
    features' weights (`stream.synthetic.broad.generate_sibling_pairs`)."""
    from tqdm import tqdm

    from stream.synthetic import generate_training_pairs
    from stream.synthetic.broad import DEFAULT_WEIGHTS, generate_sibling_pairs

    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    broad = np.zeros((broad_groups, 2, 2, bundle.latent_dim), np.float32)
    broad_img = project_img = None
    if images:
        broad_img = np.lib.format.open_memmap(out.with_suffix(".broad.npy"), mode="w+", dtype=np.uint8,
                                              shape=(broad_groups, 2, 2, s, s))
        project_img = np.lib.format.open_memmap(out.with_suffix(".project.npy"), mode="w+", dtype=np.uint8,
                                                shape=(project_pairs, 2, s, s))
    features: list[str] = []
    groups = generate_sibling_pairs(broad_groups, seed=seed, weights=weights)
    for g, group in enumerate(tqdm(groups, total=broad_groups, desc="broad groups", mininterval=10)):
        for p, pair in enumerate(group):
            for v, fr in enumerate(pair):
                broad[g, p, v] = _encode(bundle, fr.image, buf, None if broad_img is None else broad_img[g, p, v])
        features.append(group[1][0].phase_name)
    project = np.zeros((project_pairs, 2, bundle.latent_dim), np.float32)
    phases = np.zeros(project_pairs, np.int64)
    for i, (a, b) in enumerate(tqdm(generate_training_pairs(project_pairs, seed=seed), total=project_pairs,
                                    desc="project pairs", mininterval=10)):
        for v, fr in enumerate((a, b)):
            project[i, v] = _encode(bundle, fr.image, buf, None if project_img is None else project_img[i, v])
        phases[i] = a.phase
    for arr in (broad_img, project_img):
        if arr is not None:
            arr.flush()
    np.savez(out.with_suffix(".npz"), broad=broad, project=project, project_phase=phases)
    out.with_suffix(".json").write_text(json.dumps(
        {"bundle": bundle.manifest.get("name"), "bundle_version": bundle.manifest.get("version"), "seed": seed,
         "broad_groups": broad_groups, "project_pairs": project_pairs,
         "feature_weights": dict(DEFAULT_WEIGHTS if weights is None else weights), "sibling_features": features},
        indent=1))
    log.info("metric pairs %s: %d broad groups, %d project pairs (seed %d)", out, broad_groups, project_pairs, seed)
    return out.with_suffix(".npz")


def _weights(items: list[str]) -> dict[str, int] | None:
    """``["spots=8", "orders=8"]`` -> ``{"spots": 8, "orders": 8}``; none given: None (the default weights)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise SystemExit(f"--feature-weight takes FEATURE=N (N a whole number >= 0), not {item!r}")
        out[name.strip()] = int(value)
    return out or None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--out", required=True, help="output stem (.npz and .json)")
    p.add_argument("--broad-groups", type=int, default=1200)
    p.add_argument("--project-pairs", type=int, default=800)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--images", action="store_true", help="keep the preprocessed frames too (uint8)")
    p.add_argument("--feature-weight", action="append", default=[], metavar="FEATURE=N",
                   help="a sibling's feature N times as likely as one not named (repeatable; default spots=2)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = ModelBundle.load(a.bundle, intra_op_threads=1)
    bundle.warmup()
    build(bundle, Path(a.out), broad_groups=a.broad_groups, project_pairs=a.project_pairs, seed=a.seed,
          images=a.images, weights=_weights(a.feature_weight))


if __name__ == "__main__":
    main()
