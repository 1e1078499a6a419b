"""The model bundle: the shipped default loads and serves; tampering and version drift are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.bundle import (
    DEFAULT_BUNDLE,
    MANIFEST,
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleVersionError,
    ModelBundle,
    read_manifest,
    sha256_file,
    write_manifest,
)
from stream.detector import PILATUS3_2M


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load()


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_default_bundle_serves_one_frame_through_the_runtime_api(bundle: ModelBundle) -> None:
    frame = np.random.default_rng(0).poisson(5, PILATUS3_2M.shape).astype(np.int32)
    x = bundle.preprocessor(frame)
    assert x.shape == (1, bundle.input_size, bundle.input_size) and x.dtype == np.float32
    z = bundle.encoder.encode(x[None])
    assert z.shape == (1, bundle.latent_dim) == (1, 512) and z.dtype == np.float32
    xy = bundle.projector.project(z)
    assert xy.shape == (1, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    _, features = bundle.encode(x[None])
    a = bundle.new_clusterer().learn_predict_one(features[0])
    assert isinstance(a.cluster, int) and np.isfinite(a.novelty)
    assert bundle.autoencoder_model.count(":") == 1 and bundle.dimred_model.count(":") == 1
    n = len(bundle.reference_embedding)
    assert bundle.reference_embedding.shape == (n, 2) and bundle.reference_clusters.shape == (n,)
    assert set(np.unique(bundle.reference_clusters)) == set(range(bundle.clustering_state.centers.shape[0]))


def test_batched_encode_matches_one_frame_at_a_time(bundle: ModelBundle) -> None:
    rng = np.random.default_rng(1)
    batch = rng.random((3, 1, bundle.input_size, bundle.input_size), dtype=np.float32)
    together = bundle.encoder.encode(batch)
    alone = np.concatenate([bundle.encoder.encode(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_manifest_records_preprocessing_checksums_and_pinned_versions() -> None:
    m = read_manifest(DEFAULT_BUNDLE)
    assert m["input_shape"] == [1, 1, 512, 512] and m["latent_dim"] == 512
    assert m["preprocessing"]["aspect"] == "pad"
    for lib in ("umap-learn", "numba", "pynndescent", "onnxruntime", "scikit-learn"):
        assert m["libraries"][lib]["version"]
    listed = set(m["files"])
    on_disk = {p.name for p in DEFAULT_BUNDLE.iterdir() if p.is_file() and p.name != MANIFEST}
    assert listed == on_disk
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    assert m["projection"]["settings"]["n_neighbors"] == 30 and m["projection"]["settings"]["metric"] == "cosine"


def test_default_bundle_is_small_enough_to_ship() -> None:
    total = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir() if p.is_file())
    assert total < 20e6


@pytest.mark.parametrize("name", ["encoder.onnx", "cluster_features.onnx", "projector.onnx", "clustering.npz",
                                  "umap.joblib"])
def test_a_tampered_file_is_refused_naming_it(copy: Path, name: str) -> None:
    with open(copy / name, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleIntegrityError, match=name):
        ModelBundle.load(copy)


def test_a_missing_or_unlisted_file_is_refused(copy: Path) -> None:
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleIntegrityError, match="extra.bin"):
        ModelBundle.load(copy)
    (copy / "extra.bin").unlink()
    (copy / "reference.npz").unlink()
    with pytest.raises(BundleIntegrityError, match="reference.npz.*missing"):
        ModelBundle.load(copy)


def test_an_onnxruntime_older_than_the_bundle_needs_is_refused(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["libraries"]["onnxruntime"].update(version="99.0.0"))
    with pytest.raises(BundleVersionError, match=r"encoder\.onnx.*onnxruntime>=99\.0\.0"):
        ModelBundle.load(copy)


def test_a_umap_version_mismatch_is_refused_before_unpickling(copy: Path) -> None:
    # the pickle is replaced by garbage with a valid checksum: the version check must fire first
    (copy / "umap.joblib").write_bytes(b"not a pickle")
    write_manifest(copy, {k: v for k, v in read_manifest(copy).items()
                          if k not in ("libraries", "files", "created", "format")})
    _edit_manifest(copy, lambda m: m["libraries"]["umap-learn"].update(version="0.4.0"))
    with pytest.raises(BundleVersionError, match=r"umap\.joblib.*umap-learn==0\.4\.0"):
        ModelBundle.load(copy, projection="umap")
    ModelBundle.load(copy)  # the approximator path does not depend on the pickle


def test_not_a_bundle_gives_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError, match="manifest.json"):
        ModelBundle.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        ModelBundle.load(tmp_path)


def test_bundle_round_trips_through_write_manifest_and_load(copy: Path, bundle: ModelBundle) -> None:
    m = read_manifest(copy)
    write_manifest(copy, {k: v for k, v in m.items() if k not in ("libraries", "files", "created", "format")})
    again = ModelBundle.load(copy)
    assert again.autoencoder_model == bundle.autoencoder_model
    x = np.random.default_rng(2).random((1, 1, 512, 512), dtype=np.float32)
    np.testing.assert_array_equal(again.encoder.encode(x), bundle.encoder.encode(x))
    np.testing.assert_array_equal(again.reference_embedding, bundle.reference_embedding)


def test_unknown_runtime_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="runtime"):
        ModelBundle.load(runtime="tensorrt")


def _list_outside_file(copy: Path, outside: Path) -> str:
    """List the encoder under the name `outside` (the file there is the true encoder, with its sha256) and
    point the manifest's ONNX encoder at it; returns the name."""
    rel = outside.as_posix()
    m = json.loads((copy / MANIFEST).read_text())
    entry = m["files"].pop(m["encoder"]["onnx"])
    m["files"][rel] = entry
    m["encoder"]["onnx"] = rel
    (copy / MANIFEST).write_text(json.dumps(m))
    return rel


@pytest.mark.parametrize("how", ["absolute", "dot-dot"])
def test_a_manifest_naming_a_file_outside_the_bundle_is_refused_before_any_file_is_read(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    outside = tmp_path / "elsewhere" / "encoder.onnx"
    outside.parent.mkdir()
    (copy / "encoder.onnx").rename(outside)
    rel = _list_outside_file(copy, outside if how == "absolute" else Path("../elsewhere/encoder.onnx"))
    hashed: list[Path] = []

    def recording_sha256(path: Path) -> str:
        hashed.append(path)
        return sha256_file(path)

    monkeypatch.setattr("operators.bundle.sha256_file", recording_sha256)
    with pytest.raises(BundleIntegrityError, match=f"{re.escape(repr(rel))}.*inside the bundle"):
        ModelBundle.load(copy)
    assert hashed == []


def test_a_bundle_file_that_is_a_symlink_out_of_the_bundle_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    (copy / "encoder.onnx").rename(outside)
    (copy / "encoder.onnx").symlink_to(outside)  # same bytes, same sha256: only where it lives is wrong
    with pytest.raises(BundleIntegrityError, match=r"'encoder\.onnx' resolves to .*outside the bundle"):
        ModelBundle.load(copy)
