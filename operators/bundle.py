"""The model bundle: a directory with manifest.json and the artifacts it lists, and its runtime API.

    bundle = ModelBundle.load(path, runtime="onnx")   # verifies sha256 + pinned versions first
    bundle.preprocessor(image, out=None) -> (1, S, S) float32
    bundle.encoder.encode(batch)  -> (B, latent_dim) float32 latent means
    bundle.encode(batch) -> (latents, features): the features are what the clusterer takes (below)
    bundle.frame_encoder.encode_frames(images) -> the same pair from raw frames (device preprocessing; None when off)
    bundle.projector.project(latents) -> (B, 2) float32
    bundle.new_clusterer() -> OnlineClusterer
    bundle.reference_embedding, bundle.reference_clusters, bundle.warmup()

Integrity: every file in the directory except manifest.json is listed with its sha256; `load` hashes each
file it lists before anything is parsed or unpickled, refuses a file that differs, is missing or is not
listed. Every listed name must be a relative path that stays inside the bundle directory, symlinks
resolved; `read_manifest` refuses any other before a file is opened. Versions: `libraries` in the
manifest records the versions the bundle was made with and a policy:
"exact" (pickles: umap-learn, numba, pynndescent, scikit-learn; checked before umap.joblib is unpickled),
"minimum" (onnxruntime must be at least the major.minor that exported the graphs) or "info".
Clustering input: where the manifest's `clustering.features` names a graph (a cluster embedding,
operators.model.cluster_features), the clustering is fitted on and fed with that graph's output on the
preprocessed frame; otherwise on the latent itself. Either way `encode` gives the pair, so no caller chooses.
Serving imports onnxruntime only; torch only for runtime="torchscript"; umap only for projection="umap".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from operators.clustering import ClusteringSettings, ClusterState, OnlineClusterer
from operators.device_preprocess import FusedEncoder
from operators.preprocess import Preprocessor, PreprocessSpec, detector_mask
from operators.providers import (
    DEVICE_OF,
    GPU_PROVIDERS,
    TRT_FP16_RTOL,
    execution_providers,
    parity_holds,
    preprocess_on_device,
    provider_name,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"
FEATURES_ONNX = "cluster_features.onnx"  # (B, 1, S, S) preprocessed frames -> (B, feature_dim) for the clusterer

# library -> (policy, files whose loading depends on it)
LIBRARY_POLICY: dict[str, str] = {
    "umap-learn": "exact",
    "numba": "exact",
    "pynndescent": "exact",
    "scikit-learn": "exact",
    "onnxruntime": "minimum",
    "river": "info",
    "numpy": "info",
}
PICKLE_LIBRARIES = ("umap-learn", "numba", "pynndescent", "scikit-learn")


class BundleError(Exception):
    """A model bundle cannot be used; the message names the file (and library) at fault."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, unlisted, outside the bundle directory, or its sha256 differs."""


class BundleVersionError(BundleError):
    """An installed library does not satisfy the version the bundle was made with."""


class BundleFormatError(BundleError):
    """manifest.json is missing, unreadable or lacks a required field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The same import under another distribution name: the `gpu` extra's build of ONNX Runtime.
_SAME_MODULE = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def installed_version(dist: str) -> str | None:
    for name in _SAME_MODULE.get(dist, (dist,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions() -> dict[str, dict[str, str]]:
    out = {}
    for lib, policy in LIBRARY_POLICY.items():
        v = installed_version(lib)
        if v is not None:
            out[lib] = {"version": v, "policy": policy}
    return out


def _major_minor(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add created time, library versions and the sha256 of every file in bundle_dir; write manifest.json."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(bundle_dir).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    full = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **manifest,
        "libraries": library_versions(),
        "files": files,
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleFormatError(f"{path}: no manifest.json, not a model bundle")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleFormatError(f"{path}: unreadable manifest ({e})") from e
    for key in ("name", "version", "files", "libraries", "preprocessing", "latent_dim", "input_shape",
                "encoder", "projection", "clustering"):
        if key not in manifest:
            raise BundleFormatError(f"{path}: manifest lacks required field {key!r}")
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleFormatError(f"{path}: bundle format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    if not isinstance(manifest["files"], dict):
        raise BundleFormatError(f"{path}: 'files' must map file names to their sha256")
    for rel in manifest["files"]:
        _check_inside(Path(bundle_dir), rel)
    return manifest


def _check_inside(bundle_dir: Path, rel: str) -> None:
    """A file a manifest names must be inside the bundle: checksums and loads only ever read its own files."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts:
        raise BundleIntegrityError(
            f"{bundle_dir / MANIFEST}: lists {rel!r}; bundle files must be relative paths inside the bundle"
        )
    root = bundle_dir.resolve()
    target = (root / pure).resolve()
    if target == root or not target.is_relative_to(root):
        raise BundleIntegrityError(
            f"{bundle_dir / MANIFEST}: {rel!r} resolves to {target}, outside the bundle directory {root} "
            "(a symlink?); refusing to read it"
        )


def verify_checksums(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    bundle_dir = Path(bundle_dir)
    listed = manifest["files"]
    for rel, entry in listed.items():
        p = bundle_dir / rel
        if not p.is_file():
            raise BundleIntegrityError(f"{p}: listed in the manifest but missing")
        got = sha256_file(p)
        if got != entry["sha256"]:
            raise BundleIntegrityError(
                f"{p}: sha256 {got[:16]}... does not match the manifest ({entry['sha256'][:16]}...); "
                "the file was modified or corrupted - refusing to load it"
            )
    for p in bundle_dir.rglob("*"):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in listed and "__pycache__" not in rel:
            raise BundleIntegrityError(f"{p}: not listed in the manifest; refusing a bundle with unknown files")


def verify_versions(manifest: dict[str, Any], libraries: tuple[str, ...], file: str) -> None:
    """Check the recorded versions of `libraries` against the installed ones before `file` is loaded."""
    recorded = manifest["libraries"]
    for lib in libraries:
        entry = recorded.get(lib)
        if entry is None:
            continue
        want, policy = entry["version"], entry.get("policy", "exact")
        have = installed_version(lib)
        if policy == "info":
            continue
        if have is None:
            raise BundleVersionError(f"{file}: needs {lib}=={want}, which is not installed")
        if policy == "exact" and have != want:
            raise BundleVersionError(
                f"{file}: made with {lib}=={want} but {lib}=={have} is installed; pickled models break "
                f"across {lib} versions - install {lib}=={want} or refit the bundle"
            )
        if policy == "minimum" and _major_minor(have) < _major_minor(want):
            raise BundleVersionError(f"{file}: needs {lib}>={want}, but {lib}=={have} is installed")


def compute_threads(requested: int | None = None) -> int:
    """Threads one frame's compute may use (ONNX Runtime intra-op, the preprocessing pass).

    `requested` (serve's `ort_threads` setting, also $LATENT_STREAM_ORT_THREADS through ServeSettings), else
    min(2, cores): the stages run one after another, so each may use the same cores in turn. On the 2-core
    box, 1 thread was tried as the default: it helped embedded mode in paired runs but not facility mode, and
    the frame path alone is 1.5x slower with it (benchmarks/results/README.md); set it to 1 where Tiled shares
    the 2 cores.
    """
    return requested or min(2, os.cpu_count() or 1)


def default_session_options(intra_op_threads: int | None = None) -> Any:
    """ONNX Runtime options for a small CPU box: a couple of intra-op threads, full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = compute_threads(intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin after every Run, taking the core the event loop, ZeroMQ
    # and Tiled need: on the shared 2-core box 2 threads gave 15 ms p50 spinning vs 7 ms not (benchmarks).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxEncoder:
    """encode((B, 1, S, S) float32) -> (B, latent_dim) float32 latent means, through ONNX Runtime.

    On a GPU provider the batch goes in and the latents come out through IO binding (one copy each way, no
    per-run allocation of the output on the host by ONNX Runtime's default path); ``io_binding=True`` uses it
    on the CPU too. When a GPU provider was asked for but the session runs on the CPU (no GPU, driver or CUDA
    libraries), one warning says so and the encoder serves on the CPU. ``new_session`` and ``run`` serve other
    graphs around the encoder (operators.device_preprocess) the same way.
    """

    def __init__(self, path: Path, *, session_options: Any = None, providers: list[Any] | None = None,
                 device: str = "auto", io_binding: bool | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if providers is None:
            providers = execution_providers(device, ort.get_available_providers())
        wanted_gpu = [p for p in providers if provider_name(p) in GPU_PROVIDERS]
        self._sess = self._session(session_options, providers)
        if any(provider_name(p) == "TensorrtExecutionProvider" for p in wanted_gpu) and \
                self._sess.get_providers()[0] == "TensorrtExecutionProvider" and not self._trt_parity(session_options):
            rest = [p for p in providers if provider_name(p) != "TensorrtExecutionProvider"]
            log.warning("%s: TensorRT fp16 latents differ from fp32 by more than %g: encoding with CUDA fp32",
                        self.path, TRT_FP16_RTOL)
            self._sess = self._session(session_options, rest)
        self._options, self._providers = session_options, providers
        self.device = DEVICE_OF.get(self._sess.get_providers()[0], self._sess.get_providers()[0])
        if wanted_gpu and self.device == "cpu":
            log.warning("%s: asked for %s but no GPU is usable here: the encoder runs on the CPU", self.path,
                        ", ".join(provider_name(p) for p in wanted_gpu))
        else:
            log.info("%s: encoder on %s", self.path, self.device)
        self._in = self._sess.get_inputs()[0].name
        self._out = self._sess.get_outputs()[0].name
        self.io_binding = self.device != "cpu" if io_binding is None else io_binding

    def _session(self, session_options: Any, providers: list[Any], model: bytes | None = None) -> Any:
        import warnings

        import onnxruntime as ort

        try:
            # A provider ONNX Runtime cannot use is a Python warning from it; the fallback is logged above, once
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return ort.InferenceSession(str(self.path) if model is None else model,
                                            session_options or default_session_options(), providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            if any(provider_name(p) in GPU_PROVIDERS for p in providers):
                log.warning("%s: a GPU session could not be created (%s): trying the CPU", self.path, e)
                return self._session(session_options, ["CPUExecutionProvider"], model)
            raise BundleError(f"{self.path}: ONNX Runtime cannot load the encoder ({e})") from e

    def new_session(self, model: bytes) -> Any:
        """A session of another graph built around this encoder, on its providers but TensorRT: TensorRT's
        fp16 would also take the preprocessing, whose bin sums (up to 1.6e7) overflow fp16, so such a graph
        runs on CUDA fp32 (operators.device_preprocess)."""
        providers = [p for p in self._providers if provider_name(p) != "TensorrtExecutionProvider"]
        return self._session(self._options, providers, model)

    def _trt_parity(self, session_options: Any) -> bool:
        """Whether this TensorRT fp16 session's latents match a CUDA fp32 session's on a fixed input."""
        shape = [d if isinstance(d, int) else 1 for d in self._sess.get_inputs()[0].shape]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        fp16 = self._sess.run(None, {self._sess.get_inputs()[0].name: x})[0]
        fp32 = self._session(session_options, [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
        ref = fp32.run(None, {fp32.get_inputs()[0].name: x})[0]
        return parity_holds(ref, fp16, TRT_FP16_RTOL)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self._sess, np.ascontiguousarray(batch, np.float32))[0]

    def run(self, session: Any, x: np.ndarray) -> list[np.ndarray]:
        """``session``'s outputs for ``x`` as its first input, through IO binding where this encoder uses it."""
        name_in = session.get_inputs()[0].name
        if not self.io_binding:
            return session.run(None, {name_in: x})
        binding = session.io_binding()
        binding.bind_cpu_input(name_in, x)  # copied to the device once (read in place on the CPU)
        on_gpu = session.get_providers()[0] in GPU_PROVIDERS
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda" if on_gpu else "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class TorchScriptEncoder:
    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._mod = torch.jit.load(str(path), map_location="cpu").eval()
        self.path = Path(path)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            return self._mod(x).numpy()


@dataclass
class ModelBundle:
    path: Path
    manifest: dict[str, Any]
    preprocessor: Preprocessor
    encoder: OnnxEncoder | TorchScriptEncoder
    projector: Any
    clustering_state: ClusterState
    clustering_settings: ClusteringSettings
    reference_embedding: np.ndarray
    reference_clusters: np.ndarray
    # raw frames -> (latents, features) with the preprocessing in the encoder's session
    # (operators.device_preprocess); None: the preprocessor runs on the host and `encoder` takes its output
    frame_encoder: FusedEncoder | None = None
    # preprocessed frames -> the clusterer's input (`clustering.features`); None: the clusterer takes the latent
    feature_encoder: OnnxEncoder | None = None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        runtime: str = "onnx",
        *,
        projection: str = "approximator",
        session_options: Any = None,
        intra_op_threads: int | None = None,
        providers: list[Any] | None = None,
        device: str = "auto",
        device_preprocess: str = "auto",
    ) -> ModelBundle:
        """Load and verify a bundle. runtime: "onnx" | "torchscript"; projection: "approximator" | "umap";
        device: where the ONNX encoder runs, "auto" | "cpu" | "cuda" (`execution_providers`);
        device_preprocess: "auto" (where the encoder runs on a GPU) | "on" | "off": the preprocessing in the
        encoder's session (`frame_encoder`, `preprocess_on_device`)."""
        bdir = Path(path) if path is not None else DEFAULT_BUNDLE
        manifest = read_manifest(bdir)
        verify_checksums(bdir, manifest)
        files = manifest["files"]

        def need(rel: str | None, what: str) -> Path:
            if not rel or rel not in files:
                raise BundleFormatError(f"{bdir / MANIFEST}: no {what} artifact listed")
            return bdir / rel

        pre = Preprocessor.from_spec(manifest["preprocessing"], threads=compute_threads(intra_op_threads))
        so = session_options or default_session_options(intra_op_threads)
        if runtime == "onnx":
            enc_path = need(manifest["encoder"].get("onnx"), "ONNX encoder")
            verify_versions(manifest, ("onnxruntime",), str(enc_path))
            encoder: OnnxEncoder | TorchScriptEncoder = OnnxEncoder(enc_path, session_options=so,
                                                                    providers=providers, device=device)
        elif runtime == "torchscript":
            if device_preprocess == "on":
                raise ValueError("device preprocessing needs the ONNX runtime")
            enc_path = need(manifest["encoder"].get("torchscript"), "TorchScript encoder")
            encoder = TorchScriptEncoder(enc_path, threads=intra_op_threads)
        else:
            raise ValueError(f"runtime must be 'onnx' or 'torchscript', got {runtime!r}")
        feature_encoder = None
        if features_rel := manifest["clustering"].get("features"):  # ONNX under either runtime
            features_path = need(features_rel, "cluster features")
            verify_versions(manifest, ("onnxruntime",), str(features_path))
            feature_encoder = OnnxEncoder(features_path, session_options=so, providers=providers, device=device)
        frame_encoder = None
        if isinstance(encoder, OnnxEncoder) and preprocess_on_device(device_preprocess, encoder.device):
            frame_encoder = FusedEncoder(encoder, enc_path, pre.spec,
                                         features_path=feature_encoder.path if feature_encoder else None)
            log.info("%s: preprocessing runs in the encoder's session on %s (the encode stage's time includes it)",
                     bdir, encoder.device)

        proj = manifest["projection"]
        if projection == "approximator":
            p = need(proj.get("approximator"), "projection approximator")
            verify_versions(manifest, ("onnxruntime",), str(p))
            from operators.projection import OnnxProjector

            projector: Any = OnnxProjector(p)
        elif projection == "umap":
            p = need(proj.get("umap"), "umap-learn projection")
            verify_versions(manifest, PICKLE_LIBRARIES, str(p))  # before unpickling
            import joblib

            from operators.projection import UmapProjector

            projector = UmapProjector(joblib.load(p))
        else:
            raise ValueError(f"projection must be 'approximator' or 'umap', got {projection!r}")

        clu = manifest["clustering"]
        state = ClusterState.load(need(clu.get("state"), "clustering state"))
        settings = ClusteringSettings.from_dict(clu["settings"])
        ref_path = need(manifest.get("reference"), "reference embedding")
        with np.load(ref_path, allow_pickle=False) as z:
            ref_emb = z["embedding"].astype(np.float32)
            ref_clu = z["clusters"].astype(np.int64)
        log.info("loaded bundle %s:%s from %s (runtime=%s, projection=%s)", manifest["name"],
                 manifest["version"], bdir, runtime, projection)
        return cls(bdir, manifest, pre, encoder, projector, state, settings, ref_emb, ref_clu, frame_encoder,
                   feature_encoder)

    @property
    def autoencoder_model(self) -> str:
        return f"{self.manifest['name']}:{self.manifest['version']}"

    @property
    def dimred_model(self) -> str:
        p = self.manifest["projection"]
        return f"{p.get('name', 'umap')}:{self.manifest['version']}"

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["input_shape"][-1])

    @property
    def reference_sources(self) -> list[dict[str, Any]] | None:
        """Where each reference point's frame was recorded ({source, index, dataset}; `latent-stream adapt`
        records it), in reference order; None when the bundle does not say (the shipped one)."""
        rel = self.manifest.get("reference_sources")
        if not rel:
            return None
        frames = json.loads((self.path / rel).read_text())["frames"]  # listed, so checksummed by load()
        if len(frames) != len(self.reference_embedding):
            raise BundleFormatError(f"{self.path / rel}: {len(frames)} sources for "
                                    f"{len(self.reference_embedding)} reference points")
        return frames

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.preprocessor.spec

    def encode(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(latents, clustering features) of preprocessed frames (B, 1, S, S); the features are the latents
        where the bundle has no feature graph."""
        latents = np.asarray(self.encoder.encode(batch), np.float32)
        if self.feature_encoder is None:
            return latents, latents
        return latents, np.asarray(self.feature_encoder.encode(batch), np.float32)

    def new_clusterer(self) -> OnlineClusterer:
        return OnlineClusterer(self.clustering_state, self.clustering_settings)

    def warmup(self) -> None:
        """Run every session / JIT once so the first frame does not pay for it."""
        s = self.input_size
        frame = np.zeros((s, s), np.int32)
        frame[s // 2, s // 2] = 10
        x = self.preprocessor(frame)[None]
        frame.setflags(write=False)  # received frames are read-only views: numba compiles those separately
        self.preprocessor(frame)
        z, features = self.encode(x)
        self.projector.project(z)
        self.new_clusterer().learn_predict_one(features[0])
        mask = detector_mask(self.preprocess_spec.detector)
        if self.frame_encoder is not None and mask is not None:  # the detector's frames build no session live
            self.frame_encoder.encode_frames([np.zeros(mask.shape, np.int32)])
