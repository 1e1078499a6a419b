"""The online clustering on a cluster embedding's features beside the bundle's latent, on validation runs (issue 15).

    python -m operators.model.embedding_clustering --embedding runs/cluster_embedding/last.pt \
        [--drift 0.2 0.1] [--noise-factor 4 8] [--recluster-every 0 3] [--reference-frames 800] [--json out.json]

Each validation run (the project's scenarios, seeds 7001-7004; the independent family's validation seeds) is
encoded once with its pixels kept (`tune_clustering`), and its frames embedded (`cluster_embedding`). Every
setting of the grid is then replayed through a fresh `OnlineClusterer`, the service's own, in two spaces:
- `served`: the bundle's clustering input (its cluster features, else its latents) and fitted state, as served;
- `embedding`: the embedding's features in place of the latents, with a state (reduction and reference clusters)
  fitted by `fit_clustering` on `--reference-frames` frames of the project's training scenario (seed 100).
Reported per space and setting: the project's mean and worst ARI (corrections applied), the independent
family's mean and worst ARI on plateau frames, its runs below 0.9, and how many of its phases got an id of their
own within 5 frames of the end of their ramp. Held-out seeds are refused; choose here, score held-out once.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from operators.clustering import ClusteringSettings, ClusterState, fit_clustering
from operators.model.tune_clustering import KEPT_PIXEL_POOL, EncodedRun, replay, score_independent

if TYPE_CHECKING:
    from operators.bundle import ModelBundle

log = logging.getLogger(__name__)

REFERENCE_SEED = 100
ONSET_FRAMES = 5


@dataclass(frozen=True)
class OnlineRow:
    space: str  # "served" | "embedding"
    drift: float
    noise_factor: float
    recluster_every: int
    project_mean: float
    project_worst: float
    independent_mean: float
    independent_worst: float
    independent_below_0_9: int
    onsets_within_5: int
    phases_after_a_ramp: int


def embedded(runs: list[EncodedRun], embed: Callable[[np.ndarray], np.ndarray]) -> list[EncodedRun]:
    """The runs with the embedding's features of their kept pixels in place of their latents."""
    if any(r.pixels is None for r in runs):
        raise ValueError("runs must be encoded with keep_pixels=True")
    return [replace(r, features=np.asarray(embed(r.pixels), np.float32)) for r in runs]


def reference_state(bundle: ModelBundle, embed: Callable[[np.ndarray], np.ndarray], n_frames: int,
                    settings: ClusteringSettings) -> ClusterState:
    """A clustering state in the embedding's space, fitted on frames of the project's training scenario."""
    from operators.model.evaluate import pooled_pixels
    from stream.synthetic import generate_scan

    s = bundle.input_size
    buf = np.empty((1, s, s), np.float32)
    pixels = []
    for fr in generate_scan("training", n_frames, seed=REFERENCE_SEED):
        bundle.preprocessor(fr.image, out=buf)
        pixels.append(pooled_pixels(buf[0], KEPT_PIXEL_POOL))
    return fit_clustering(np.asarray(embed(np.asarray(pixels))), settings)[0]


def score(space: str, state: ClusterState, settings: ClusteringSettings, runs: list[EncodedRun]) -> OnlineRow:
    from sklearn.metrics import adjusted_rand_score

    project = [adjusted_rand_score(r.phases, replay(state, settings, r.features,
                                                    corrected=settings.recluster_every > 0))
               for r in runs if r.scenario != "independent"]
    independent = [score_independent(state, settings, r) for r in runs if r.scenario == "independent"]
    ari = np.asarray([x["ari"] for x in independent])
    lags = [lag for x in independent for lag in x["lags"][1:]]  # the first phase has no ramp
    return OnlineRow(space, settings.drift, settings.noise_factor, settings.recluster_every,
                     float(np.mean(project)), float(np.min(project)), float(ari.mean()), float(ari.min()),
                     int((ari < 0.9).sum()), sum(lag is not None and lag <= ONSET_FRAMES for lag in lags), len(lags))


def compare(bundle: ModelBundle, embed: Callable[[np.ndarray], np.ndarray], runs: list[EncodedRun],
            candidates: list[ClusteringSettings], reference_frames: int) -> list[OnlineRow]:
    """One row per space and candidate setting."""
    state = reference_state(bundle, embed, reference_frames, bundle.clustering_settings)
    log.info("embedding: %d reference clusters from %d frames", len(state.centers), reference_frames)
    emb_runs = embedded(runs, embed)
    rows = []
    for cand in candidates:
        rows.append(score("served", bundle.clustering_state, cand, runs))
        rows.append(score("embedding", state, cand, emb_runs))
        log.info("%s | %s", rows[-2], rows[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    from operators.bundle import ModelBundle
    from operators.model.cluster_embedding import Embedding
    from operators.model.clustering_bound import PROJECT_SEEDS, validation_runs
    from stream.independent import VALIDATION_SEEDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedding", required=True, help="a cluster_embedding checkpoint")
    p.add_argument("--bundle", default=None)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--project-seeds", type=int, nargs="+", default=list(PROJECT_SEEDS))
    p.add_argument("--independent-runs", type=int, default=len(VALIDATION_SEEDS))
    p.add_argument("--drift", type=float, nargs="+", default=[0.2, 0.1])
    p.add_argument("--noise-factor", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--recluster-every", type=int, nargs="+", default=[0, 3])
    p.add_argument("--reference-frames", type=int, default=800)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = ModelBundle.load(a.bundle)
    bundle.warmup()
    runs = validation_runs(bundle, tuple(a.project_seeds), a.independent_runs, a.frames)
    base = bundle.clustering_settings
    candidates = [replace(base, drift=d, noise_factor=n, recluster_every=r)
                  for d, n, r in itertools.product(a.drift, a.noise_factor, a.recluster_every)]
    rows = compare(bundle, Embedding.load(a.embedding), runs, candidates, a.reference_frames)
    result = {"bundle": f"{bundle.manifest['name']}:{bundle.manifest['version']}", "embedding": a.embedding,
              "frames": a.frames, "rows": [asdict(r) for r in rows]}
    print(json.dumps(result["rows"], indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
