"""What the numbers were measured on: CPU, cores, memory, GPU, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

# Distributions whose versions change the numbers; missing ones are reported as absent, not an error.
_LIBRARIES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "umap-learn",
    "numba",
    "pynndescent",
    "scikit-learn",
    "river",
    "opencv-python-headless",
    "pillow",
    "pyzmq",
    "msgpack",
    "websockets",
    "uvicorn",
    "fastapi",
    "tiled",
    "arroyopy",
)


@dataclass(slots=True)
class MachineInfo:
    cpu_model: str
    physical_cores: int | None
    logical_cores: int
    usable_cores: int  # what this process may run on (cgroup / affinity)
    memory_gb: float
    gpu: str | None
    onnxruntime_providers: list[str]
    python: str
    platform: str
    libraries: dict[str, str] = field(default_factory=dict)
    load_average: tuple[float, float, float] | None = None  # how busy the machine was at start
    # A fixed pure-Python loop timed at start (median of 5): on a shared VM a noisy neighbour shows here
    # even when this machine's load average is ~0, so runs on different days can be compared fairly.
    calibration_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        gpu = self.gpu or "no GPU"
        speed = f"; calibration loop {self.calibration_ms:.0f} ms" if self.calibration_ms else ""
        return (
            f"{self.cpu_model}, {self.usable_cores} usable cores ({self.logical_cores} logical), "
            f"{self.memory_gb:.0f} GB RAM, {gpu}; Python {self.python}{speed}"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    """The GPU name(s) from nvidia-smi, else what torch sees, else None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            if out:
                return "; ".join(line.strip() for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def _versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _ort_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def machine_info() -> MachineInfo:
    """Describe this machine and the libraries that the measurements depend on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return MachineInfo(
        cpu_model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True) or usable,
        usable_cores=usable,
        memory_gb=psutil.virtual_memory().total / 2**30,
        gpu=_gpu(),
        onnxruntime_providers=_ort_providers(),
        python=platform.python_version(),
        platform=platform.platform(),
        libraries=_versions(),
        load_average=load,
        calibration_ms=calibration_ms(),
    )


def calibration_ms(iterations: int = 1_000_000, repeats: int = 5) -> float:
    """Median milliseconds of a fixed single-threaded Python loop (one core's speed right now)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = 0
        for i in range(iterations):
            total += i
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[repeats // 2]
