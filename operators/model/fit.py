"""Fit a bundle: export the encoder, encode reference frames, fit UMAP + its approximator and the clustering.

    python -m operators.model.fit --checkpoint runs/lite/last.pt --reference data/cache/train_s100 \
        --out operators/bundles/default --name cvae-lite --version 0.3.0 --drift 0.2 --noise-factor 8

The reference frames are encoded through the exported ONNX encoder (the serving path, not PyTorch), so
the fitted projection and clustering see exactly the latents serving will produce.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from operators.bundle import ModelBundle, OnnxEncoder, default_session_options, write_manifest
from operators.clustering import ClusteringSettings, fit_clustering
from operators.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


@dataclass
class FitReport:
    bundle: Path
    n_reference: int
    n_clusters: int
    approximator_rmse: float
    approximator_relative_rmse: float
    parity: dict[str, float]
    bytes: int


def load_reference(source: str | Path, n: int | None, seed: int, spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """Reference frames as (N, 1, S, S) float32, and their labels (phase names, or "" when unknown).

    source: a preprocessed cache stem (operators.model.data) or a .npy stack of raw frames (N, H, W).
    """
    from operators.model.data import FrameCache, load_cache
    from operators.preprocess import Preprocessor

    source = Path(source)
    if source.with_suffix(".json").is_file() and source.suffix != ".npy":
        cache = load_cache(source)
        if not isinstance(cache, FrameCache):
            raise ValueError(f"{source} is a cache of training pairs; reference frames come from a frame cache")
        if cache.meta["preprocessing"] != spec.to_dict():
            raise ValueError(f"{source}: cache was preprocessed with a different spec than the bundle's")
        idx = np.arange(len(cache))
        if n and n < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
        return cache.batch(idx), [cache.phase_names[i] for i in idx]
    raw = np.load(source, mmap_mode="r")
    if raw.ndim != 3:
        raise ValueError(f"{source}: expected a (N, H, W) stack of raw frames, got shape {raw.shape}")
    idx = np.arange(len(raw)) if not n or n >= len(raw) else np.sort(
        np.random.default_rng(seed).choice(len(raw), n, replace=False))
    return Preprocessor(spec).batch([raw[i] for i in idx]), [""] * len(idx)


def _training_summary(checkpoint: str | Path) -> dict[str, Any]:
    import torch

    ck = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    tail = ck.get("extra", {}).get("history_tail") or [{}]
    summary = {"steps": ck.get("step"), "epoch": ck.get("epoch"), "final_loss": tail[-1].get("loss"),
               "final_kl": tail[-1].get("kl"), "data": "synthetic 'training' scenario (stream.synthetic)"}
    settings = Path(checkpoint).with_name("train_settings.json")  # written by operators.model.train
    if settings.is_file():  # the last stage's settings; init_from names the run it started from
        summary["settings"] = json.loads(settings.read_text())
    return summary


def encode_all(encoder: OnnxEncoder, images: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([encoder.encode(images[i : i + batch]) for i in range(0, len(images), batch)])


def fit_bundle(
    checkpoint: str | Path,
    reference: str | Path,
    out: str | Path,
    *,
    name: str = "cvae-lite",
    version: str = "0.1.0",
    n_reference: int | None = 1500,
    seed: int = 0,
    static_onnx: bool = False,
    torchscript: bool = False,
    clustering: ClusteringSettings | None = None,
    min_cluster_size: int | None = None,
    approximator_epochs: int = 300,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> FitReport:
    import joblib

    from operators.model.cvae import count_parameters
    from operators.model.export import ENCODER_ONNX, ENCODER_STATIC_ONNX, ENCODER_TORCHSCRIPT, export_all
    from operators.model.train import load_model
    from operators.projection import (
        APPROX_ONNX,
        UMAP_JOBLIB,
        UMAP_SETTINGS,
        export_approximator,
        fit_approximator,
        fit_umap,
    )

    out = Path(out)
    clustering = clustering or ClusteringSettings()
    spec = PreprocessSpec()
    model = load_model(checkpoint)
    cfg = model.cfg
    work = Path(tempfile.mkdtemp(prefix="bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        exp = export_all(model, work, torchscript=torchscript)
        if not static_onnx:
            (work / ENCODER_STATIC_ONNX).unlink()
        encoder = OnnxEncoder(work / ENCODER_ONNX, session_options=default_session_options())

        images, labels = load_reference(reference, n_reference, seed, spec)
        latents = encode_all(encoder, images)
        log.info("encoded %d reference frames -> latents %s", len(latents), latents.shape)

        reducer, umap_emb = fit_umap(latents, seed=seed)
        joblib.dump(reducer, work / UMAP_JOBLIB, compress=3)
        approx, approx_fit = fit_approximator(latents, umap_emb, epochs=approximator_epochs, seed=seed)
        export_approximator(approx, work / APPROX_ONNX, cfg.latent_dim)
        from operators.projection import OnnxProjector

        emb = OnnxProjector(work / APPROX_ONNX).project(latents)

        state, ref_clusters = fit_clustering(latents, clustering, min_cluster_size=min_cluster_size, seed=seed)
        state.save(work / "clustering.npz")
        np.savez(work / "reference.npz", embedding=emb.astype(np.float32), clusters=ref_clusters,
                 umap_embedding=umap_emb, labels=np.asarray(labels, dtype="U32"))

        manifest = {
            "name": name,
            "version": version,
            "description": description or f"C-VAE ({cfg.name}) with UMAP approximator and online clustering",
            "model": {"architecture": "cvae-windowed-attention", "config": cfg.to_dict(),
                      "parameters": count_parameters(model), "encoder_parameters": count_parameters(model.encoder)},
            "input_shape": [1, 1, cfg.input_size, cfg.input_size],
            "latent_dim": cfg.latent_dim,
            "latent": "mean",
            "preprocessing": spec.to_dict(),
            "encoder": {
                "onnx": ENCODER_ONNX,
                "onnx_static": ENCODER_STATIC_ONNX if static_onnx else None,
                "torchscript": ENCODER_TORCHSCRIPT if torchscript else None,
                "input": "image", "output": "latent_mean", "opset": 18,
                "parity_relative_error": {k: v for k, v in exp.parity.items() if (work / k).exists()},
            },
            "projection": {
                "name": "umap-approx",
                "method": "umap-learn on L2-normalised latents, served by an MLP approximator (ONNX)",
                "settings": {**UMAP_SETTINGS, "l2_normalise": True, "random_state": seed},
                "approximator": APPROX_ONNX,
                "umap": UMAP_JOBLIB,
                "approximator_fit": {"rmse": approx_fit.rmse, "relative_rmse": approx_fit.relative_rmse,
                                     "train_points": approx_fit.train_points,
                                     "heldout_points": approx_fit.heldout_points},
            },
            "clustering": {"state": "clustering.npz", "settings": clustering.to_dict(),
                           "reference_clusters": int(state.centers.shape[0]),
                           "method": "HDBSCAN on PCA of L2-normalised latents; online stable-id assignment"},
            "reference": "reference.npz",
            "n_reference": len(latents),
            "training": {"checkpoint": Path(checkpoint).name, **_training_summary(checkpoint), **(extra or {})},
        }
        write_manifest(work, manifest)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(work), str(out))
        out.chmod(0o755)  # mkdtemp made it private; a shipped bundle must be readable by the service user
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    ModelBundle.load(out)  # the bundle we wrote must load and verify
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    report = FitReport(bundle=out, n_reference=len(latents), n_clusters=int(state.centers.shape[0]),
                       approximator_rmse=approx_fit.rmse, approximator_relative_rmse=approx_fit.relative_rmse,
                       parity=exp.parity, bytes=total)
    log.info("bundle %s written: %d reference frames, %d clusters, %.1f MB", out, report.n_reference,
             report.n_clusters, total / 1e6)
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="cvae-lite")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--n-reference", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-onnx", action="store_true")
    p.add_argument("--torchscript", action="store_true")
    defaults = ClusteringSettings()
    p.add_argument("--drift", type=float, default=defaults.drift,
                   help="online clustering: regime-centre EMA weight (choose with operators.model.tune_clustering)")
    p.add_argument("--noise-factor", type=float, default=defaults.noise_factor,
                   help="online clustering: tau in multiples of the run's median frame-to-frame step")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = fit_bundle(a.checkpoint, a.reference, a.out, name=a.name, version=a.version, n_reference=a.n_reference,
                   seed=a.seed, static_onnx=a.static_onnx, torchscript=a.torchscript,
                   clustering=replace(defaults, drift=a.drift, noise_factor=a.noise_factor))
    print(json.dumps({**r.__dict__, "bundle": str(r.bundle)}, indent=2))


if __name__ == "__main__":
    main()
