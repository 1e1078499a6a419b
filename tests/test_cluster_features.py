"""A bundle whose clustering takes a cluster embedding's features: written from a checkpoint, verified, served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from operators.bundle import DEFAULT_BUNDLE, FEATURES_ONNX, MANIFEST, ModelBundle, write_manifest
from operators.model.cluster_embedding import Embedding, EmbeddingNet
from operators.model.cluster_features import add_cluster_features
from operators.workers.compute import FrameCompute
from stream.synthetic import generate_scan

FRAMES = 12


@pytest.fixture(scope="module", params=["mean", "mean+max"])
def written(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """(bundle dir, checkpoint, raw frames): a small untrained embedding (of block means, or of block means and
    maxima) served on a base bundle whose map has those frames as its reference points (the default bundle's
    files, its reference cut to as many points)."""
    tmp = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    ckpt = tmp / "last.pt"
    settings = {"width": 8, "dim": 16, "size": 128, "pool": request.param, "history": [1.0, 0.5]}
    net = EmbeddingNet(8, 16, in_channels=len(request.param.split("+")))
    torch.save({"model": net.state_dict(), "step": 2, "settings": settings}, ckpt)
    frames = np.stack([fr.image for fr in generate_scan("crystallization", FRAMES, seed=7001)])
    np.save(tmp / "reference.npy", frames)
    base = tmp / "base"
    shutil.copytree(DEFAULT_BUNDLE, base)
    with np.load(DEFAULT_BUNDLE / "reference.npz") as z:
        np.savez(base / "reference.npz", **{k: z[k][:FRAMES] for k in z.files})
    manifest = json.loads((base / MANIFEST).read_text())
    kept = {k: v for k, v in manifest.items() if k not in ("files", "libraries")}
    write_manifest(base, kept | {"n_reference": FRAMES})
    out = tmp / "bundle"
    add_cluster_features(base, ckpt, tmp / "reference.npy", out, version="0.0.1-test")
    return out, ckpt, frames


def test_the_written_bundle_lists_the_feature_graph_and_keeps_the_encoder_and_map(written) -> None:
    out, _, _ = written
    m = json.loads((out / "manifest.json").read_text())
    assert m["clustering"]["features"] == FEATURES_ONNX and FEATURES_ONNX in m["files"]
    assert m["clustering"]["feature_dim"] == 8 * 8
    assert m["clustering"]["features_parity_relative_error"] < 1e-4
    assert "history" not in m["clustering"]["embedding"]["settings"]  # provenance, not the loss curve
    for name in ("encoder.onnx", "projector.onnx", "umap.joblib"):
        assert (out / name).read_bytes() == (DEFAULT_BUNDLE / name).read_bytes()
    with np.load(out / "reference.npz") as new, np.load(DEFAULT_BUNDLE / "reference.npz") as base:
        np.testing.assert_array_equal(new["embedding"], base["embedding"][:FRAMES])  # the map's points stay
        assert len(new["clusters"]) == FRAMES


def test_the_clusterer_gets_the_embedding_of_the_preprocessed_frame(written) -> None:
    out, ckpt, frames = written
    bundle = ModelBundle.load(out)
    x = bundle.preprocessor.batch(list(frames[:3]))
    latents, features = bundle.encode(x)
    base_latents = ModelBundle.load(DEFAULT_BUNDLE).encoder.encode(x)
    np.testing.assert_allclose(latents, base_latents, rtol=0, atol=1e-6)  # the encoder is the base's
    assert features.shape == (3, 64)
    blocks = x[:, 0].reshape(3, 128, 4, 128, 4)
    embedding = Embedding.load(ckpt)
    channels = [getattr(blocks, op)((2, 4)) for op in embedding.pool]  # the pooling it was trained on
    with torch.no_grad():
        expected = embedding.net.features(torch.from_numpy(np.stack(channels, axis=1))).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features, embedding(x[:, 0]), rtol=1e-4, atol=1e-5)
    if "max" in embedding.pool:
        with pytest.raises(ValueError, match="unpooled"):  # its maxima cannot be recovered from block means
            embedding(blocks.mean((2, 4)))
    z = bundle.clustering_state.reduce(features)  # the fitted state lives in the features' space
    assert z.shape[1] == bundle.clustering_state.centers.shape[1]


def test_every_compute_path_hands_the_clusterer_the_same_features(written) -> None:
    out, _, frames = written
    host = FrameCompute(out, device="cpu", max_batch=4, device_preprocess="off").compute([0, 1], list(frames[:2]))
    fused = FrameCompute(out, device="cpu", max_batch=4, device_preprocess="on").compute([0, 1], list(frames[:2]))
    for h, f in zip(host, fused, strict=True):
        assert h.features is not None and h.features.shape == (64,)
        np.testing.assert_allclose(f.features, h.features, rtol=1e-4, atol=1e-5)



def test_frames_other_than_the_maps_reference_are_refused(written, tmp_path: Path) -> None:
    out, ckpt, frames = written
    np.save(tmp_path / "fewer.npy", frames[: FRAMES - 2])
    with pytest.raises(ValueError, match="not the frames it was fitted on"):
        add_cluster_features(out, ckpt, tmp_path / "fewer.npy", tmp_path / "b", version="x")
    assert not (tmp_path / "b").exists()
