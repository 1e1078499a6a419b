"""`latent-stream adapt`: a beamline's own map from its recorded frames, on a serving install (torch blocked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from adapt_support import CBF_SCAN, EIGER2_VAC, EIGER_SCAN, NO_TORCH, run_adapt

from operators.bundle import ModelBundle
from operators.projection import OnnxProjector


def test_the_no_torch_shim_really_blocks_torch() -> None:
    code = NO_TORCH.replace("from stream.cli import app\napp()\n", "import torch\n")
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "torch is not installed" in done.stderr


@pytest.mark.e2e  # adapt in a subprocess: imports, numba compilation, UMAP (~20 s)
def test_adapt_on_real_cbf_frames_writes_a_bundle_serve_can_load_without_torch(adapted_bundle) -> None:
    out, done = adapted_bundle
    bundle = ModelBundle.load(out)  # checksums (reference_sources.json included) and versions verified
    assert bundle.manifest["name"] == "cvae-lite-adapted"
    assert bundle.manifest["adapted"]["base"]["name"] == "cvae-lite"
    assert bundle.manifest["adapted"]["sources"] == [
        {"source": str(CBF_SCAN.resolve()), "kind": "directory", "frames": 24, "dataset": ""}
    ]
    assert "reference_sources.json" in bundle.manifest["files"]
    # it says what it capped to fit 24 frames, and how faithful the served approximator is
    assert "capped to the data: UMAP n_neighbors 30 -> 5" in done.stdout
    assert "held-back frames: rms" in done.stdout
    check = bundle.manifest["projection"]["approximator_check"]
    assert check["rms_error"] <= check["bound"] == 0.05 and check["heldout_frames"] == 2
    # every reference point remembers its frame: the CBF file, in scan order
    sources = bundle.reference_sources
    assert [Path(s["source"]).name for s in sources] == sorted(p.name for p in CBF_SCAN.glob("*.cbf"))
    assert len(bundle.reference_embedding) == len(bundle.reference_clusters) == 24
    # the reference map is exactly what the served approximator draws for those frames
    latents = bundle.encoder.encode(np.stack([bundle.preprocessor(_cbf(s["source"])) for s in sources]))
    served = OnnxProjector(out / "projector.onnx").project(latents)
    np.testing.assert_allclose(served, bundle.reference_embedding, atol=1e-4)
    # the clustering is refitted on what it will take live: the base's cluster features where it has them
    base = ModelBundle.load()
    assert bundle.manifest["clustering"].get("features") == base.manifest["clustering"].get("features")
    _, features = bundle.encode(np.stack([bundle.preprocessor(_cbf(s["source"])) for s in sources]))
    assert bundle.clustering_state.mean.shape == (features.shape[1],)


def _cbf(path: str) -> np.ndarray:
    import fabio

    with fabio.open(path) as img:
        return np.asarray(img.data)


@pytest.mark.e2e  # adapt in a subprocess: imports, numba compilation, UMAP (~20 s)
def test_adapt_refuses_an_approximator_beyond_the_bound_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "refused"
    done = run_adapt(str(EIGER_SCAN), "--out", str(out), "--max-approx-error", "0.000001")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "refused" in done.stderr and "umap-learn's own transform" in done.stderr
    assert "the bound is 0.00%" in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".adapt-*"))


def test_adapt_with_too_few_frames_says_how_many_it_needs(tmp_path: Path) -> None:
    done = run_adapt(str(EIGER2_VAC), "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "2 frames: adapt needs at least 20" in done.stderr
    assert not (tmp_path / "b").exists()


def test_the_adapted_bundle_records_its_provenance(adapted_bundle) -> None:
    out, _ = adapted_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    versions = manifest["adapted"]["versions"]
    assert versions["umap-learn"] and versions["scikit-learn"] and versions["onnxruntime"]
    assert manifest["adapted"]["base"]["manifest_sha256"]
    assert manifest["encoder"]["torchscript"] is None
