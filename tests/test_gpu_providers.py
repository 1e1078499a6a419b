"""The GPU code paths, selected on this CPU-only machine: providers chosen, the fallback logged once, IO binding.

What runs on a GPU (CUDA, TensorRT fp16 and its parity check against fp32) is measured only where one is
available (docs/scaling.md says which figures exist).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from operators.bundle import DEFAULT_BUNDLE, OnnxEncoder
from operators.providers import execution_providers, parity_holds
from stream.config import ServeSettings

ENCODER = DEFAULT_BUNDLE / "encoder.onnx"
EVERY_PROVIDER = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_gpu_install_puts_tensorrt_fp16_then_cuda_before_the_cpu() -> None:
    assert execution_providers("cuda", EVERY_PROVIDER) == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}), ("CUDAExecutionProvider", {}),
        "CPUExecutionProvider",
    ]
    assert execution_providers("auto", EVERY_PROVIDER[1:]) == [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


def test_device_cpu_and_a_cpu_only_install_use_the_cpu_alone() -> None:
    assert execution_providers("cpu", EVERY_PROVIDER) == ["CPUExecutionProvider"]
    assert execution_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="device"):
        execution_providers("tpu", EVERY_PROVIDER)


def test_without_a_usable_gpu_the_encoder_falls_back_to_the_cpu_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="operators.bundle"):
        encoder = OnnxEncoder(ENCODER, providers=execution_providers("cuda", EVERY_PROVIDER))
    fallback = [r for r in caplog.records if "no GPU is usable" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].levelno == logging.WARNING
    assert encoder.device == "cpu"
    latents = encoder.encode(np.zeros((1, 1, 512, 512), np.float32))
    assert latents.shape == (1, 512) and np.isfinite(latents).all()


def test_io_binding_encodes_exactly_what_a_plain_run_encodes() -> None:
    batch = np.random.default_rng(1).random((3, 1, 512, 512), dtype=np.float32)
    plain = OnnxEncoder(ENCODER, device="cpu")
    bound = OnnxEncoder(ENCODER, device="cpu", io_binding=True)
    assert not plain.io_binding and bound.io_binding
    np.testing.assert_array_equal(bound.encode(batch), plain.encode(batch))


def test_fp16_is_kept_only_where_its_latents_match_fp32() -> None:
    ref = np.random.default_rng(2).normal(size=(2, 512)).astype(np.float32)
    assert parity_holds(ref, ref.astype(np.float16), rtol=1e-2)
    off = ref.copy()
    off[0, 7] += 0.1 * np.abs(ref).max()
    assert not parity_holds(ref, off, rtol=1e-2)
    assert not parity_holds(ref, np.full_like(ref, np.nan), rtol=1e-2)


def test_serve_takes_device_workers_and_a_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENT_STREAM_DEVICE", "cuda")
    settings = ServeSettings(workers=4, ray_address="127.0.0.1:6379", gpus_per_worker=0.5)
    assert (settings.device, settings.workers, settings.ray_address, settings.gpus_per_worker) == (
        "cuda", 4, "127.0.0.1:6379", 0.5)
    assert ServeSettings().workers == 1  # in-process, no Ray, unless asked
    with pytest.raises(ValueError):
        ServeSettings(workers=0)
    with pytest.raises(ValueError):
        ServeSettings(device="gpu")
