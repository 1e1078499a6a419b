"""Export the C-VAE mean encoder to ONNX (static batch 1 and dynamic batch) and TorchScript, with parity.

Serving runs the dynamic-batch ONNX graph through ONNX Runtime; the static 1x1xSxS graph is exported too
(TensorRT and other runtimes prefer fully static shapes). TorchScript is kept for `runtime="torchscript"`.
The parity check runs the same random batch through PyTorch and each export and reports the relative error
max|a - b| / max|b| in float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from operators.model.cvae import CVAE, MeanEncoder

log = logging.getLogger(__name__)

ENCODER_ONNX = "encoder.onnx"  # dynamic batch (B, 1, S, S) -> (B, latent_dim)
ENCODER_STATIC_ONNX = "encoder_static.onnx"  # (1, 1, S, S) -> (1, latent_dim)
ENCODER_TORCHSCRIPT = "encoder.ts"
INPUT_NAME = "image"
OUTPUT_NAME = "latent_mean"
OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    paths: dict[str, Path]
    parity: dict[str, float]  # artifact -> relative error vs PyTorch


def _quiet_export(*args, **kwargs) -> None:
    # the dynamo exporter prints progress lines and warns about optional torchvision ops; keep logs clean
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.onnx.export(*args, **kwargs)


def export_onnx(model: CVAE, path: Path, *, dynamic_batch: bool) -> Path:
    enc = MeanEncoder(model).eval()
    s = model.cfg.input_size
    example = torch.rand(2 if dynamic_batch else 1, 1, s, s)
    kwargs: dict = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    _quiet_export(
        enc,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        opset_version=OPSET,
        external_data=False,
        **kwargs,
    )
    return path


def export_torchscript(model: CVAE, path: Path) -> Path:
    enc = MeanEncoder(model).eval()
    s = model.cfg.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; still the asked-for format
        traced = torch.jit.trace(enc, torch.rand(1, 1, s, s), check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        torch.jit.save(traced, str(path))
    return path


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def parity(model: CVAE, paths: dict[str, Path], *, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Relative error of each exported artifact against PyTorch on the same random float32 input."""
    import onnxruntime as ort

    s = model.cfg.input_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, s, s, generator=gen)
    with torch.no_grad():
        ref = model.eval().encode_mean(x).numpy()
    out: dict[str, float] = {}
    for name, path in paths.items():
        if path.suffix == ".onnx":
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            fixed = sess.get_inputs()[0].shape[0] == 1
            xs = x[:1] if fixed else x
            got = sess.run(None, {INPUT_NAME: xs.numpy()})[0]
            out[name] = relative_error(got, ref[: len(xs)])
        else:
            ts = torch.jit.load(str(path))
            with torch.no_grad():
                out[name] = relative_error(ts(x).numpy(), ref)
    return out


def export_all(model: CVAE, out_dir: Path, *, torchscript: bool = True) -> ExportResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    paths = {
        ENCODER_ONNX: export_onnx(model, out_dir / ENCODER_ONNX, dynamic_batch=True),
        ENCODER_STATIC_ONNX: export_onnx(model, out_dir / ENCODER_STATIC_ONNX, dynamic_batch=False),
    }
    if torchscript:
        paths[ENCODER_TORCHSCRIPT] = export_torchscript(model, out_dir / ENCODER_TORCHSCRIPT)
    errors = parity(model, paths)
    for name, err in errors.items():
        log.info("export parity %s: relative error %.2e vs PyTorch", name, err)
    return ExportResult(paths=paths, parity=errors)
