"""Fit a beamline's own map on its recorded frames' latents and write it as a new bundle beside BASE's encoder.

    latents (encoded by BASE's ONNX encoder) -> hold back a tenth -> UMAP (the paper's settings, capped to
    the data) on the rest -> two approximators (an MLP, scikit-learn; a soft nearest-neighbour kernel) ->
    each checked against umap-learn's own `transform` on the held-back frames; the more faithful is served ->
    refused, or written with the clustering reference and where each frame came from. The clustering is refitted
    on the frames' clustering input (BASE's cluster features where it has them, which travel with the encoder).

The check's unit is the map's extent: the longer side of the bounding box of the fitted UMAP embedding. The
bundle is refused (`ApproximatorRefused`, nothing written) when the root-mean-square distance between the
approximator's and umap-learn's placement of the held-back frames exceeds `max_error` of that extent.
No torch anywhere on this path.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from operators.adapt.approximator import (
    export_kernel_onnx,
    export_mlp_onnx,
    fit_kernel_approximator,
    fit_mlp_approximator,
)
from operators.bundle import MANIFEST, ModelBundle, installed_version, sha256_file, write_manifest
from operators.clustering import fit_clustering
from operators.projection import APPROX_ONNX, UMAP_JOBLIB, UMAP_SETTINGS, l2_normalise

log = logging.getLogger(__name__)

REFERENCE_SOURCES = "reference_sources.json"
DEFAULT_MAX_ERROR = 0.05  # rms, in units of the map's extent
MIN_FRAMES = 20


class AdaptError(ValueError):
    """The frames cannot make a bundle (too few, wrong shape)."""


class ApproximatorRefused(AdaptError):
    """The approximator disagrees with umap-learn beyond the bound: no bundle was written."""


@dataclass(frozen=True)
class AdaptSettings:
    seed: int = 0
    holdout_fraction: float = 0.1
    max_error: float = DEFAULT_MAX_ERROR
    name: str | None = None  # default: BASE's name + "-adapted"
    approximator_iterations: int = 600


@dataclass
class ApproximatorCheck:
    kind: str  # "mlp" | "kernel": the one served
    heldout_frames: int
    extent: float  # longer side of the fitted embedding's bounding box
    rms_error: float  # in units of the extent
    max_error: float
    bound: float
    rms_by_kind: dict[str, float] = field(default_factory=dict)  # every candidate's rms error

    @property
    def passed(self) -> bool:
        return self.rms_error <= self.bound


@dataclass
class AdaptReport:
    bundle: Path | None
    frames: int
    clusters: int
    check: ApproximatorCheck
    caps: list[str] = field(default_factory=list)


def capped_settings(n_fit: int, n_all: int) -> tuple[dict[str, Any], int | None, list[str]]:
    """UMAP settings and HDBSCAN min_cluster_size that fit this many frames, and what was capped (said aloud)."""
    caps: list[str] = []
    umap_settings = dict(UMAP_SETTINGS)
    # The paper's 30 neighbours are ~2 % of its reference set; on a few dozen frames 30 would join every frame
    # to every other and the layout would be noise: keep at most a quarter of the frames as neighbours.
    neighbours = max(2, min(umap_settings["n_neighbors"], n_fit // 4))
    if neighbours != umap_settings["n_neighbors"]:
        caps.append(
            f"UMAP n_neighbors {umap_settings['n_neighbors']} -> {neighbours} ({n_fit} frames fitted)"
        )
        umap_settings["n_neighbors"] = neighbours
    min_cluster_size = None
    if n_all < 500:  # the reference default max(10, n // 50) would leave one cluster or none
        min_cluster_size = max(3, min(10, n_all // 4))
        caps.append(f"HDBSCAN min_cluster_size 10 -> {min_cluster_size} ({n_all} frames)")
    return umap_settings, min_cluster_size, caps


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_held = max(2, round(n * fraction))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def adapt_bundle(
    latents: np.ndarray,
    origins: list[dict[str, Any]],
    base: ModelBundle,
    out: Path,
    *,
    features: np.ndarray | None = None,
    settings: AdaptSettings = AdaptSettings(),
    provenance: dict[str, Any] | None = None,
    stage: Callable[[str], None] = lambda s: None,
) -> AdaptReport:
    """Fit, check and write (see module doc). origins[i]: where frame i came from ({source, index, dataset});
    features[i]: what BASE's clustering takes for frame i (`ModelBundle.encode`; default: its latent)."""
    import joblib
    import umap

    n = len(latents)
    if n < MIN_FRAMES:
        raise AdaptError(f"{n} frames: adapt needs at least {MIN_FRAMES}")
    if len(origins) != n:
        raise AdaptError(f"{len(origins)} origins for {n} frames")
    fit_idx, held_idx = _split(n, settings.holdout_fraction, settings.seed)
    umap_settings, min_cluster_size, caps = capped_settings(len(fit_idx), n)
    for c in caps:
        log.info("capped to the data: %s", c)

    stage(f"UMAP on {len(fit_idx)} frames")
    x = l2_normalise(latents)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # n_jobs/random_state notice; spectral init falling back on few points
        reducer = umap.UMAP(**umap_settings, random_state=settings.seed)
        fit_emb = reducer.fit_transform(x[fit_idx]).astype(np.float32)
        held_umap = reducer.transform(x[held_idx]).astype(np.float32)

    stage("approximator")
    extent = float(max((fit_emb.max(0) - fit_emb.min(0)).max(), 1e-6))
    candidates = {
        "mlp": fit_mlp_approximator(latents[fit_idx], fit_emb, max_iter=settings.approximator_iterations,
                                    seed=settings.seed),
        "kernel": fit_kernel_approximator(latents[fit_idx], fit_emb),
    }  # fmt: skip
    errors = {k: np.linalg.norm(a.predict(latents[held_idx]) - held_umap, axis=1) / extent
              for k, a in candidates.items()}  # fmt: skip
    rms = {k: float(np.sqrt((d**2).mean())) for k, d in errors.items()}
    kind = min(rms, key=rms.__getitem__)  # the more faithful to umap-learn is the one served
    check = ApproximatorCheck(kind, len(held_idx), extent, rms[kind], float(errors[kind].max()),
                              settings.max_error, rms)  # fmt: skip
    log.info("%s approximator vs umap-learn transform on %d held-back frames: rms %.2f%%, max %.2f%% of the "
             "map's extent (bound %.2f%%; rms of each: %s)", kind, check.heldout_frames, 100 * check.rms_error,
             100 * check.max_error, 100 * check.bound, {k: round(100 * v, 2) for k, v in rms.items()})  # fmt: skip
    if not check.passed:
        raise ApproximatorRefused(
            f"the projection approximator places the {check.heldout_frames} held-back frames "
            f"{100 * check.rms_error:.2f}% (rms) of the map's extent away from umap-learn's own transform; "
            f"the bound is {100 * check.bound:.2f}%: no bundle written. More (or more varied) frames, or a "
            "looser --max-approx-error, may pass"
        )

    stage("clustering")
    features = latents if features is None else features
    if len(features) != n:
        raise AdaptError(f"{len(features)} feature rows for {n} frames")
    state, ref_clusters = fit_clustering(features, base.clustering_settings, min_cluster_size=min_cluster_size,
                                         seed=settings.seed)  # fmt: skip

    stage("writing the bundle")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".adapt-", dir=out.parent))
    try:
        for rel in (base.manifest["encoder"]["onnx"], base.manifest["clustering"].get("features")):
            if rel:  # the clustering's feature graph travels with the encoder: the new state is fitted on it
                shutil.copy2(base.path / rel, work / rel)
        if kind == "mlp":
            export_mlp_onnx(candidates["mlp"], work / APPROX_ONNX)
        else:
            export_kernel_onnx(candidates["kernel"], work / APPROX_ONNX)
        from operators.projection import OnnxProjector

        served = OnnxProjector(work / APPROX_ONNX).project(latents)  # the reference map is what serving draws
        umap_emb = np.empty((n, 2), np.float32)
        umap_emb[fit_idx], umap_emb[held_idx] = fit_emb, held_umap
        joblib.dump(reducer, work / UMAP_JOBLIB, compress=3)
        state.save(work / "clustering.npz")
        np.savez(work / "reference.npz", embedding=served, clusters=ref_clusters, umap_embedding=umap_emb,
                 labels=np.asarray([""] * n, dtype="U32"))  # fmt: skip
        (work / REFERENCE_SOURCES).write_text(json.dumps({"frames": origins}, indent=0) + "\n")
        write_manifest(work, _manifest(base, settings, umap_settings, check, state, n, caps, provenance))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        out.chmod(0o755)  # mkdtemp made it private; the service user must read it
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    ModelBundle.load(out)  # what we wrote must load and verify
    log.info("bundle %s written: %d reference frames, %d clusters", out, n, len(state.centers))
    return AdaptReport(out, n, len(state.centers), check, caps)


def _manifest(base: ModelBundle, settings: AdaptSettings, umap_settings: dict[str, Any],
              check: ApproximatorCheck, state: Any, n: int, caps: list[str],
              provenance: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    m = copy.deepcopy(base.manifest)
    for key in ("format", "created", "libraries", "files", "training", "n_reference", "reference_sources"):
        m.pop(key, None)
    m["name"] = settings.name or f"{base.manifest['name']}-adapted"
    m["description"] = f"{base.autoencoder_model}'s encoder with a map fitted on {n} recorded frames"
    m["encoder"] = {**m["encoder"], "onnx_static": None, "torchscript": None}
    m["projection"] = {
        "name": "umap-approx",
        "method": f"umap-learn on L2-normalised latents, served by a {check.kind} approximator (ONNX)",
        "settings": {**umap_settings, "l2_normalise": True, "random_state": settings.seed},
        "approximator": APPROX_ONNX,
        "umap": UMAP_JOBLIB,
        "approximator_check": {
            **asdict(check),
            "unit": "fraction of the map's extent (longer side of its bounding box)",
            "against": "umap-learn transform of held-back frames",
        },
    }
    m["clustering"] = {**m["clustering"], "state": "clustering.npz", "reference_clusters": len(state.centers)}
    m["reference"] = "reference.npz"
    m["reference_sources"] = REFERENCE_SOURCES
    m["n_reference"] = n
    m["adapted"] = {
        "base": {
            "name": base.manifest["name"],
            "version": base.manifest["version"],
            "path": str(base.path),
            "manifest_sha256": sha256_file(base.path / MANIFEST),
        },
        "frames": n,
        "capped": caps,
        "versions": {
            lib: installed_version(lib)
            for lib in ("latent-stream", "umap-learn", "scikit-learn", "onnx", "onnxruntime")
        },
        **(provenance or {}),
    }
    return m
