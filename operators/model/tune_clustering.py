"""Tune the online clustering of a bundle on validation runs, without re-encoding per setting.

    python -m operators.model.tune_clustering [--bundle PATH] [--seeds 7001 7002] [--frames 120]
        [--drift 0.2 0.1 0.05] [--noise-factor 6 10 14] [--recluster-every 0 3] [--run-min-cluster-size 6 10]
        [--epsilon-factor 1] [--spread-factor 0 2] [--spread-weight 0.05]
        [--split-separation-after-noise 1.75] [--still-factor 0 3] [--still-window 3]
        [--independent-runs 24] [--json out.json]

A setting not given keeps the bundle's value; the grid is every combination of the values given.

The run's re-clustering (operators.clustering, off by default) is swept with the --recluster-* options;
`encode_independent_runs` + `score_independent` score settings on the independent family's validation seeds
(ARI after corrections on plateau frames, onset lags) as `evaluate --family independent` does; with
`--independent-runs N` the sweep scores the first N of them beside the project's runs and ranks the settings
by the independent family's worst run first.

Each validation run (scenario x seed) is encoded once through the serving path (preprocessor -> the bundle's
clustering input, batch 1, exactly as `operators.model.evaluate`); then every setting is replayed on the cached
inputs with a fresh `OnlineClusterer`, so a grid costs milliseconds per setting instead of an encoder pass. The
rows it reports are the ARIs `evaluate` would report for a bundle carrying that setting.

Held-out seeds (`evaluate.HELDOUT_SEEDS`) are refused unless `--allow-heldout`: choose on validation seeds,
then report held-out figures once for the chosen setting.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from operators.bundle import ModelBundle
from operators.clustering import ClusteringSettings, ClusterState, OnlineClusterer
from operators.model.evaluate import HELDOUT_SEEDS, SCENARIOS, pooled_pixels

log = logging.getLogger(__name__)

VALIDATION_SEEDS = (7001, 7002)
KEPT_PIXEL_POOL = 4  # keep_pixels: the preprocessed frame over 4 x 4 blocks (128 x 128 of 512)


@dataclass(frozen=True)
class EncodedRun:
    scenario: str
    seed: int
    features: np.ndarray  # (n, d) float32 the clusterer's input (`ModelBundle.encode`), in frame order
    phases: np.ndarray  # (n,) ground-truth phase labels
    pixels: np.ndarray | None = None  # (n, S/4, S/4) the preprocessed frames, pooled (keep_pixels)


@dataclass(frozen=True)
class SweepRow:
    settings: dict
    mean_ari: float
    min_ari: float
    ari: dict[str, float]  # "scenario/seed" -> ARI
    # the independent family's validation runs, where given: ARI after corrections (as `evaluate` reports it)
    independent_mean_ari: float | None = None
    independent_min_ari: float | None = None
    independent_below: int | None = None  # runs under 0.9, the bar
    onsets_within_5: str | None = None  # "k/n": phases after a ramp that got an id of their own within 5 frames


def encode_runs(bundle: ModelBundle, scenarios: tuple[str, ...], seeds: tuple[int, ...], n_frames: int,
                *, allow_heldout: bool = False, keep_pixels: bool = False) -> list[EncodedRun]:
    """Encode each synthetic run once, frame by frame, as the live pipeline does (``keep_pixels``: keep each
    preprocessed frame too, pooled)."""
    from stream.synthetic import generate_scan

    bad = sorted(set(seeds) & set(HELDOUT_SEEDS))
    if bad and not allow_heldout:
        raise ValueError(f"seeds {bad} are held out for reporting; tune on validation seeds (e.g. {VALIDATION_SEEDS})")
    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    runs = []
    for scenario in scenarios:
        for seed in seeds:
            feats, ph, pix = [], [], []
            for fr in generate_scan(scenario, n_frames, seed=seed):
                bundle.preprocessor(fr.image, out=buf[0])
                feats.append(bundle.encode(buf)[1][0].copy())
                ph.append(fr.phase)
                if keep_pixels:
                    pix.append(pooled_pixels(buf[0, 0], KEPT_PIXEL_POOL))
            runs.append(EncodedRun(scenario, seed, np.asarray(feats, np.float32), np.asarray(ph),
                                   np.asarray(pix, np.float32) if keep_pixels else None))
            log.info("encoded %s seed %d: %d frames", scenario, seed, n_frames)
    return runs


def encode_independent_runs(bundle: ModelBundle, seeds: tuple[int, ...], n_frames: int,
                            *, keep_pixels: bool = False) -> list[EncodedRun]:
    """Encode runs of the independent family (stream.independent) once; phases: per frame its phase, negative
    on ramp frames (as `evaluate --family independent` scores them). Only validation seeds are accepted."""
    from operators.model.evaluate import independent_seeds
    from stream.independent import Renderer, draw_run

    seeds = independent_seeds("validation", seeds, len(seeds), n_frames)
    s = bundle.input_size
    buf = np.empty((1, 1, s, s), np.float32)
    runs = []
    for seed in seeds:
        spec = draw_run(seed, n_frames)
        feats, pix = [], []
        for fr in Renderer(spec):
            bundle.preprocessor(fr.image, out=buf[0])
            feats.append(bundle.encode(buf)[1][0].copy())
            if keep_pixels:
                pix.append(pooled_pixels(buf[0, 0], KEPT_PIXEL_POOL))
        runs.append(EncodedRun("independent", seed, np.asarray(feats, np.float32), np.asarray(spec.labels()),
                               np.asarray(pix, np.float32) if keep_pixels else None))
        log.info("encoded independent seed %d: %d frames", seed, n_frames)
    return runs


def score_independent(state: ClusterState, settings: ClusteringSettings, run: EncodedRun) -> dict:
    """What `evaluate --family independent` reports for one run: ARI on plateau frames (ids after corrections),
    live ARI, and the onset lag of each phase (None: never got an id of its own)."""
    from sklearn.metrics import adjusted_rand_score

    from operators.model.evaluate import onset_lags

    clusterer = OnlineClusterer(state, settings)
    live, corrections = [], []
    for f, z in enumerate(run.features):
        live.append(clusterer.learn_predict_one(z).cluster)
        fixes = clusterer.corrections()
        corrections += [(f, int(i), int(c)) for i, c in zip(fixes.indices, fixes.clusters, strict=True)]
    live_a = np.asarray(live)
    final = live_a.copy()
    for _, frame, cid in corrections:
        final[frame] = cid
    plateau = run.phases >= 0
    return {"ari": float(adjusted_rand_score(run.phases[plateau], final[plateau])),
            "ari_live": float(adjusted_rand_score(run.phases[plateau], live_a[plateau])),
            "lags": onset_lags(run.phases, live_a, corrections)}


def replay(state: ClusteringSettings | ClusterState, settings: ClusteringSettings, latents: np.ndarray,
           *, corrected: bool = False) -> np.ndarray:
    """Cluster ids a fresh per-run clusterer gives these latents, in order: as each point was sent, or
    (``corrected``) with the re-clustering's corrections applied at the end of the run."""
    clusterer = OnlineClusterer(state, settings)  # type: ignore[arg-type]
    live = np.asarray([clusterer.learn_predict_one(z).cluster for z in latents], np.int64)
    if not corrected:
        return live
    out = live.copy()
    out[-len(clusterer.labels()):] = clusterer.labels()
    return out


def sweep(state: ClusterState, runs: list[EncodedRun], candidates: list[ClusteringSettings],
          independent: list[EncodedRun] | None = None) -> list[SweepRow]:
    """One row per candidate setting, best mean ARI first (ties: better worst run first); with ``independent``
    runs, best worst independent run first, then the project's mean."""
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for cand in candidates:
        ari = {f"{r.scenario}/{r.seed}": float(adjusted_rand_score(r.phases, replay(state, cand, r.features)))
               for r in runs}
        vals = list(ari.values())
        row = SweepRow(cand.to_dict(), float(np.mean(vals)), float(np.min(vals)), ari)
        if independent:
            scored = [score_independent(state, cand, r) for r in independent]
            ind = [x["ari"] for x in scored]
            lags = [lag for x in scored for lag in x["lags"][1:]]
            row = replace(row, independent_mean_ari=float(np.mean(ind)), independent_min_ari=float(np.min(ind)),
                          independent_below=int(sum(a < 0.9 for a in ind)),
                          onsets_within_5=f"{sum(lag is not None and lag <= 5 for lag in lags)}/{len(lags)}")
        rows.append(row)
    if independent:
        rows.sort(key=lambda r: (-(r.independent_min_ari or 0.0), -r.mean_ari))
    else:
        rows.sort(key=lambda r: (-r.mean_ari, -r.min_ari))
    return rows


def grid(base: ClusteringSettings, values: dict[str, list | None]) -> list[ClusteringSettings]:
    """Every combination of the given values of `ClusteringSettings` fields (a field given None or [] keeps
    ``base``'s value)."""
    fields = [f for f, v in values.items() if v]
    return [replace(base, **dict(zip(fields, combo, strict=True)))
            for combo in itertools.product(*(values[f] for f in fields))]


# the settings a sweep varies: (command-line option, ClusteringSettings field, type, help)
AXES = (
    ("--drift", "drift", float, "regime-centre EMA weight"),
    ("--noise-factor", "noise_factor", float, "tau = this x the run's median step"),
    ("--recluster-every", "recluster_every", int, "0: no re-clustering"),
    ("--run-min-cluster-size", "run_min_cluster_size", int, None),
    ("--epsilon-factor", "run_epsilon_factor", float, None),
    ("--spread-factor", "spread_factor", float, "0: a regime's reach is tau"),
    ("--spread-weight", "spread_weight", float, None),
    ("--split-separation-after-noise", "split_separation_after_noise", float, None),
    ("--still-factor", "still_factor", float, "0: re-cluster every frame, not only the still ones"),
    ("--still-window", "still_window", int, None),
)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--seeds", type=int, nargs="+", default=list(VALIDATION_SEEDS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    for option, field, kind, help_ in AXES:
        p.add_argument(option, dest=field, type=kind, nargs="+", default=None, help=help_)
    p.add_argument("--independent-runs", type=int, default=0,
                   help="also score this many of the independent family's validation runs")
    p.add_argument("--allow-heldout", action="store_true", help="permit held-out seeds (reporting only)")
    p.add_argument("--json", default=None, help="write all rows here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = ModelBundle.load(a.bundle)
    bundle.warmup()
    runs = encode_runs(bundle, tuple(a.scenarios), tuple(a.seeds), a.frames, allow_heldout=a.allow_heldout)
    independent = []
    if a.independent_runs:
        from stream.independent import VALIDATION_SEEDS as INDEPENDENT_VALIDATION

        independent = encode_independent_runs(bundle, INDEPENDENT_VALIDATION[:a.independent_runs], a.frames)
    values = {field: getattr(a, field) for _, field, _, _ in AXES}
    rows = sweep(bundle.clustering_state, runs, grid(bundle.clustering_settings, values), independent)
    for r in rows:
        varied = " ".join(f"{f} {r.settings[f]:g}" for f, v in values.items() if v)
        scored = (f"{r.independent_mean_ari:.3f} / {r.independent_min_ari:.3f} ({r.independent_below} below "
                  f"0.9, onsets {r.onsets_within_5})") if independent else "not scored"
        log.info("%s: mean ARI %.3f, min %.3f; independent %s", varied or "the bundle's settings", r.mean_ari,
                 r.min_ari, scored)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
