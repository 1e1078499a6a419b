"""``latent-stream adapt SOURCE... --out DIR``: the shipped model's encoder, a map fitted on a beamline's own frames.

Reads every frame of every SOURCE (anything `replay` reads: stream/readers/), encodes it with BASE's ONNX encoder,
and hands the latents with each frame's origin to `operators.adapt.fit.adapt_bundle`, which fits, checks and
writes the bundle. Runs on a serving install: no torch is imported on this path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from stream.readers import DEFAULT_DATASET, FrameSource, ReplayError, open_source

log = logging.getLogger(__name__)

ENCODE_BATCH = 8


def _absolute(source: str) -> str:
    return source if source.startswith(("http://", "https://")) else str(Path(source).resolve())


def encode_sources(
    sources: list[FrameSource], bundle: Any, *, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[dict], int]:
    """(latents, the clusterer's features, origins, frames skipped as unreadable) over all sources, with a
    progress bar and ETA; the features are the latents where the bundle has no cluster feature graph."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total = sum(s.count for s in sources)
    latents: list[np.ndarray] = []
    features: list[np.ndarray] = []
    origins: list[dict] = []
    skipped = 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            z, f = bundle.encode(np.stack(batch))
            latents.append(z)
            features.append(f)
            batch.clear()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("encoding", total=total)
        for src in sources:
            for i in range(src.count):
                try:
                    frame = src.read(i)
                    if frame.image.ndim != 2:
                        raise ReplayError(f"frame {i} has shape {frame.image.shape}, not (H, W)")
                    batch.append(bundle.preprocessor(frame.image))
                except ReplayError as exc:
                    skipped += 1
                    log.warning("%s: skipped: %s", src.name, exc)
                else:
                    o = src.origin_of(i)
                    origins.append({"source": _absolute(o.source), "index": o.index, "dataset": o.dataset})
                if len(batch) == ENCODE_BATCH:
                    flush()
                bar.advance(task)
        flush()
    if not latents:
        return np.zeros((0, bundle.latent_dim), np.float32), np.zeros((0, 0), np.float32), origins, skipped
    return np.concatenate(latents), np.concatenate(features), origins, skipped


def adapt(
    sources: Annotated[
        list[str],
        typer.Argument(help="Frame directories/files, HDF5/NeXus files, .npy stacks or Tiled URIs."),
    ],
    out: Annotated[Path, typer.Option(help="Directory of the new bundle (replaced if it exists).")],
    bundle: Annotated[
        Path | None, typer.Option(help="BASE bundle whose encoder is used (default: the shipped one).")
    ] = None,
    dataset: Annotated[str, typer.Option(help="HDF5/NeXus dataset of the frames.")] = DEFAULT_DATASET,
    tiled_api_key: Annotated[
        str | None, typer.Option(envvar="TILED_API_KEY", help="API key when a SOURCE is a Tiled URI.")
    ] = None,
    max_approx_error: Annotated[
        float,
        typer.Option(
            help="Refuse the bundle when the approximator's rms distance from umap-learn's transform on held-back frames exceeds this fraction of the map's extent."
        ),
    ] = 0.05,
    name: Annotated[str | None, typer.Option(help="Bundle name (default: BASE's name + '-adapted').")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (hold-back split, UMAP, MLP, clustering).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fit a beamline's own map (UMAP, its approximator, the clustering) on recorded frames; write a bundle."""
    from operators.adapt.fit import AdaptError, AdaptSettings, ApproximatorRefused, adapt_bundle
    from operators.bundle import BundleError, ModelBundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        base = ModelBundle.load(bundle)
        opened = [open_source(s, dataset=dataset, api_key=tiled_api_key) for s in sources]
    except (ReplayError, BundleError) as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        latents, features, origins, skipped = encode_sources(opened, base, progress=progress)
    finally:
        for src in opened:
            if src.close is not None:
                src.close()
    provenance = {
        "sources": [{"source": _absolute(s), "kind": o.kind, "frames": o.count, "dataset": o.metadata.get("dataset", "")}
                    for s, o in zip(sources, opened, strict=True)],
        "skipped_unreadable": skipped,
    }  # fmt: skip
    settings = AdaptSettings(seed=seed, max_error=max_approx_error, name=name)
    try:
        report = adapt_bundle(latents, origins, base, out, features=features, settings=settings,
                              provenance=provenance, stage=lambda s: typer.echo(f"adapt: {s}", err=True))  # fmt: skip
    except ApproximatorRefused as exc:
        typer.echo(f"adapt: refused: {exc}", err=True)
        raise typer.Exit(code=3) from None
    except AdaptError as exc:
        typer.echo(f"adapt: {exc}", err=True)
        raise typer.Exit(code=2) from None
    c = report.check
    for cap in report.caps:
        typer.echo(f"capped to the data: {cap}")
    typer.echo(f"approximator vs umap-learn on {c.heldout_frames} held-back frames: rms {100 * c.rms_error:.2f}%, "
               f"max {100 * c.max_error:.2f}% of the map's extent (bound {100 * c.bound:.2f}% rms)")  # fmt: skip
    typer.echo(f"wrote {report.bundle}: {report.frames} reference frames ({skipped} skipped), {report.clusters} "
               f"clusters, in {time.monotonic() - started:.0f} s; serve it with --bundle {report.bundle}")  # fmt: skip
