"""`latent-stream adapt` as a serving install runs it: a subprocess in which `import torch` fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REAL_DATA = Path(__file__).resolve().parent / "data" / "bioxtasraw"
CBF_SCAN = REAL_DATA / "calibrant_scan_cbf"  # 24 real PILATUS frames, a slow diagonal drift of the beam
EIGER_SCAN = REAL_DATA / "calibrant_scan_master.h5"  # the same, EIGER master + bitshuffle-LZ4 file
EIGER2_VAC = REAL_DATA / "vac_007_master.h5"  # two real EIGER2 XE 9M frames (cropped)

# A meta-path finder that refuses torch (and anything under it), installed before the CLI is imported: the
# command must neither import torch nor need it, exactly as on `pip install latent-stream` without extras.
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (serving install)")
        return None
sys.meta_path.insert(0, _NoTorch())
for _m in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[_m]
from stream.cli import app
app()
"""


def run_adapt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`latent-stream adapt ARGS...` with torch blocked; returns the finished process (stdout, stderr, rc)."""
    return subprocess.run([sys.executable, "-c", NO_TORCH, "adapt", *args, "--no-progress"],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
