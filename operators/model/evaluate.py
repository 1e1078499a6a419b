"""Evaluate a bundle on held-out synthetic runs through the serving path, one frame at a time.

    python -m operators.model.evaluate [--bundle PATH] [--frames 120] [--seeds 9001 9002] [--json out.json]

For each scenario and seed (seeds that training never used), every frame goes preprocessor -> encoder
(batch 1) -> projector -> a fresh per-run clusterer, in order, like the live pipeline. Reported per run:
- ARI: adjusted Rand index of the online cluster ids against the ground-truth phases (pending frames,
  id -1, count as their own label, so they cost ARI);
- continuity: the largest 2-D jump between consecutive frames of one phase, divided by the typical
  between-phase distance (median distance between the phases' 2-D centroids); < 1 means no within-phase
  jump is as large as going to another phase;
- new clusters announced (is_new) and the mean novelty;
- boundary contrast, in the latent (the clustering's space: L2-normalised, then the bundle's PCA) and in
  the pixels (the preprocessed frame, 8x8-pooled): for each phase boundary, the change across it divided by
  the larger change within the two phases it separates (see `boundary_contrast`); the run's figure is its
  weakest boundary. Below 1, a phase changes more within itself than at its boundary, so a distance-based
  online rule cannot cut it cleanly in that space; latent over pixels says whether the encoder sharpens or
  blurs the boundary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from operators.bundle import ModelBundle

log = logging.getLogger(__name__)

SCENARIOS = ("film_formation", "crystallization", "gisaxs_ordering", "shear_alignment")
HELDOUT_SEEDS = (9001, 9002)


@dataclass
class RunResult:
    scenario: str
    seed: int
    frames: int
    phases: int
    clusters_used: int
    new_clusters: int
    pending_frames: int
    ari: float
    max_within_phase_jump: float
    typical_between_phase_distance: float
    continuity_ratio: float
    mean_novelty: float
    boundary_contrast_latent: float
    boundary_contrast_pixels: float
    ms_per_frame: float


def continuity(xy: np.ndarray, phases: np.ndarray) -> tuple[float, float]:
    """(largest consecutive 2-D jump inside one phase, median distance between phase centroids)."""
    same = phases[1:] == phases[:-1]
    jumps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    max_jump = float(jumps[same].max()) if same.any() else 0.0
    ids = np.unique(phases)
    cents = np.stack([xy[phases == p].mean(0) for p in ids])
    if len(ids) < 2:
        return max_jump, float("nan")
    d = np.linalg.norm(cents[:, None] - cents[None], axis=-1)[np.triu_indices(len(ids), 1)]
    return max_jump, float(np.median(d))


BOUNDARY_GAP = 3  # frames skipped on each side of a boundary (the generator cross-fades over 2-8 frames)
BOUNDARY_WINDOW = 4  # frames averaged on each side, so one frame's counting noise does not decide it


def boundary_contrast(x: np.ndarray, phases: np.ndarray) -> float:
    """Weakest phase boundary of a run: min over boundaries of (distance between the mean of the
    BOUNDARY_WINDOW frames before and after it, BOUNDARY_GAP frames away) / (the larger distance between the
    first and last frames of the two phases it separates, same windows). nan for a run of one phase, or one
    too short for the windows."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    starts = [0, *(int(i) for i in np.flatnonzero(phases[1:] != phases[:-1]) + 1), len(x)]
    g, w = BOUNDARY_GAP, BOUNDARY_WINDOW
    # each phase's first and last windows, kept BOUNDARY_GAP away from the boundaries it shares
    firsts = [starts[k] + (g if k else 0) for k in range(len(starts) - 1)]
    lasts = [starts[k + 1] - (g if k + 2 < len(starts) else 0) - w for k in range(len(starts) - 1)]
    if len(firsts) < 2 or any(last < first for first, last in zip(firsts, lasts, strict=True)):
        return float("nan")

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(x[b:b + w].mean(0) - x[a:a + w].mean(0)))

    within = [dist(f, last) for f, last in zip(firsts, lasts, strict=True)]
    return min(
        dist(lasts[k - 1], firsts[k]) / max(within[k - 1], within[k], 1e-12) for k in range(1, len(firsts)))


def evaluate_run(bundle: ModelBundle, scenario: str, seed: int, n_frames: int) -> RunResult:
    from sklearn.metrics import adjusted_rand_score

    from stream.synthetic import generate_scan

    clusterer = bundle.new_clusterer()
    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    xy, ids, phases, nov, reduced, pooled = [], [], [], [], [], []
    state = bundle.clustering_state
    new = 0
    t_compute = 0.0
    for fr in generate_scan(scenario, n_frames, seed=seed):
        t0 = time.perf_counter()
        bundle.preprocessor(fr.image, out=buf[0])
        z = bundle.encoder.encode(buf)
        p = bundle.projector.project(z)
        a = clusterer.learn_predict_one(z[0])
        t_compute += time.perf_counter() - t0
        xy.append(p[0])
        ids.append(a.cluster)
        phases.append(fr.phase)
        nov.append(a.novelty)
        new += int(a.is_new)
        reduced.append(state.reduce(z)[0])
        pooled.append(buf[0, 0].reshape(s // 8, 8, s // 8, 8).mean((1, 3)))
    xy_a, ids_a, ph_a = np.asarray(xy), np.asarray(ids), np.asarray(phases)
    jump, between = continuity(xy_a, ph_a)
    return RunResult(
        scenario=scenario, seed=seed, frames=n_frames, phases=len(np.unique(ph_a)),
        clusters_used=len(set(ids) - {-1}), new_clusters=new, pending_frames=int((ids_a == -1).sum()),
        ari=float(adjusted_rand_score(ph_a, ids_a)), max_within_phase_jump=jump,
        typical_between_phase_distance=between,
        continuity_ratio=jump / between if between and np.isfinite(between) else float("nan"),
        mean_novelty=float(np.mean(nov)),
        boundary_contrast_latent=boundary_contrast(np.asarray(reduced), ph_a),
        boundary_contrast_pixels=boundary_contrast(np.asarray(pooled), ph_a),
        ms_per_frame=1000 * t_compute / max(1, n_frames),
    )


def evaluate(bundle_path: str | Path | None = None, *, n_frames: int = 120,
             seeds: tuple[int, ...] = HELDOUT_SEEDS, scenarios: tuple[str, ...] = SCENARIOS) -> dict:
    bundle = ModelBundle.load(bundle_path)
    bundle.warmup()
    runs = [evaluate_run(bundle, sc, seed, n_frames) for sc in scenarios for seed in seeds]
    for r in runs:
        log.info("%s seed %d: ARI %.3f, continuity %.2f (jump %.2f / between %.2f), clusters %d (+%d new), "
                 "pending %d, boundary contrast %.2f latent / %.2f pixels", r.scenario, r.seed, r.ari,
                 r.continuity_ratio, r.max_within_phase_jump, r.typical_between_phase_distance,
                 r.clusters_used, r.new_clusters, r.pending_frames, r.boundary_contrast_latent,
                 r.boundary_contrast_pixels)
    aris = [r.ari for r in runs]
    ratios = [r.continuity_ratio for r in runs if np.isfinite(r.continuity_ratio)]
    return {
        "bundle": bundle.autoencoder_model,
        "frames_per_run": n_frames,
        "seeds": list(seeds),
        "mean_ari": float(np.mean(aris)),
        "min_ari": float(np.min(aris)),
        "max_continuity_ratio": float(np.max(ratios)) if ratios else float("nan"),
        "runs": [asdict(r) for r in runs],
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--seeds", type=int, nargs="+", default=list(HELDOUT_SEEDS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = evaluate(a.bundle, n_frames=a.frames, seeds=tuple(a.seeds), scenarios=tuple(a.scenarios))
    text = json.dumps(res, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
