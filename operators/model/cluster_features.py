"""Give a bundle the cluster embedding as its clustering's input: export it, refit the clustering on it, write.

    python -m operators.model.cluster_features --bundle operators/bundles/default \
        --embedding runs/cluster_embedding/last.pt --reference data/cache/train_s100 --out DIR [--version V]

The embedding (operators.model.cluster_embedding) is exported as `cluster_features.onnx`: the preprocessed frame
(B, 1, S, S) in, the 4 x 4 block pooling it was trained on (mean, or mean and max) taken inside the graph,
(B, feature_dim) out. The bundle's reference frames (the ones its map was fitted on: same cache, count and seed)
are encoded through that ONNX graph (the serving path, not PyTorch), the clustering is refitted on their
features and the reference points take the new clusters; encoder, map and reference positions are copied
unchanged. The manifest's `clustering.features` names the graph; `ModelBundle.encode` then gives the clusterer
its output instead of the latent.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from operators.bundle import FEATURES_ONNX, ModelBundle, OnnxEncoder, default_session_options, write_manifest
from operators.clustering import ClusteringSettings, fit_clustering
from operators.model.cluster_embedding import Embedding
from operators.model.export import OPSET, _quiet_export, relative_error
from operators.model.fit import encode_all, load_reference

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "cluster_features"


class _PooledFeatures(nn.Module):
    """The served graph: the preprocessed frame pooled down to the embedding's size, then its features."""

    def __init__(self, embedding: Embedding, input_size: int) -> None:
        super().__init__()
        if input_size % embedding.size:
            raise ValueError(f"a {input_size} frame does not pool evenly to the embedding's {embedding.size}")
        self.embedding = embedding
        self.net = embedding.net  # registered, so that export sees the weights as the module's

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding.features(x)


def export_features(embedding: Embedding, input_size: int, path: Path) -> float:
    """Write the ONNX graph; returns its relative error against PyTorch on random frames."""
    module = _PooledFeatures(embedding, input_size).eval()
    example = torch.rand(2, 1, input_size, input_size)
    _quiet_export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  dynamo=True, opset_version=OPSET, external_data=False,
                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    x = torch.rand(3, 1, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x).numpy()
    got = OnnxEncoder(path, session_options=default_session_options(), device="cpu").encode(x.numpy())
    return relative_error(got, want)


def add_cluster_features(base_dir: str | Path, checkpoint: str | Path, reference: str | Path, out: str | Path, *,
                         version: str, settings: ClusteringSettings | None = None) -> dict[str, Any]:
    """Write `out`: `base_dir`'s bundle with the embedding served as the clustering's input (see module doc)."""
    base = ModelBundle.load(base_dir)
    manifest = copy.deepcopy(base.manifest)
    settings = settings or base.clustering_settings
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_rel, reference_rel = manifest["clustering"]["state"], manifest["reference"]
    work = Path(tempfile.mkdtemp(prefix=".features-", dir=out.parent))
    try:
        for rel in manifest["files"]:
            if rel not in (state_rel, reference_rel):
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base.path / rel, work / rel)
        parity = export_features(Embedding.load(checkpoint), base.input_size, work / FEATURES_ONNX)
        features_graph = OnnxEncoder(work / FEATURES_ONNX, session_options=default_session_options(), device="cpu")
        # the frames the map was fitted on: `fit` draws n_reference of the cache with seed 0
        images, _ = load_reference(reference, manifest.get("n_reference"), 0, base.preprocess_spec)
        features = encode_all(features_graph, images)
        state, clusters = fit_clustering(features, settings)
        state.save(work / state_rel)
        with np.load(base.path / reference_rel, allow_pickle=False) as z:
            kept = {k: z[k] for k in z.files if k != "clusters"}
            if len(z["embedding"]) != len(clusters):
                raise ValueError(f"{reference}: {len(clusters)} frames, but the bundle's map has "
                                 f"{len(z['embedding'])} reference points: not the frames it was fitted on")
        np.savez(work / reference_rel, **kept, clusters=clusters)
        for key in ("format", "created", "libraries", "files"):
            manifest.pop(key, None)
        manifest["version"] = version
        manifest["description"] = (f"{base.autoencoder_model}'s encoder and map; clusters in a contrastive "
                                   "embedding of the frame (issue 15)")
        manifest["clustering"] = {
            **manifest["clustering"],
            "settings": settings.to_dict(),
            "features": FEATURES_ONNX,
            "feature_dim": int(features.shape[1]),
            "features_parity_relative_error": parity,
            "reference_clusters": len(state.centers),
            "method": "HDBSCAN on PCA of L2-normalised cluster-embedding features; online stable-id assignment",
            "embedding": _provenance(checkpoint),
        }
        write_manifest(work, manifest)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        out.chmod(0o755)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    ModelBundle.load(out)  # what was written must load and verify
    log.info("bundle %s: clustering on %d-d features, %d reference clusters (parity %.2e)", out,
             features.shape[1], len(state.centers), parity)
    return manifest["clustering"]


def _provenance(checkpoint: str | Path) -> dict[str, Any]:
    """What the embedding was trained with and for how long (its loss history stays in the checkpoint)."""
    ck = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    settings = {k: v for k, v in ck["settings"].items() if k != "history"}
    return {"checkpoint": Path(checkpoint).name, "step": int(ck["step"]), "settings": settings}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle whose encoder and map are kept")
    p.add_argument("--embedding", required=True, help="a cluster_embedding checkpoint (last.pt)")
    p.add_argument("--reference", required=True, help="the frame cache the bundle's map was fitted on")
    p.add_argument("--out", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--settings", help="JSON of clustering settings replacing the bundle's")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ClusteringSettings.from_dict(json.loads(a.settings)) if a.settings else None
    clustering = add_cluster_features(a.bundle, a.embedding, a.reference, a.out, version=a.version,
                                      settings=settings)
    print(json.dumps({k: v for k, v in clustering.items() if k != "embedding"}, indent=1))


if __name__ == "__main__":
    main()
