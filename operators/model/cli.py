"""Typer-style command functions for `latent-stream train | export | fit | evaluate`.

stream/cli.py registers these lazily; torch, umap and onnx are imported inside the bodies so that
importing this module (and `latent-stream --help`) stays light.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train(
    data: Annotated[Path, typer.Option(help="Preprocessed frame or pair cache stem (see --render, --render-pairs).")],
    out: Annotated[Path, typer.Option(help="Run directory for checkpoints and history.")] = Path("runs/cvae"),
    config: Annotated[str, typer.Option(help="Model configuration: lite | paper.")] = "lite",
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option(help="Frames per step (both views of half as many pairs).")] = 16,
    lr: Annotated[float, typer.Option()] = 1e-3,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule: cosine | constant.")] = "cosine",
    beta: Annotated[float | None, typer.Option(help="KL weight (default: the config's 0.5).")] = None,
    kl_warmup_steps: Annotated[int, typer.Option(help="Steps over which beta ramps up from 0.")] = 200,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this wall time.")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    init_from: Annotated[Path | None, typer.Option(help="Fine-tune: start from this checkpoint's weights.")] = None,
    contrast_weight: Annotated[float, typer.Option(
        help="With a pair cache: weight of InfoNCE between the two views' latents (0: plain beta-VAE).")] = 0.0,
    contrast_temperature: Annotated[float, typer.Option()] = 0.1,
    contrast_batches: Annotated[str, typer.Option(
        help="mixed | scenario: draw each batch of pairs from one scenario (harder negatives).")] = "mixed",
    render: Annotated[int, typer.Option(help="First render this many synthetic training frames into DATA "
                                              "(seed SEED + 100).")] = 0,
    render_pairs: Annotated[int, typer.Option(help="First render this many training pairs into DATA "
                                                    "(seed SEED + 5).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    gpus: Annotated[int, typer.Option(help="Launch DDP with torchrun over this many local GPUs.")] = 0,
) -> None:
    """Train or fine-tune the C-VAE (AMP on CUDA, DDP under torchrun, resumable checkpoints)."""
    _logging()
    if render and render_pairs:
        raise typer.BadParameter("DATA holds frames or pairs: give --render or --render-pairs, not both")
    if render:
        from operators.model.data import ensure_cache

        ensure_cache(data, scenario="training", n_frames=render, seed=seed + 100)
    if render_pairs:
        from operators.model.data import ensure_pair_cache

        ensure_pair_cache(data, n_pairs=render_pairs, seed=seed + 5)
    from operators.model.train import TrainSettings
    from operators.model.train import train as run

    settings = TrainSettings(
        data=str(data), out=str(out), config=config, epochs=epochs, batch_size=batch_size, lr=lr,
        schedule=schedule, beta=beta, kl_warmup_steps=kl_warmup_steps, max_minutes=max_minutes,
        max_steps=max_steps, resume=resume, init_from=str(init_from) if init_from else None,
        contrast_weight=contrast_weight, contrast_temperature=contrast_temperature,
        contrast_batches=contrast_batches, seed=seed, threads=threads)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m",
               "operators.model.train", *settings.to_argv()]
        raise typer.Exit(subprocess.call(cmd))
    typer.echo(f"checkpoint: {run(settings)}")


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (last.pt).")],
    out: Annotated[Path, typer.Option(help="Directory for the exported encoders.")] = Path("artifacts/export"),
    torchscript: Annotated[bool, typer.Option(help="Also export TorchScript.")] = True,
) -> None:
    """Export the mean encoder: ONNX static 1x1x512x512 and dynamic batch, TorchScript; print parity."""
    _logging()
    from operators.model.export import export_all
    from operators.model.train import load_model

    res = export_all(load_model(checkpoint), out, torchscript=torchscript)
    for name, err in res.parity.items():
        typer.echo(f"{res.paths[name]}: relative error vs PyTorch {err:.2e}")
    if any(err >= 1e-4 for err in res.parity.values()):
        typer.echo("parity check FAILED (relative error >= 1e-4)", err=True)
        raise typer.Exit(1)


def fit(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (last.pt).")],
    reference: Annotated[Path, typer.Option(help="Reference frames: a cache stem or a .npy (N, H, W) stack.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")] = Path("artifacts/bundle"),
    name: Annotated[str, typer.Option()] = "cvae-lite",
    version: Annotated[str, typer.Option()] = "0.1.0",
    n_reference: Annotated[int, typer.Option(help="Reference frames to fit on (subsampled).")] = 1500,
    static_onnx: Annotated[bool, typer.Option(help="Also ship the static 1x1xSxS ONNX encoder.")] = False,
    torchscript: Annotated[bool, typer.Option(help="Also ship a TorchScript encoder.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    drift: Annotated[float | None, typer.Option(help="Clustering: regime-centre EMA weight (tune_clustering).")] = None,
    noise_factor: Annotated[float | None, typer.Option(help="Clustering: tau in median frame steps.")] = None,
) -> None:
    """Encode reference frames, fit UMAP (+ ONNX approximator) and the clustering, write a bundle."""
    _logging()
    from dataclasses import replace

    from operators.clustering import ClusteringSettings
    from operators.model.fit import fit_bundle

    chosen = {k: v for k, v in (("drift", drift), ("noise_factor", noise_factor)) if v is not None}
    r = fit_bundle(checkpoint, reference, out, name=name, version=version, n_reference=n_reference,
                   static_onnx=static_onnx, torchscript=torchscript, seed=seed,
                   clustering=replace(ClusteringSettings(), **chosen))
    typer.echo(json.dumps({**r.__dict__, "bundle": str(r.bundle)}, indent=2))


class Family(StrEnum):
    scenarios = "scenarios"
    independent = "independent"


class Split(StrEnum):
    validation = "validation"
    heldout = "heldout"


def evaluate(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory (default: the shipped one).")] = None,
    frames: Annotated[int, typer.Option(help="Frames per held-out run.")] = 120,
    seeds: Annotated[list[int] | None, typer.Option(help="Held-out seeds; independent: of --split.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    family: Annotated[Family, typer.Option(
        help="scenarios: the training generator's scenarios; independent: stream.independent, a family "
             "written apart from it (other detectors, beam anywhere, 4 phases in every order, ramps).",
    )] = Family.scenarios,
    split: Annotated[Split, typer.Option(
        help="Independent family: validation seeds (choose settings) or heldout (score once).",
    )] = Split.validation,
    runs: Annotated[int, typer.Option(help="Independent family: the split's first N seeds.")] = 8,
) -> None:
    """ARI of online clusters vs ground-truth phases and trajectory continuity on held-out runs; for the
    independent family also the onset lag of each phase."""
    _logging()
    from operators.model.evaluate import HELDOUT_SEEDS, evaluate_independent, independent_seeds
    from operators.model.evaluate import evaluate as run

    if family is Family.independent:
        try:
            chosen = independent_seeds(split.value, tuple(seeds) if seeds else None, runs, frames)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        res = evaluate_independent(bundle, split=split.value, seeds=chosen, n_frames=frames)
    else:
        res = run(bundle, n_frames=frames, seeds=tuple(seeds or HELDOUT_SEEDS))
    text = json.dumps(res, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)
