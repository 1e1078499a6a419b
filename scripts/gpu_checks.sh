#!/usr/bin/env bash
# The GPU measurements of issue 18, in one run on a machine with an NVIDIA GPU (see docs/scaling.md):
# encoder p50 for the lite bundle and the paper-size model at batch 1 and 8 on the CPU, CUDA fp32 and
# TensorRT fp16 (where installed), with each GPU provider's latents compared with the CPU's; and, on full-size
# raw frames, preprocess + encode separate (numba on the host) against fused (the preprocessing graph in the
# encoder's session on the device), with the fused images and latents compared with the host path's.
#   bash scripts/gpu_checks.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/encode_devices_gpu.json}
make install-dev >/dev/null
# onnxruntime-gpu provides the same module as the CPU build the base install brings: replace it (docs/scaling.md)
.venv/bin/pip uninstall -q -y onnxruntime
.venv/bin/pip install -q --force-reinstall --no-deps "onnxruntime-gpu>=1.20"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
.venv/bin/python -c "import onnxruntime as o; print('providers:', o.get_available_providers())"
# rows: the encoders alone; pipeline_rows: raw frames -> latents, separate vs fused, per provider
.venv/bin/python -m benchmarks.encode_devices --json "$OUT"
# the fused path's parity on this machine's CPU provider (the GPU's is image_err / rel_err_vs_separate above)
.venv/bin/python -m pytest -q tests/test_device_preprocess.py
