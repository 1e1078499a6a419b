"""The projection approximator: learns a 2-D map of the latents, exports to ONNX unclipped."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")


def test_approximator_reproduces_a_map_with_negative_coordinates_and_exports_unclipped(tmp_path) -> None:
    import torch

    from operators.projection import OnnxProjector, export_approximator, fit_approximator

    rng = np.random.default_rng(0)
    # latents on a 3-d manifold in 512-d (like a trained encoder's), the target a smooth map of it
    u = rng.uniform(-1, 1, (400, 3)).astype(np.float32)
    basis = rng.standard_normal((3, 512)).astype(np.float32)
    latents = (u @ basis + 4.0 * basis[0] + 0.01 * rng.standard_normal((400, 512))).astype(np.float32)
    target = np.stack([5 * u[:, 1], 5 * u[:, 2] + u[:, 0]], axis=1)  # centred on 0: half negative
    model, fit = fit_approximator(latents, target, hidden=(64,), epochs=80, seed=0)
    assert fit.heldout_points == 40 and fit.relative_rmse < 0.25

    path = export_approximator(model, tmp_path / "projector.onnx", 512)
    proj = OnnxProjector(path)
    out = proj.project(latents[:7])
    assert out.shape == (7, 2) and out.dtype == np.float32
    with torch.no_grad():
        ref = model(torch.from_numpy(latents[:7])).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert (proj.project(latents) < 0).any()  # no ReLU at the output
    # scale invariance: the graph L2-normalises its input like the UMAP fit did
    np.testing.assert_allclose(proj.project(latents[:3] * 5.0), proj.project(latents[:3]), rtol=1e-4, atol=1e-4)
    assert proj.project(latents[0]).shape == (1, 2)
