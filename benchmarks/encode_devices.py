"""Encoder latency per execution provider, for the lite bundle and the paper-size model, at batch 1 and 8;
and preprocess + encode on full-size frames, separate (numba on the host, then the encoder) against fused
(the preprocessing graph in the encoder's session: operators.device_preprocess), per provider.

    python -m benchmarks.encode_devices --json benchmarks/results/encode_devices.json
    python -m benchmarks.encode_devices --models lite --json benchmarks/results/preprocess_devices_cpu.json

The GPU figures issue 18 asks for (lite and paper encode p50 at batch 1 and 8; CUDA fp32, TensorRT fp16) come
from this one script on a machine with `onnxruntime-gpu`; on a CPU-only machine it measures the CPU and says
which providers it could not measure. Each provider runs the same `OnnxEncoder` the service serves with
(IO binding on a GPU, as `serve --device` does), and its latents are compared with the CPU's on the same
batch: `rel_err` = max |gpu - cpu| / max |cpu| (what TensorRT fp16 costs in accuracy).

The preprocess + encode rows (`pipeline_rows`, lite bundle) time one call from raw int32 PILATUS3 2M frames
(synthetic, 1679 x 1475) to latents: `separate` is `Preprocessor.batch` (numba, the service's threads) then
`OnnxEncoder.encode`; `fused` is `FusedEncoder.encode_frames` (on a GPU: the raw batch bound from the host,
one copy to the device). `build_s` is what the first frame of a new shape costs the fused path (graph and
session), `rel_err_vs_separate` compares the two paths' latents on the same frames, and `image_err` is the
largest |difference| of the preprocessing graph's images, run alone on that provider, from the host's.

The paper model's weights are untrained (He-initialised, seed 0): its timings are real, its latents mean
nothing. Its ONNX export (~0.5 GB) is made once with PyTorch (the `train` extra) into `--cache` and reused;
it is never shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine_info
from benchmarks.timing import Budget, time_calls

log = logging.getLogger(__name__)

# provider label -> (device asked of OnnxEncoder, the ONNX Runtime provider that must be available)
PROVIDERS = {
    "cpu": ("cpu", "CPUExecutionProvider"),
    "cuda_fp32": ("cuda", "CUDAExecutionProvider"),
    "tensorrt_fp16": ("cuda", "TensorrtExecutionProvider"),
}
DEFAULT_CACHE = Path("benchmarks/.cache")


@dataclass(frozen=True, slots=True)
class EncodeRow:
    model: str
    provider: str
    served_on: str  # the device the encoder reported (a GPU request can fall back to the CPU)
    batch: int
    latency: dict[str, Any]  # LatencyStats per call (whole batch)
    ms_per_frame_p50: float
    rel_err_vs_cpu: float | None


@dataclass(frozen=True, slots=True)
class PipelineRow:
    provider: str
    served_on: str
    batch: int
    path: str  # "separate": numba on the host, then the encoder; "fused": one session from the raw frames
    latency: dict[str, Any]  # LatencyStats per call (whole batch, raw frames to latents)
    ms_per_frame_p50: float
    build_s: float | None  # fused: building the graph and session for the frame shape
    rel_err_vs_separate: float | None
    image_err: float | None  # fused: max |graph image - host image| on this provider (images in [0, 1])


def paper_encoder(cache: Path) -> Path:
    """The paper configuration's encoder as ONNX (untrained weights), exported once into ``cache``."""
    path = cache / "paper_untrained" / "encoder.onnx"
    if path.is_file():
        return path
    import torch

    from operators.model.cvae import CVAE, get_config
    from operators.model.export import export_onnx

    torch.manual_seed(0)
    model = CVAE(get_config("paper")).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_onnx(model, path, dynamic_batch=True)
    log.info("exported the untrained paper encoder (%.0f M parameters) to %s in %.0f s",
             sum(p.numel() for p in model.parameters()) / 1e6, path, time.perf_counter() - t0)
    return path


def lite_encoder(bundle: Path | None) -> Path:
    from operators.bundle import DEFAULT_BUNDLE, read_manifest

    root = Path(bundle) if bundle else DEFAULT_BUNDLE
    return root / read_manifest(root)["encoder"]["onnx"]


def input_size(path: Path) -> int:
    """The square input side the exported encoder takes, from its graph (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(graph.input[0].type.tensor_type.shape.dim[-1].dim_value)


def measure(model: str, path: Path, providers: list[str], batches: list[int], budget: Budget) -> list[EncodeRow]:
    import onnxruntime as ort

    from operators.bundle import OnnxEncoder

    available = ort.get_available_providers()
    size = input_size(path)
    rows: list[EncodeRow] = []
    reference: dict[int, np.ndarray] = {}
    for label in providers:
        device, needed = PROVIDERS[label]
        if needed not in available:
            log.warning("%s: %s is not available here (%s): not measured", model, needed, ", ".join(available))
            continue
        explicit = None if label != "cuda_fp32" else [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        encoder = OnnxEncoder(path, device=device, providers=explicit)
        for batch in batches:
            x = np.random.default_rng(batch).random((batch, 1, size, size), dtype=np.float32)
            out = encoder.encode(x)
            if label == "cpu":
                reference[batch] = out
            ref = None if label == "cpu" else reference.get(batch)
            err = None if ref is None else float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-12))
            stats, _ = time_calls(lambda i, enc=encoder, batch_x=x: enc.encode(batch_x), budget)
            rows.append(EncodeRow(model, label, encoder.device, batch, stats.to_dict(),
                                  stats.p50_ms / batch, err))
            log.info("%s %s (on %s) batch %d: p50 %.2f ms (%.2f ms/frame)%s", model, label, encoder.device, batch,
                     stats.p50_ms, stats.p50_ms / batch, "" if err is None else f", rel err vs CPU {err:.1e}")
    return rows


def full_frames(n: int) -> list[np.ndarray]:
    """``n`` synthetic PILATUS3 2M frames as the detector sends them (int32, -1 in the gaps)."""
    from stream.synthetic import generate_scan

    return [f.image for f in generate_scan("film_formation", n, seed=0)]


def measure_pipeline(bundle: Path | None, providers: list[str], batches: list[int],
                     budget: Budget) -> list[PipelineRow]:
    """Raw frames to latents per provider and batch: host preprocessing then the encoder, against fused."""
    import onnxruntime as ort

    from operators.bundle import DEFAULT_BUNDLE, OnnxEncoder, compute_threads, read_manifest
    from operators.device_preprocess import FusedEncoder, preprocess_graph
    from operators.preprocess import Preprocessor, PreprocessSpec

    root = Path(bundle) if bundle else DEFAULT_BUNDLE
    spec = PreprocessSpec.from_dict(read_manifest(root)["preprocessing"])
    pre = Preprocessor(spec, threads=compute_threads())
    frames = full_frames(max(batches))
    available = ort.get_available_providers()
    rows: list[PipelineRow] = []
    for label in providers:
        device, needed = PROVIDERS[label]
        if needed not in available:
            log.warning("pipeline: %s is not available here: not measured", needed)
            continue
        explicit = None if label != "cuda_fp32" else [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        encoder = OnnxEncoder(lite_encoder(bundle), device=device, providers=explicit)
        fused = FusedEncoder(encoder, encoder.path, spec)
        t0 = time.perf_counter()
        fused.prepare(frames[0].shape, frames[0].dtype)
        build_s = time.perf_counter() - t0
        alone = encoder.new_session(preprocess_graph(spec, frames[0].shape, frames[0].dtype).SerializeToString())
        for batch in batches:
            raw = frames[:batch]
            image_err = float(np.abs(encoder.run(alone, np.stack(raw)) - pre.batch(raw)).max())
            separate = encoder.encode(pre.batch(raw))
            gap = np.abs(fused.encode_frames(raw) - separate).max()
            err = float(gap / max(float(np.abs(separate).max()), 1e-12))
            calls = {"separate": lambda i, r=raw, enc=encoder: enc.encode(pre.batch(r)),
                     "fused": lambda i, r=raw, f=fused: f.encode_frames(r)}
            for path, call in calls.items():
                stats, _ = time_calls(call, budget)
                rows.append(PipelineRow(label, encoder.device, batch, path, stats.to_dict(), stats.p50_ms / batch,
                                        *((build_s, err, image_err) if path == "fused" else (None, None, None))))
                log.info("pipeline %s (on %s) batch %d %s: p50 %.2f ms (%.2f ms/frame)", label, encoder.device,
                         batch, path, stats.p50_ms, stats.p50_ms / batch)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("lite", "paper"), default=["lite", "paper"])
    p.add_argument("--providers", nargs="+", choices=tuple(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--bundle", type=Path, default=None, help="the lite bundle (default: the shipped one)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the paper export is kept")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=20.0, help="per (model, provider, batch)")
    p.add_argument("--no-pipeline", action="store_true", help="skip preprocess + encode, separate vs fused")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    machine = machine_info()
    budget = Budget(warmup=3, iters=a.iters, max_seconds=a.max_seconds, min_iters=5)
    rows: list[EncodeRow] = []
    for model in a.models:
        path = lite_encoder(a.bundle) if model == "lite" else paper_encoder(a.cache)
        rows += measure(model, path, a.providers, a.batches, budget)
    pipeline = [] if a.no_pipeline else measure_pipeline(a.bundle, a.providers, a.batches, budget)
    result = {"machine": machine.to_dict(), "untrained": ["paper"], "rows": [asdict(r) for r in rows],
              "pipeline_rows": [asdict(r) for r in pipeline]}
    print(f"{machine.summary()}\n{'model':6} {'provider':14} {'on':9} {'batch':>5} {'p50 ms':>9} {'ms/frame':>9} "
          f"{'rel err':>8}")
    for r in rows:
        err = "" if r.rel_err_vs_cpu is None else f"{r.rel_err_vs_cpu:.1e}"
        print(f"{r.model:6} {r.provider:14} {r.served_on:9} {r.batch:>5} {r.latency['p50_ms']:>9.2f} "
              f"{r.ms_per_frame_p50:>9.2f} {err:>8}")
    if pipeline:
        print(f"raw frames -> latents (lite, 1679x1475 int32)\n{'provider':14} {'on':9} {'batch':>5} {'path':9} "
              f"{'p50 ms':>9} {'ms/frame':>9} {'build s':>8} {'rel err':>8} {'image err':>9}")
    for q in pipeline:
        build = "" if q.build_s is None else f"{q.build_s:.1f}"
        err = "" if q.rel_err_vs_separate is None else f"{q.rel_err_vs_separate:.1e}"
        image = "" if q.image_err is None else f"{q.image_err:.1e}"
        print(f"{q.provider:14} {q.served_on:9} {q.batch:>5} {q.path:9} {q.latency['p50_ms']:>9.2f} "
              f"{q.ms_per_frame_p50:>9.2f} {build:>8} {err:>8} {image:>9}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
