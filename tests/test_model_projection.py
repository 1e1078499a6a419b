"""The projection approximator: learns a 2-D map of the latents, exports to ONNX unclipped."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")


def test_approximator_reproduces_a_map_with_negative_coordinates_and_exports_unclipped(tmp_path) -> None:
    import torch

    from operators.projection import OnnxProjector, export_approximator, fit_approximator, l2_normalise

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((400, 512)).astype(np.float32)
    w = rng.standard_normal((512, 2)).astype(np.float32)
    target = (l2_normalise(latents) @ w) * 10.0  # a smooth map centred on 0: half the points negative
    model, fit = fit_approximator(latents, target, hidden=(64,), epochs=60, seed=0)
    assert fit.heldout_points == 40 and fit.relative_rmse < 0.5

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
