"""Importing the bridge stays light: no model runtimes, and no image codec or Tiled until a frame is asked for."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "umap", "numba", "pynndescent", "sklearn", "cv2", "tiled")


def test_importing_frontend_bridge_pulls_in_no_model_code_or_heavy_libraries() -> None:
    code = (
        "import sys, json, frontend_bridge, frontend_bridge.app, frontend_bridge.frames; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
