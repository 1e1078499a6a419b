"""Learn the clustering's reduction from latent pairs: a linear map in which a phase's drift is small and a new
feature is large.

    python -m operators.model.fit_reduction --pairs data/metric/train_s1.npz --val data/metric/val_s2.npz \
        --out data/metric/reduction.npz [--dims 32] [--steps 3000] [--temperature 0.1]

The clusterer measures distances in a reduction of the L2-normalised latent (operators.clustering). PCA keeps the
directions the reference frames vary most in, and on runs the model never saw those are drift: flux, background,
a lattice breathing by a per cent. The encoder's latent does hold the features that tell phases apart (a linear
probe separates them), they are only small. This learns the reduction instead: W (d x D) from the PCA start,
trained with a contrastive loss on pairs (operators.model.metric_data) of one phase seen twice under drift
(pulled together) against every other pair in the batch (pushed apart), including each broad state's sibling,
the same state plus one feature (the hard negative). Logits are negative squared distances in the reduced space
over their batch mean, so the loss is blind to W's scale and the clusterer's Euclidean geometry is what is
trained. Project pairs of one training phase are not pushed apart from each other: a phase at another progress
is still that phase.

The result is a (mean, components) pair with the shape PCA gives, so the serving path does not change.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from operators.projection import l2_normalise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReductionSettings:
    dims: int = 32
    steps: int = 3000
    groups_per_batch: int = 32  # broad groups: 2 pairs each (a state and its sibling)
    project_per_batch: int = 64
    temperature: float = 0.1
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class PairLatents:
    broad: np.ndarray  # (G, 2, 2, D): group, state / sibling, view
    project: np.ndarray  # (N, 2, D): pair, view
    project_phase: np.ndarray  # (N,)

    @classmethod
    def load(cls, path: str | Path) -> PairLatents:
        with np.load(path, allow_pickle=False) as z:
            return cls(l2_normalise(z["broad"]), l2_normalise(z["project"]), z["project_phase"])

    def all_latents(self) -> np.ndarray:
        d = self.broad.shape[-1]
        return np.concatenate([self.broad.reshape(-1, d), self.project.reshape(-1, d)])


@dataclass(frozen=True)
class PairScores:
    """How a reduction treats held-back pairs: ratios of a drifted view's distance to other things' distances."""

    sibling_over_view: float  # median over broad groups of d(state, sibling) / d(view, view); higher is better
    retrieval: float  # fraction of views whose nearest other view in their batch is their own pair's


def pca_start(x: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=dims, random_state=seed).fit(x)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def _batch(rng: np.random.Generator, data: PairLatents, s: ReductionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(views a, views b, group label per pair: pairs with one label are not negatives of each other)."""
    g = rng.choice(len(data.broad), s.groups_per_batch, replace=False)
    p = rng.choice(len(data.project), s.project_per_batch, replace=False)
    broad = data.broad[g].reshape(-1, 2, data.broad.shape[-1])  # (2G, 2, D): state, sibling, state, ...
    a = np.concatenate([broad[:, 0], data.project[p, 0]])
    b = np.concatenate([broad[:, 1], data.project[p, 1]])
    # every broad pair is its own label; project pairs share their training phase's label
    labels = np.concatenate([np.arange(len(broad)), len(broad) + data.project_phase[p]])
    return a, b, labels


def learn_reduction(data: PairLatents, settings: ReductionSettings) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (d, D)) learned from ``data``'s pairs (see module doc)."""
    import torch

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    mean, start = pca_start(data.all_latents(), settings.dims, settings.seed)
    w = torch.nn.Parameter(torch.from_numpy(start.copy()))
    m = torch.from_numpy(mean)
    opt = torch.optim.Adam([w], lr=settings.lr)
    for step in range(settings.steps):
        a, b, labels = (torch.from_numpy(v) for v in _batch(rng, data, settings))
        za, zb = (a - m) @ w.T, (b - m) @ w.T
        d2 = torch.cdist(za, zb).pow(2)
        logits = -d2 / (settings.temperature * d2.mean())
        same = labels[:, None] == labels[None, :]
        positive = torch.eye(len(labels), dtype=torch.bool)
        logits = logits.masked_fill(same & ~positive, float("-inf"))  # same phase elsewhere: not a negative
        target = torch.arange(len(labels))
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                      + torch.nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the scale is free: keep it where PCA had it
            w.mul_(float(np.linalg.norm(start)) / w.norm())
        if step % 500 == 0 or step == settings.steps - 1:
            log.info("step %d: contrastive loss %.4f", step, loss.item())
    return mean, w.detach().numpy().astype(np.float32)


def score_pairs(data: PairLatents, mean: np.ndarray, components: np.ndarray, *, batch: int = 64,
                seed: int = 0) -> PairScores:
    def reduce(x: np.ndarray) -> np.ndarray:
        return (x - mean) @ components.T

    zb = reduce(data.broad)  # (G, 2, 2, d)
    view = np.linalg.norm(zb[:, :, 0] - zb[:, :, 1], axis=-1).mean(1)
    sibling = np.linalg.norm(zb[:, 0].mean(1) - zb[:, 1].mean(1), axis=-1)
    rng = np.random.default_rng(seed)
    pairs = np.concatenate([zb.reshape(-1, 2, zb.shape[-1]), reduce(data.project)])
    hits = total = 0
    for _ in range(20):
        idx = rng.choice(len(pairs), min(batch, len(pairs)), replace=False)
        a, b = pairs[idx, 0], pairs[idx, 1]
        d = np.linalg.norm(a[:, None] - b[None], axis=-1)
        hits += int((d.argmin(1) == np.arange(len(idx))).sum())
        total += len(idx)
    return PairScores(float(np.median(sibling / np.maximum(view, 1e-12))), hits / total)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="training pairs (operators.model.metric_data)")
    p.add_argument("--val", default=None, help="held-back pairs of another seed, scored before and after")
    p.add_argument("--out", required=True)
    d = ReductionSettings()
    for f, v in asdict(d).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ReductionSettings(**{f: getattr(a, f) for f in asdict(d)})
    data = PairLatents.load(a.pairs)
    mean, comps = learn_reduction(data, settings)
    report: dict = {"settings": asdict(settings), "pairs": str(a.pairs)}
    if a.val:
        val = PairLatents.load(a.val)
        report["val_pca"] = asdict(score_pairs(val, *pca_start(data.all_latents(), settings.dims, settings.seed)))
        report["val_learned"] = asdict(score_pairs(val, mean, comps))
    np.savez(a.out, mean=mean, components=comps)
    Path(a.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
