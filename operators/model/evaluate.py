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

The independent family (`--family independent`, `evaluate_independent`): runs of `stream.independent`, a
generator written apart from the training one (other detectors, beam anywhere, four phases in every order,
ramps of 5-40 frames). Settings are chosen on its validation seeds; its held-out seeds are scored once.
Reported per run, besides the figures above:
- ARI on the plateau frames (ramp frames, a mix of two phases, are left out), with the ids as they stand at
  the end of the run (corrections applied, if the clusterer makes any: `clusterer.corrections()`);
  `ari_live` with the ids as first sent, `ari_with_ramps` with ramp frames labelled by the phase they ramp
  into from their midpoint;
- the onset lag of each phase (`onset_lags`): frames from the end of its ramp until a frame of the phase first
  carries, live or corrected, an id that no frame of an earlier phase carries at that moment; None if that
  never happens while the phase lasts. The first phase, which has no ramp, is measured from the run's start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from operators.bundle import ModelBundle
from operators.clustering import PENDING

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
    boundary_contrast_latent: float  # in the clustering's reduced space (of the latent, or the cluster features)
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


PIXEL_POOL = 8  # the pixels' side of a figure: the preprocessed frame averaged over 8 x 8 blocks


def pooled_pixels(image: np.ndarray, factor: int = PIXEL_POOL) -> np.ndarray:
    """A preprocessed frame (S, S) averaged over factor x factor blocks: (S / factor, S / factor)."""
    s = image.shape[-1]
    return image.reshape(s // factor, factor, s // factor, factor).mean((1, 3))


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
        z, features = bundle.encode(buf)
        p = bundle.projector.project(z)
        a = clusterer.learn_predict_one(features[0])
        t_compute += time.perf_counter() - t0
        xy.append(p[0])
        ids.append(a.cluster)
        phases.append(fr.phase)
        nov.append(a.novelty)
        new += int(a.is_new)
        reduced.append(state.reduce(features)[0])
        pooled.append(pooled_pixels(buf[0, 0]))
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


@dataclass
class PhaseOnset:
    phase: str
    ramp_frames: int
    ramp_end: int  # the phase's first frame after its ramp
    lag: int | None  # frames from ramp_end until it first shows an id of its own; None: never


@dataclass
class IndependentRunResult:
    seed: int
    split: str
    detector: str
    regime: str
    beam_center: list[float]  # (row, column) in pixels
    order: list[str]
    frames: int
    plateau_frames: int
    clusters_used: int
    new_clusters: int
    pending_frames: int
    corrected_frames: int  # frames whose id a correction changed after it was sent
    ari: float
    ari_live: float
    ari_with_ramps: float
    onsets: list[PhaseOnset]
    max_onset_lag: int | None  # None if a phase never got an id of its own
    max_within_phase_jump: float
    typical_between_phase_distance: float
    continuity_ratio: float
    boundary_contrast_latent: float  # in the clustering's reduced space (of the latent, or the cluster features)
    boundary_contrast_pixels: float
    ms_per_frame: float


def onset_lags(labels: np.ndarray, live: np.ndarray,
               corrections: Sequence[tuple[int, int, int]] = ()) -> list[int | None]:
    """Onset lag of each phase, in the order the phases come.

    labels: per frame its phase, or a negative number for a ramp frame; each phase's frames are contiguous.
    live: per frame the id sent with it. corrections: (step, frame, id): after frame `step` was processed,
    frame `frame` carries `id`. A phase's lag is the first step f (counted from its first frame) at which one
    of its frames up to f carries an id (not PENDING) that no frame of an earlier phase carries after step f.
    """
    labels, live = np.asarray(labels), np.asarray(live)
    phases = list(dict.fromkeys(int(p) for p in labels if p >= 0))
    by_step: dict[int, list[tuple[int, int]]] = {}
    for step, frame, cid in corrections:
        by_step.setdefault(step, []).append((frame, cid))
    ids = np.full(len(live), PENDING, np.int64)
    known: list[np.ndarray] = []  # ids after each step
    for f, cid in enumerate(live):
        ids[f] = cid
        for frame, c in by_step.get(f, ()):
            ids[frame] = c
        known.append(ids.copy())
    lags: list[int | None] = []
    for k, phase in enumerate(phases):
        own = np.flatnonzero(labels == phase)
        start, stop = int(own[0]), int(own[-1]) + 1
        earlier = np.isin(labels, phases[:k])
        lag = None
        for f in range(start, stop):
            now = known[f]
            shown = set(now[start:f + 1].tolist()) - {PENDING} - set(now[earlier].tolist())
            if shown:
                lag = f - start
                break
        lags.append(lag)
    return lags


def _latest(lags: list[int | None]) -> int | None:
    """The largest lag, or None if some phase never got an id of its own."""
    known = [v for v in lags if v is not None]
    return max(known) if known and len(known) == len(lags) else None


def evaluate_independent_run(bundle: ModelBundle, seed: int, n_frames: int) -> IndependentRunResult:
    from sklearn.metrics import adjusted_rand_score

    from stream.independent import PHASES, Renderer, draw_run

    spec = draw_run(seed, n_frames)
    clusterer = bundle.new_clusterer()
    take_corrections = getattr(clusterer, "corrections", None)  # a re-clustering clusterer corrects sent ids
    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    state = bundle.clustering_state
    xy, live, reduced, pooled = [], [], [], []
    corrections: list[tuple[int, int, int]] = []
    new = 0
    t_compute = 0.0
    for fr in Renderer(spec):
        t0 = time.perf_counter()
        bundle.preprocessor(fr.image, out=buf[0])
        z, features = bundle.encode(buf)
        p = bundle.projector.project(z)
        a = clusterer.learn_predict_one(features[0])
        fixes = take_corrections() if take_corrections else None
        t_compute += time.perf_counter() - t0
        if fixes:
            corrections += [(fr.index, int(i), int(c))
                            for i, c in zip(fixes.indices, fixes.clusters, strict=True)]
            new += len(fixes.new_clusters)
        xy.append(p[0])
        live.append(a.cluster)
        new += int(a.is_new)
        reduced.append(state.reduce(features)[0])
        pooled.append(pooled_pixels(buf[0, 0]))
    labels, live_a = spec.labels(), np.asarray(live)
    final = live_a.copy()
    for _, frame, cid in corrections:
        final[frame] = cid
    plateau = labels >= 0
    xy_p, lab_p = np.asarray(xy)[plateau], labels[plateau]
    jump, between = continuity(xy_p, lab_p)
    lags = onset_lags(labels, live_a, corrections)
    onsets = [PhaseOnset(PHASES[seg.phase], seg.ramp_frames, seg.start, lag)
              for seg, lag in zip(spec.segments, lags, strict=True)]
    return IndependentRunResult(
        seed=seed, split=spec.split, detector=spec.setup.detector.name, regime=spec.material.regime,
        beam_center=[round(v, 1) for v in spec.setup.beam_rc], order=[PHASES[p] for p in spec.order],
        frames=n_frames, plateau_frames=int(plateau.sum()),
        clusters_used=len(set(final.tolist()) - {PENDING}),
        new_clusters=new, pending_frames=int((final == PENDING).sum()),
        corrected_frames=int((final != live_a).sum()),
        ari=float(adjusted_rand_score(lab_p, final[plateau])),
        ari_live=float(adjusted_rand_score(lab_p, live_a[plateau])),
        ari_with_ramps=float(adjusted_rand_score(spec.midpoint_labels(), final)),
        onsets=onsets, max_onset_lag=_latest(lags),
        max_within_phase_jump=jump, typical_between_phase_distance=between,
        continuity_ratio=jump / between if between and np.isfinite(between) else float("nan"),
        boundary_contrast_latent=boundary_contrast(np.asarray(reduced)[plateau], lab_p),
        boundary_contrast_pixels=boundary_contrast(np.asarray(pooled)[plateau], lab_p),
        ms_per_frame=1000 * t_compute / max(1, n_frames),
    )


def independent_seeds(split: str, seeds: tuple[int, ...] | None = None, runs: int = 8,
                      n_frames: int = 120) -> tuple[int, ...]:
    """The seeds to score: `seeds`, or the first `runs` of the independent family's `split` (validation |
    heldout). ValueError for a seed outside the split (a held-out seed is never scored by mistake while
    settings are being chosen) or runs too short for their phases."""
    from stream.independent import HELDOUT_SEEDS as INDEPENDENT_HELDOUT
    from stream.independent import VALIDATION_SEEDS, draw_run

    splits = {"validation": VALIDATION_SEEDS, "heldout": INDEPENDENT_HELDOUT}
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    allowed = splits[split]
    chosen = tuple(seeds or allowed[:runs])
    if outside := sorted(set(chosen) - set(allowed)):
        raise ValueError(f"seeds {outside} are not {split} seeds of the independent family "
                         f"({allowed[0]}-{allowed[-1]})")
    draw_run(chosen[0], n_frames)  # raises if n_frames cannot hold four phases and their ramps
    return chosen


def evaluate_independent(bundle_path: str | Path | None = None, *, split: str = "validation",
                         seeds: tuple[int, ...] | None = None, runs: int = 8, n_frames: int = 120) -> dict:
    """Score a bundle on the independent family (seeds chosen by `independent_seeds`)."""
    seeds = independent_seeds(split, seeds, runs, n_frames)
    bundle = ModelBundle.load(bundle_path)
    bundle.warmup()
    results = []
    for seed in seeds:
        r = evaluate_independent_run(bundle, seed, n_frames)
        log.info("independent %s seed %d (%s, %s, %s): ARI %.3f (live %.3f, with ramps %.3f), onset lags %s, "
                 "continuity %.2f, boundary contrast %.2f latent / %.2f pixels", split, seed, r.detector,
                 r.regime, " > ".join(r.order), r.ari, r.ari_live, r.ari_with_ramps,
                 [o.lag for o in r.onsets], r.continuity_ratio, r.boundary_contrast_latent,
                 r.boundary_contrast_pixels)
        results.append(r)
    aris = [r.ari for r in results]
    lags = [o.lag for r in results for o in r.onsets]
    ratios = [r.continuity_ratio for r in results if np.isfinite(r.continuity_ratio)]
    clusterer = bundle.new_clusterer()
    settings = getattr(clusterer, "settings", None)
    return {
        "bundle": bundle.autoencoder_model,
        "clusterer": f"{type(clusterer).__module__}.{type(clusterer).__qualname__}",
        "clusterer_settings": asdict(settings) if is_dataclass(settings) else None,
        "family": "independent",
        "split": split,
        "frames_per_run": n_frames,
        "seeds": list(seeds),
        "mean_ari": float(np.mean(aris)),
        "min_ari": float(np.min(aris)),
        "max_onset_lag": _latest(lags),
        "phases_without_own_id": lags.count(None),
        "phases_later_than_5_frames": sum(1 for v in lags if v is None or v > 5),
        "max_continuity_ratio": float(np.max(ratios)) if ratios else float("nan"),
        "runs": [asdict(r) for r in results],
    }


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
    p.add_argument("--family", choices=("scenarios", "independent"), default="scenarios")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"default: {list(HELDOUT_SEEDS)} (scenarios), the split's first --runs (independent)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    p.add_argument("--split", choices=("validation", "heldout"), default="validation",
                   help="independent family: choose settings on validation, score heldout once")
    p.add_argument("--runs", type=int, default=8, help="independent family: the split's first N seeds")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = tuple(a.seeds) if a.seeds else None
    if a.family == "independent":
        res = evaluate_independent(a.bundle, split=a.split, seeds=seeds, runs=a.runs, n_frames=a.frames)
    else:
        res = evaluate(a.bundle, n_frames=a.frames, seeds=seeds or HELDOUT_SEEDS,
                       scenarios=tuple(a.scenarios))
    text = json.dumps(res, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
