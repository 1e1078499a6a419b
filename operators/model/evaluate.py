"""Evaluate a bundle on held-out synthetic runs through the serving path, one frame at a time.

    python -m operators.model.evaluate [--bundle PATH] [--frames 120] [--seeds 9001 9002] [--json out.json]

For each scenario and seed (seeds that training never used), every frame goes preprocessor -> encoder
(batch 1) -> projector -> a fresh per-run clusterer, in order, like the live pipeline. Reported per run:
- ARI: adjusted Rand index of the online cluster ids against the ground-truth phases (pending frames,
  id -1, count as their own label, so they cost ARI);
- continuity: the largest 2-D jump between consecutive frames of one phase, divided by the typical
  between-phase distance (median distance between the phases' 2-D centroids); < 1 means no within-phase
  jump is as large as going to another phase;
- new clusters announced (is_new) and the mean novelty.
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


def evaluate_run(bundle: ModelBundle, scenario: str, seed: int, n_frames: int) -> RunResult:
    from sklearn.metrics import adjusted_rand_score

    from stream.synthetic import generate_scan

    clusterer = bundle.new_clusterer()
    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    xy, ids, phases, nov = [], [], [], []
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
    xy_a, ids_a, ph_a = np.asarray(xy), np.asarray(ids), np.asarray(phases)
    jump, between = continuity(xy_a, ph_a)
    return RunResult(
        scenario=scenario, seed=seed, frames=n_frames, phases=len(np.unique(ph_a)),
        clusters_used=len(set(ids) - {-1}), new_clusters=new, pending_frames=int((ids_a == -1).sum()),
        ari=float(adjusted_rand_score(ph_a, ids_a)), max_within_phase_jump=jump,
        typical_between_phase_distance=between,
        continuity_ratio=jump / between if between and np.isfinite(between) else float("nan"),
        mean_novelty=float(np.mean(nov)), ms_per_frame=1000 * t_compute / max(1, n_frames),
    )


def evaluate(bundle_path: str | Path | None = None, *, n_frames: int = 120,
             seeds: tuple[int, ...] = HELDOUT_SEEDS, scenarios: tuple[str, ...] = SCENARIOS) -> dict:
    bundle = ModelBundle.load(bundle_path)
    bundle.warmup()
    runs = [evaluate_run(bundle, sc, seed, n_frames) for sc in scenarios for seed in seeds]
    for r in runs:
        log.info("%s seed %d: ARI %.3f, continuity %.2f (jump %.2f / between %.2f), clusters %d (+%d new), "
                 "pending %d", r.scenario, r.seed, r.ari, r.continuity_ratio, r.max_within_phase_jump,
                 r.typical_between_phase_distance, r.clusters_used, r.new_clusters, r.pending_frames)
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
