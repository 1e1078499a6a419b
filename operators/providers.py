"""Which ONNX Runtime execution providers the encoder asks for, and when TensorRT fp16 is good enough.

Used by `operators.bundle.OnnxEncoder`: ``execution_providers(device, available)`` picks the providers best
first; ``parity_holds`` decides whether TensorRT fp16 latents match fp32 closely enough to be served;
``preprocess_on_device`` whether the preprocessing runs in the encoder's session (operators.device_preprocess).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "cuda")
DEVICE_PREPROCESS = ("auto", "on", "off")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEVICE_OF = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
# TensorRT fp16 is kept only where its latents stay this close to fp32's (relative to their largest value).
TRT_FP16_RTOL = 1e-2


def execution_providers(device: str, available: list[str]) -> list[Any]:
    """The ONNX Runtime providers for ``device`` ("auto" | "cpu" | "cuda"), best first, among ``available``.

    GPU: TensorRT with fp16 (where installed; `OnnxEncoder` drops it unless it matches fp32), then CUDA, then
    the CPU as the fallback. "auto" and "cuda" choose alike: with no GPU provider installed both run on the CPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    chosen: list[Any] = []
    if device != "cpu":
        if "TensorrtExecutionProvider" in available:
            chosen.append(("TensorrtExecutionProvider", {"trt_fp16_enable": True}))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {}))
    return [*chosen, "CPUExecutionProvider"]


def preprocess_on_device(setting: str, encoder_device: str) -> bool:
    """Whether frames go raw into the fused preprocessing + encoder session ("auto": where it runs on a GPU).

    On the CPU the numba pass is the faster path (benchmarks/results/preprocess_devices_cpu.json) and stays
    the default; "on" selects the fused session there too (tests, benchmarks), "off" never.
    """
    if setting not in DEVICE_PREPROCESS:
        raise ValueError(f"device_preprocess must be one of {DEVICE_PREPROCESS}, not {setting!r}")
    return setting == "on" or (setting == "auto" and encoder_device != "cpu")


def provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else str(provider)


def parity_holds(reference: np.ndarray, candidate: np.ndarray, rtol: float) -> bool:
    """Whether ``candidate`` is within ``rtol`` of the largest |value| of ``reference``, everywhere."""
    if reference.shape != candidate.shape or not np.isfinite(candidate).all():
        return False
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(candidate.astype(np.float64) - reference))) <= rtol * scale
