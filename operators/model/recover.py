"""Recover a bundle's PyTorch encoder from its ONNX graph, for training on from what was shipped.

    python -m operators.model.recover --bundle operators/bundles/default --out runs/recovered/last.pt

Checkpoints live under runs/ and are not part of a clone; the bundle is. The dynamo exporter keeps most weights
under their module names. The rest it folds: GroupNorm affines become (C, 1, 1) constants, Linear weights are
stored transposed, and each attention block's relative position bias is stored already gathered per (query, key)
pair. Those are matched to the encoder's parameters in the order the graph first uses them (the forward order),
shape by shape, the bias table is scattered back from its gathered form, and the result must reproduce the ONNX
latents on random frames before it is written. The decoder is not in a bundle: it is freshly initialised and
the checkpoint says so (`extra.decoder_trained: false`); so is
the log-variance head, which a mean encoder's graph does not hold.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PARITY_RTOL = 1e-4


def _first_use(graph) -> dict[str, int]:
    order: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            order.setdefault(name, i)
    return order


def recover_encoder(bundle_dir: Path):
    """A CVAE whose encoder holds the bundle's ONNX weights (decoder fresh)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from operators.model.cvae import CVAEConfig, WindowAttentionBlock, build

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    model = build(CVAEConfig.from_dict(manifest["model"]["config"]))
    graph = onnx.load(str(bundle_dir / manifest["encoder"]["onnx"])).graph
    first = _first_use(graph)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = model.encoder.state_dict()
    # a block's bias table can also sit in the graph under its own name, unused (all zeros in the shipped
    # bundle): the gathered constant is what the graph computes with, so tables always come from there
    named = {k: "encoder." + k for k in state if "encoder." + k in inits and not k.endswith("rel_bias")}
    for k, onnx_name in named.items():
        state[k] = torch.from_numpy(inits[onnx_name].copy()).reshape(state[k].shape)
    unused = sorted((n for n in inits if n not in named.values()), key=lambda n: first.get(n, 1 << 30))
    rel_index = {name: m.rel_index for name, m in model.encoder.named_modules() if isinstance(m, WindowAttentionBlock)}
    # fc_logvar is not in a mean encoder's graph: it stays freshly initialised, like the decoder
    for k in [k for k in state if k not in named and not k.startswith("fc_logvar")]:
        want = state[k].shape
        block = k.rsplit(".", 1)[0]
        for n in unused:
            arr = inits[n]
            n2 = rel_index[block].numel() if k.endswith("rel_bias") else 0
            # gathered: (heads, N*N), or (1, heads, N, N) once unsqueezed (a shift mask can be (windows, N, N))
            if n2 and arr.shape in ((want[0], n2), (1, want[0], *(int(n2**0.5),) * 2)):
                table = torch.zeros(want)
                table[:, rel_index[block]] = torch.from_numpy(arr.reshape(want[0], -1).copy())
            elif len(want) == 1 and arr.shape == (want[0], 1, 1):  # GroupNorm weight / bias
                table = torch.from_numpy(arr.reshape(want).copy())
            elif len(want) == 2 and arr.shape == (want[1], want[0]):  # Linear weight, stored transposed
                table = torch.from_numpy(arr.T.copy())
            else:
                continue
            state[k] = table
            unused.remove(n)
            break
        else:
            raise ValueError(f"no weight in the ONNX graph matches encoder parameter {k} {tuple(want)}")
    model.encoder.load_state_dict(state)
    return model.eval(), manifest


def check_parity(model, bundle_dir: Path, manifest: dict, *, seed: int = 0) -> float:
    """max |torch - onnx| / max |onnx| of the latent means on random frames."""
    import onnxruntime as ort
    import torch

    s = manifest["input_shape"][-1]
    x = np.random.default_rng(seed).random((2, 1, s, s), dtype=np.float32)
    sess = ort.InferenceSession(str(bundle_dir / manifest["encoder"]["onnx"]), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = model.encode_mean(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(Path(__file__).resolve().parents[1] / "bundles" / "default"))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = Path(a.bundle)
    model, manifest = recover_encoder(bundle)
    err = check_parity(model, bundle, manifest)
    if not err <= PARITY_RTOL:
        raise SystemExit(f"recovered encoder differs from {bundle}'s ONNX graph by {err:.2e} (> {PARITY_RTOL})")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict(), "step": 0, "epoch": 0,
                "extra": {"recovered_from": f"{manifest['name']}:{manifest['version']}", "decoder_trained": False,
                          "parity_relative_error": err}}, out)
    log.info("recovered %s:%s encoder (parity %.1e) -> %s", manifest["name"], manifest["version"], err, out)


if __name__ == "__main__":
    main()
