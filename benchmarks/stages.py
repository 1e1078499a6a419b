"""Per-stage timings over many frames after warm-up, for every runtime this machine has.

Stages, in the order a frame meets them: decode (msgpack -> zero-copy numpy view), preprocess (mask, log,
resize into the model's input), encode (each runtime: ONNX Runtime CPU, TorchScript, PyTorch eager; on a
GPU also ONNX Runtime CUDA / TensorRT, fp16 and torch.compile), project (umap-learn ``transform`` and the
ONNX approximator), cluster (the online clusterer), publish (point -> websocket payload, and the hub's fan-out
enqueue). A runtime that is absent here is skipped with the reason, never faked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from benchmarks.reference import ReferencePipeline, ReferenceResult, run_reference
from benchmarks.report import StageResult
from benchmarks.stats import LatencyStats
from benchmarks.timing import Budget, time_calls

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Models:
    """What the stage timings and the reference pipeline need from one bundle."""

    bundle: Any  # operators.bundle.ModelBundle (ONNX Runtime)
    path: Path
    manifest: dict[str, Any]
    autoencoder_model: str
    input_size: int
    latent_dim: int
    umap_model: Any | None = None  # the fitted umap-learn object, if the bundle has one
    torch_model: Any | None = None  # eager CVAE (full forward returns (recon, mu, logvar)), if buildable
    torch_encoder: Any | None = None  # eager mean encoder, if buildable
    torch_weights: str = ""  # where the eager model's weights came from
    torchscript_path: Path | None = None
    onnx_path: Path | None = None
    latent_transform: Callable[[np.ndarray], np.ndarray] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


def load_models(bundle_path: Path | None) -> Models:
    """Load the bundle for ONNX Runtime, and whatever the reference pipeline and other runtimes need."""
    from operators.bundle import DEFAULT_BUNDLE, PICKLE_LIBRARIES, ModelBundle, verify_versions
    from operators.projection import l2_normalise

    bundle = ModelBundle.load(bundle_path, runtime="onnx")
    path, manifest = bundle.path, bundle.manifest
    files = manifest.get("files", {})

    def artifact(rel: str | None) -> Path | None:
        return path / rel if rel and rel in files and (path / rel).is_file() else None

    models = Models(
        bundle=bundle,
        path=path if bundle_path else DEFAULT_BUNDLE,
        manifest=manifest,
        autoencoder_model=bundle.autoencoder_model,
        input_size=bundle.input_size,
        latent_dim=bundle.latent_dim,
        onnx_path=artifact(manifest["encoder"].get("onnx")),
        torchscript_path=artifact(manifest["encoder"].get("torchscript")),
        latent_transform=l2_normalise,  # the UMAP is fitted on L2-normalised latents
    )
    umap_path = artifact(manifest.get("projection", {}).get("umap"))
    if umap_path is None:
        models.unavailable["project[umap-learn transform]"] = "the bundle lists no umap-learn model"
    else:
        import joblib

        verify_versions(manifest, PICKLE_LIBRARIES, str(umap_path))  # before unpickling
        models.umap_model = joblib.load(umap_path)
    try:
        models.torch_model, models.torch_weights = _eager_model(path, manifest)
        from operators.model.cvae import MeanEncoder

        models.torch_encoder = MeanEncoder(models.torch_model).eval()
        if not models.torch_weights.startswith("seeded"):
            probe = (
                np.random.default_rng(0)
                .poisson(20.0, (models.input_size, models.input_size))
                .astype(np.int32)
            )
            _check_parity(models, probe)
        else:
            log.warning("eager model: %s", models.torch_weights)
    except (ImportError, LookupError, OSError, ValueError) as exc:
        models.unavailable["encode[torch-eager]"] = f"cannot build the eager model from the bundle ({exc})"
    bundle.warmup()
    return models


def _eager_model(path: Path, manifest: dict[str, Any]) -> tuple[Any, str]:
    """The full CVAE in eager PyTorch from the bundle's architecture config, and where its weights came from.

    Weights: the bundle's torch state dict when the manifest lists one (`encoder.state_dict`); else the
    encoder's from the ONNX initializers when their names match the module's; else a seeded initialisation.
    A forward pass costs the same whatever the weight values (no data-dependent control flow), so the last
    case still times the reference faithfully; it is labelled, and its points are not compared.
    """
    import torch

    from operators.model.cvae import CVAE, CVAEConfig

    cfg_dict = (manifest.get("model") or {}).get("config")
    if not isinstance(cfg_dict, dict):
        raise LookupError("the manifest gives no model config (model.config)")  # noqa: TRY004 - a missing key
    torch.manual_seed(0)
    model = CVAE(CVAEConfig.from_dict(cfg_dict)).eval()
    enc = manifest["encoder"]
    rel = enc.get("state_dict") or enc.get("torch")
    if rel:
        state = torch.load(path / rel, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        return model, f"bundle state dict ({rel})"
    if enc.get("onnx"):
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path / enc["onnx"]), load_external_data=True).graph
        inits = {i.name: i for i in graph.initializer}
        wanted = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        if all(k in inits for k in wanted):
            state = {
                k: torch.from_numpy(numpy_helper.to_array(inits[k]).copy()).reshape(v.shape)
                for k, v in wanted.items()
            }
            model.load_state_dict(state, strict=False)
            return model, f"encoder weights from the ONNX initializers ({enc['onnx']})"
    return model, (
        "seeded initialisation: the bundle lists no torch state dict (encoder.state_dict), so the reference is "
        "timed with the bundle's architecture and its own UMAP, but its points are not the bundle's"
    )


def _check_parity(models: Models, frame: np.ndarray) -> None:
    """The eager encoder must compute what the bundle's ONNX encoder computes."""
    import torch

    x = models.bundle.preprocessor(frame)[None]
    want = models.bundle.encoder.encode(x)
    with torch.inference_mode():
        got = models.torch_encoder(torch.from_numpy(x)).numpy()
    err = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))
    if err > 1e-3:
        raise ValueError(f"eager encoder differs from the ONNX encoder (relative error {err:.2e})")


# -- individual stages ---------------------------------------------------------------------------------


def _event_payloads(frames: Sequence[np.ndarray]) -> list[bytes]:
    h, w = frames[0].shape
    return [
        msgpack.packb(
            {
                "msg_type": "event",
                "image": {"array": {"data": f.tobytes(), "dtype": str(f.dtype), "shape": [h, w]}},
                "frame_number": i,
                "tiled_url": f"http://tiled.invalid/api/v1/array/full/run/primary/image?slice={i}",
            }
        )
        for i, f in enumerate(frames)
    ]


def _transport_stage(payloads: Sequence[bytes], budget: Budget) -> StageResult:
    """One event message (~9.9 MB) through a ZeroMQ PUSH -> PULL pair over TCP loopback, send to receive."""
    import zmq

    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        port = push.bind_to_random_port("tcp://127.0.0.1")
        pull.connect(f"tcp://127.0.0.1:{port}")

        def hop(i: int) -> object:
            push.send(payloads[i % len(payloads)], copy=False)
            return pull.recv(copy=False)

        return _stage("transport[zmq tcp loopback, one event]", hop, budget)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def _stage(
    name: str, fn: Callable[[int], object], budget: Budget, batch: int = 1, note: str = ""
) -> StageResult:
    stats, _ = time_calls(fn, budget)
    log.info("stage %-40s p50 %8.3f ms  p99 %8.3f ms  (batch %d)", name, stats.p50_ms, stats.p99_ms, batch)
    return StageResult(name=name, stats=stats, batch=batch, note=note)


def _ort_session(onnx_path: Path, providers: list[Any], threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)


def _ort_runner(sess: Any) -> Callable[[np.ndarray], Any]:
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    return lambda x: sess.run([out], {name: x})[0]


def _batches(models: Models, frames: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    tensors = [models.bundle.preprocessor(f) for f in frames]
    return [np.stack([tensors[(i + j) % len(tensors)] for j in range(batch)]) for i in range(len(tensors))]


def _encode_stages(
    models: Models, frames: Sequence[np.ndarray], budget: Budget, batch_sizes: Sequence[int], quick: bool
) -> tuple[list[StageResult], dict[str, str]]:
    results: list[StageResult] = []
    skipped: dict[str, str] = {}
    cores = len(os.sched_getaffinity(0))

    features = models.bundle.feature_encoder
    for b in batch_sizes:
        xs = _batches(models, frames, b)
        results.append(
            _stage(
                "encode[onnx-cpu, bundle]",
                lambda i, xs=xs: models.bundle.encoder.encode(xs[i % len(xs)]),
                budget,
                b,
            )
        )
        if features is not None:  # the clustering's input, computed beside the latent in the encode stage
            results.append(_stage("encode[cluster features]", lambda i, xs=xs: features.encode(xs[i % len(xs)]),
                                  budget, b))

    xs1 = _batches(models, frames, 1)
    if models.onnx_path is not None:
        # Thread settings: the bundle's session versus explicit intra-op counts.
        for threads in sorted({1, cores}):
            try:
                run = _ort_runner(_ort_session(models.onnx_path, ["CPUExecutionProvider"], threads))
                run(xs1[0])
                results.append(
                    _stage(
                        f"encode[onnx-cpu, {threads} thread(s)]",
                        lambda i, run=run: run(xs1[i % len(xs1)]),
                        budget,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a fixed-batch model may refuse; report why
                skipped[f"encode[onnx-cpu, {threads} thread(s)]"] = f"{type(exc).__name__}: {exc}"[:200]
    else:
        skipped["encode[onnx-cpu, threads]"] = "no encoder ONNX file found in the bundle"

    try:
        import torch
    except ImportError:
        skipped["encode[torch-*]"] = "torch not installed (serving does not need it)"
        return results, skipped

    gpu = torch.cuda.is_available()
    default_threads = torch.get_num_threads()
    t1 = [torch.from_numpy(x) for x in xs1]
    with torch.inference_mode():
        ts = None
        if models.torchscript_path is not None:
            ts = torch.jit.load(str(models.torchscript_path), map_location="cpu").eval()
        else:
            skipped["encode[torchscript-cpu]"] = "no TorchScript encoder in the bundle"
        enc = models.torch_encoder
        try:
            # torch's default thread count and one thread: oversubscribed cores punish intra-op threads.
            for threads in dict.fromkeys((default_threads, 1)):
                torch.set_num_threads(threads)
                if ts is not None:
                    results.append(
                        _stage(
                            f"encode[torchscript-cpu, {threads} thread(s)]",
                            lambda i: ts(t1[i % len(t1)]),
                            budget,
                        )
                    )
                if enc is not None:
                    results.append(
                        _stage(
                            f"encode[torch-eager-cpu, {threads} thread(s)]",
                            lambda i: enc(t1[i % len(t1)]),
                            budget,
                            note=models.torch_weights,
                        )
                    )
        finally:
            torch.set_num_threads(default_threads)
        if enc is not None:
            if not quick and not gpu:
                skipped["encode[torch.compile-cpu]"] = (
                    "measured on GPU only (inductor's CPU compile takes minutes here)"
                )
        else:
            skipped["encode[torch-eager-cpu]"] = models.unavailable.get(
                "encode[torch-eager]", "no eager model"
            )

        if gpu and models.torch_encoder is not None:
            try:
                results += _torch_gpu_stages(models, xs1, budget, skipped)
            except Exception as exc:  # noqa: BLE001 - CUDA set-up failures vary by machine; report and go on
                skipped["encode[torch-cuda]"] = f"{type(exc).__name__}: {exc}"[:200]
        elif not gpu:
            for name in ("encode[torch-cuda fp32]", "encode[torch-cuda fp16]", "encode[torch.compile-cuda]"):
                skipped[name] = "no CUDA GPU on this machine"
    results += _ort_gpu_stages(models, xs1, budget, skipped)
    return results, skipped


def _torch_gpu_stages(
    models: Models, xs1: Sequence[np.ndarray], budget: Budget, skipped: dict[str, str]
) -> list[StageResult]:
    import torch

    out: list[StageResult] = []
    enc = models.torch_encoder.eval().cuda()
    dev = [torch.from_numpy(x).cuda() for x in xs1]

    def timed(model: Any, inputs: Sequence[Any]) -> Callable[[int], object]:
        def call(i: int) -> object:
            r = model(inputs[i % len(inputs)])
            torch.cuda.synchronize()
            return r

        return call

    out.append(_stage("encode[torch-cuda fp32]", timed(enc, dev), budget))
    half = [x.half() for x in dev]
    enc.half()
    out.append(_stage("encode[torch-cuda fp16]", timed(enc, half), budget))
    enc.float()
    try:
        compiled = torch.compile(enc, mode="max-autotune")
        out.append(_stage("encode[torch.compile-cuda fp32]", timed(compiled, dev), budget))
    except Exception as exc:  # noqa: BLE001 - inductor failures vary; report and go on
        skipped["encode[torch.compile-cuda]"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def _ort_gpu_stages(
    models: Models, xs1: Sequence[np.ndarray], budget: Budget, skipped: dict[str, str]
) -> list[StageResult]:
    import onnxruntime as ort

    out: list[StageResult] = []
    available = ort.get_available_providers()
    if models.onnx_path is None:
        return out
    for label, providers in (
        ("encode[onnx-cuda]", ["CUDAExecutionProvider"]),
        (
            "encode[onnx-tensorrt fp16]",
            [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CUDAExecutionProvider"],
        ),
    ):
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted not in available:
            skipped[label] = f"{wanted} not available in this onnxruntime ({', '.join(available)})"
            continue
        try:
            sess = _ort_session(models.onnx_path, providers)
            run = _ort_runner(sess)
            run(xs1[0])
            out.append(_stage(label, lambda i, run=run: run(xs1[i % len(xs1)]), budget))
            out.append(_stage(label.replace("]", ", io-binding]"), _io_bound(sess, xs1), budget))
        except Exception as exc:  # noqa: BLE001 - provider set-up failures vary by machine
            skipped[label] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def _io_bound(sess: Any, xs1: Sequence[np.ndarray]) -> Callable[[int], object]:
    """Input copied to the device once per call, output left on the device: no host round trip per Run."""
    import onnxruntime as ort

    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    dev = [ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) for x in xs1]
    binding = sess.io_binding()
    binding.bind_output(out, "cuda")

    def call(i: int) -> object:
        binding.bind_ortvalue_input(name, dev[i % len(dev)])
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    return call


def _publish_stages(
    models: Models, latents: np.ndarray, budget: Budget, skipped: dict[str, str]
) -> list[StageResult]:
    """Point -> the websocket payload (once per point for every client), and the hub's enqueue for N clients."""
    from operators import point_row
    from operators.messages import Point, StageTimings

    try:
        from frontend_bridge import wire
    except ImportError as exc:
        skipped["publish"] = f"frontend_bridge.wire unavailable ({exc})"
        return []
    ctx = wire.RunContext(
        run_id="bench",
        experiment_name="bench",
        model=wire.ModelInfo(models.autoencoder_model, getattr(models.bundle, "dimred_model", "umap:0")),
    )
    points = [
        Point(run_id="bench", index=i, x=0.1 * i, y=-0.2 * i, cluster=i % 3, novelty=0.5, tiled_url=f"http://t/{i}",
              timestamp=time.time(), timings=StageTimings(), latent=latents[i % len(latents)], stored_by_service=False, run_key="bench")
        for i in range(64)
    ]  # fmt: skip

    def serialise(i: int) -> object:
        msg = wire.point_message(ctx, point_row.values(points[i % len(points)]))  # as Hub.publish does
        return wire.encode(wire.typed_point(msg), wire.WireFormat.WS_JSON), wire.encode(
            msg, wire.WireFormat.LSE_JSON
        )

    results = [_stage("publish[point -> /ws + /lse JSON]", serialise, budget)]
    try:
        results.append(_hub_stage(ctx.model, points, budget, clients=10))
    except ImportError as exc:
        skipped["publish[hub]"] = f"frontend_bridge.hub unavailable ({exc})"
    return results


def _hub_stage(model_info: Any, points: Sequence[Any], budget: Budget, clients: int) -> StageResult:
    """`Hub.publish(point)` with `clients` connected (half /lse, half /ws): encode once per format, enqueue."""
    from frontend_bridge.hub import Hub
    from frontend_bridge.wire import WireFormat
    from operators.messages import RunStarted

    hub = Hub(model_info)
    n = budget.warmup + budget.iters

    async def measure() -> list[float]:
        await hub.publish(RunStarted(run_id="bench", run_name="bench", started_at=time.time(), run_key="bench"))
        for k in range(clients):
            endpoint, fmt = ("lse", WireFormat.LSE_JSON) if k % 2 else ("ws", WireFormat.WS_JSON)
            hub.connect(endpoint, fmt, backfill=False)
        samples = []
        for i in range(n):
            point = points[i % len(points)]
            point.index = i  # a fresh frame number each time, as in a run
            t0 = time.perf_counter()
            await hub.publish(point)
            samples.append(time.perf_counter() - t0)
        return samples[budget.warmup :]

    samples = asyncio.run(measure())
    stats = LatencyStats.from_seconds(samples)
    name = f"publish[hub fan-out, {clients} clients]"
    log.info("stage %-40s p50 %8.3f ms  p99 %8.3f ms", name, stats.p50_ms, stats.p99_ms)
    return StageResult(name=name, stats=stats)


PATH_STAGE = "path[preprocess -> encode -> project -> cluster, batch 1]"


def run_stages(
    models: Models, frames: Sequence[np.ndarray], budget: Budget, quick: bool = False
) -> tuple[list[StageResult], dict[str, str]]:
    """Time every stage on `frames` (full-size detector frames). Returns results and skipped stages."""
    from stream.protocol import decode

    results: list[StageResult] = []
    skipped: dict[str, str] = dict(models.unavailable)
    batch_sizes = (1, 8) if quick else (1, 4, 8, 16)

    payloads = _event_payloads(frames)
    results.append(_transport_stage(payloads, budget))
    results.append(
        _stage("decode[msgpack -> zero-copy view]", lambda i: decode(payloads[i % len(payloads)]), budget)
    )

    pre = models.bundle.preprocessor
    out = np.empty((1, models.input_size, models.input_size), np.float32)
    results.append(
        _stage(
            "preprocess[bundle, into a reused buffer]",
            lambda i: pre(frames[i % len(frames)], out=out),
            budget,
        )
    )
    results.append(_stage("preprocess[bundle, allocating]", lambda i: pre(frames[i % len(frames)]), budget))

    enc_results, enc_skipped = _encode_stages(models, frames, budget, batch_sizes, quick)
    results += enc_results
    skipped.update(enc_skipped)

    tensors = np.stack([pre(f) for f in frames])
    latents, features = models.bundle.encode(tensors)
    lat1 = [latents[i : i + 1] for i in range(len(latents))]
    proj = models.bundle.projector
    results.append(_stage("project[bundle projector]", lambda i: proj.project(lat1[i % len(lat1)]), budget))
    lat8 = np.concatenate([latents] * (8 // len(latents) + 1))[:8]
    results.append(_stage("project[bundle projector]", lambda i: proj.project(lat8), budget, batch=8))
    if models.umap_model is not None:
        um, tf = models.umap_model, models.latent_transform or (lambda x: x)
        results.append(
            _stage("project[umap-learn transform]", lambda i: um.transform(tf(lat1[i % len(lat1)])), budget)
        )

    clusterer = models.bundle.new_clusterer()
    results.append(
        _stage(
            "cluster[learn_predict_one]",
            lambda i: clusterer.learn_predict_one(features[i % len(features)]),
            budget,
        )
    )

    # The whole per-frame compute path as the service runs it at batch 1, timed as one call: the like-for-like
    # of the reference pipeline's per-frame total (same process, same frames, same bundle).
    path_clusterer = models.bundle.new_clusterer()

    def path(i: int) -> object:
        pre(frames[i % len(frames)], out=out)
        latent, feature = models.bundle.encode(out[None])
        xy = proj.project(latent)
        return xy, path_clusterer.learn_predict_one(feature[0])

    results.append(_stage(PATH_STAGE, path, budget))
    results += _publish_stages(models, latents, budget, skipped)
    return results, skipped


def run_reference_for(
    models: Models, frames: Sequence[np.ndarray], budget: Budget
) -> tuple[ReferenceResult, dict[str, float]] | str:
    """The reference pipeline on the same frames and bundle, or why it cannot run.

    It runs with torch's default thread count (what the LSE does) and, where that is more than one, again
    with one thread: on a shared or oversubscribed CPU torch's multi-threaded kernels can be many times
    slower. The fastest variant is returned, so the speedup is never taken against a crippled reference.
    Returns (fastest result, {variant: p50 ms}).
    """
    if models.torch_model is None:
        return models.unavailable.get("encode[torch-eager]", "no eager torch model")
    if models.umap_model is None:
        return models.unavailable.get("project[umap-learn transform]", "no umap-learn model")
    import torch

    pipe = ReferencePipeline(
        models.torch_model, models.umap_model, models.input_size, models.latent_transform
    )
    default_threads = torch.get_num_threads()
    variants: dict[str, float] = {}
    best: ReferenceResult | None = None
    try:
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            result = run_reference(pipe, frames, budget)
            label = f"torch eager, {threads} thread(s)" + (" (default)" if threads == default_threads else "")
            result.total.note = f"{label}; weights: {models.torch_weights}"
            variants[label] = result.total.stats.p50_ms
            if best is None or result.total.stats.p50_ms < best.total.stats.p50_ms:
                best = result
    finally:
        torch.set_num_threads(default_threads)
    assert best is not None
    return best, variants
