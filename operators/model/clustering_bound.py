"""The offline bound: how well a density clustering of a whole run, known at once, follows its phases.

    python -m operators.model.clustering_bound [--bundle PATH] [--project-seeds 7001 7002 7003 7004]
        [--independent-runs 24] [--frames 120] [--embedding CKPT] [--json out.json]

Validation runs only (the project's scenarios and the independent family's validation seeds; held-out seeds
are refused by the encoders in `tune_clustering`). Each run is rendered, preprocessed and encoded once as
serving does; then, per run and per feature space, two figures on the plateau frames, with the whole run known
(no causality, no stable ids to keep), each in a PCA of `COMPONENTS` fitted on that run alone:
- `ari`: HDBSCAN (excess of mass, minimum cluster 10) of all the run's frames, ramps included, each noise frame
  given the label of the frame before it: the most a density clustering of this space can be expected to do;
- `separable`: Ward's clustering of the plateau frames alone into as many clusters as the run has phases:
  whether the space holds the phases apart at all. High `separable` under a low `ari`: the clustering, not the
  space, loses the phases (ramps bridging them, or the wrong number of clusters).
Feature spaces:
- `served`: what the bundle's clustering takes (its cluster features, else its latents), L2-normalised;
- `pixels`: the preprocessed frame averaged over 8 x 8 blocks, each frame standardised (zero mean, unit
  variance, so flux and global scale are gone): nothing learnt;
- `embedding` (with `--embedding`): the features of a `cluster_embedding` checkpoint, L2-normalised.

An encoder retrained for unseen families should lift the latent to the pixels' figures or beyond, on both
families, before its clustering is re-tuned. 16 + 24 runs of 120 frames: about 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from operators.clustering import density_labels
from operators.model.evaluate import pooled_pixels
from operators.model.tune_clustering import KEPT_PIXEL_POOL, EncodedRun
from operators.projection import l2_normalise

if TYPE_CHECKING:
    from operators.bundle import ModelBundle

log = logging.getLogger(__name__)

COMPONENTS = 8
MIN_CLUSTER_SIZE = 10
MIN_SAMPLES = 3
PROJECT_SEEDS = (7001, 7002, 7003, 7004)
PIXEL_POOL = 8  # the pixels' space: the preprocessed frame over 8 x 8 blocks (64 x 64 of 512)


@dataclass(frozen=True)
class BoundRow:
    family: str  # "project" | "independent"
    scenario: str
    seed: int
    ari: dict[str, float]  # space -> ARI of the density clustering of the whole run (`bound_ari`)
    separable: dict[str, float]  # space -> ARI with the number of phases given (`separability`)


def standardised(pixels: np.ndarray) -> np.ndarray:
    """(n, ...) frames -> (n, D), each frame shifted and scaled to zero mean and unit variance."""
    x = np.asarray(pixels, np.float64).reshape(len(pixels), -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(x.std(1, keepdims=True), 1e-12)


def _run_pca(features: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(features, np.float64)
    return PCA(min(COMPONENTS, len(x) - 1, x.shape[1])).fit_transform(x - x.mean(0))


def bound_labels(features: np.ndarray) -> np.ndarray:
    """Density labels of a whole run in its own PCA; a noise frame takes the label before it (-1 at the start)."""
    labels = density_labels(_run_pca(features), MIN_CLUSTER_SIZE, MIN_SAMPLES, 0.0, "eom")
    last = -1
    for i, v in enumerate(labels):
        if v < 0:
            labels[i] = last
        else:
            last = int(v)
    return labels


def bound_ari(features: np.ndarray, phases: np.ndarray) -> float:
    """ARI of `bound_labels` on the plateau frames (phase >= 0)."""
    from sklearn.metrics import adjusted_rand_score

    plateau = np.asarray(phases) >= 0
    return float(adjusted_rand_score(phases[plateau], bound_labels(features)[plateau]))


def separability(features: np.ndarray, phases: np.ndarray) -> float:
    """Whether the space holds the phases apart at all: ARI of Ward's clustering of the plateau frames alone into
    as many clusters as the run has phases (given: no clustering knows it; ramps left out: nothing bridges)."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    plateau = np.asarray(phases) >= 0
    k = len(np.unique(phases[plateau]))
    if k < 2:
        return 1.0
    labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(_run_pca(features)[plateau])
    return float(adjusted_rand_score(phases[plateau], labels))


def bound_row(run: EncodedRun, embedding: Callable[[np.ndarray], np.ndarray] | None = None) -> BoundRow:
    """The run's figures in each space (`embedding`: kept pixels -> features, e.g. a `cluster_embedding.Embedding`)."""
    if run.pixels is None:
        raise ValueError("the run was encoded without its pixels (keep_pixels=True)")
    spaces = {"served": l2_normalise(run.features),
              "pixels": standardised([pooled_pixels(p, PIXEL_POOL // KEPT_PIXEL_POOL) for p in run.pixels])}
    if embedding is not None:
        spaces["embedding"] = l2_normalise(embedding(run.pixels))
    return BoundRow(family="independent" if run.scenario == "independent" else "project",
                    scenario=run.scenario, seed=run.seed,
                    ari={name: bound_ari(x, run.phases) for name, x in spaces.items()},
                    separable={name: separability(x, run.phases) for name, x in spaces.items()})


def summary(rows: list[BoundRow]) -> dict[str, dict[str, float]]:
    """Per family, space and measure ("family/space/ari", "family/space/separable"): mean, worst, runs below 0.9."""
    out: dict[str, dict[str, float]] = {}
    for family in sorted({r.family for r in rows}):
        mine = [r for r in rows if r.family == family]
        for space in mine[0].ari:
            for measure in ("ari", "separable"):
                a = np.asarray([getattr(r, measure)[space] for r in mine])
                out[f"{family}/{space}/{measure}"] = {"mean": float(a.mean()), "worst": float(a.min()),
                                                      "runs_below_0.9": int((a < 0.9).sum()), "runs": len(a)}
    return out


def validation_runs(bundle: ModelBundle, project_seeds: tuple[int, ...] = PROJECT_SEEDS,
                    independent_runs: int | None = None, n_frames: int = 120) -> list[EncodedRun]:
    """The project's scenarios at `project_seeds` and the first `independent_runs` (default all) validation runs
    of the independent family, encoded with their pixels kept."""
    from operators.model.evaluate import SCENARIOS
    from operators.model.tune_clustering import encode_independent_runs, encode_runs
    from stream.independent import VALIDATION_SEEDS

    runs = encode_runs(bundle, SCENARIOS, tuple(project_seeds), n_frames, keep_pixels=True)
    return runs + encode_independent_runs(bundle, tuple(VALIDATION_SEEDS[:independent_runs]), n_frames,
                                          keep_pixels=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from operators.bundle import ModelBundle
    from stream.independent import VALIDATION_SEEDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--project-seeds", type=int, nargs="+", default=list(PROJECT_SEEDS))
    p.add_argument("--independent-runs", type=int, default=len(VALIDATION_SEEDS))
    p.add_argument("--embedding", default=None, help="a cluster_embedding checkpoint to score too")
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = ModelBundle.load(a.bundle)
    bundle.warmup()
    runs = validation_runs(bundle, tuple(a.project_seeds), a.independent_runs, a.frames)
    embedding = None
    if a.embedding:
        from operators.model.cluster_embedding import Embedding

        embedding = Embedding.load(a.embedding)
    rows = [bound_row(r, embedding) for r in runs]
    for r in rows:
        log.info("%s %d: ARI %s; separable %s", r.scenario, r.seed,
                 ", ".join(f"{k} {v:.3f}" for k, v in r.ari.items()),
                 ", ".join(f"{k} {v:.3f}" for k, v in r.separable.items()))
    result = {"bundle": f"{bundle.manifest['name']}:{bundle.manifest['version']}", "embedding": a.embedding,
              "frames": a.frames,
              "summary": summary(rows), "runs": [asdict(r) for r in rows]}
    print(json.dumps(result["summary"], indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
