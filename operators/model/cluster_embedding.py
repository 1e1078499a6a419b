"""A small contrastive embedding of a frame for the clustering: which state the sample is in, not how bright the
frame is or where its beam falls (issue 15). `operators.model.cluster_features` serves it in a bundle.

    python -m operators.model.cluster_embedding --data data/metric/img_s11 --data data/metric/img_s12 \
        --out runs/cluster_embedding [--pool mean+max] [--steps 4000] [--lr 2e-3] [--resume]
    python -m operators.model.clustering_bound --embedding runs/cluster_embedding/last.pt

The VAE's latent carries the map; trained on the project's generator, it keeps phases of families it never saw
close together (README, "Why the clusterer cannot close that gap alone"). This network is trained from scratch
on one task only: each frame must find its partner view in a batch of broad sibling groups (a state and the
same state plus one feature, each seen twice under drift, on several detector grids with the beam anywhere)
and project training pairs, as `contrast_tune` asks of the VAE's encoder. It sees the preprocessed frame pooled
to `size` x `size` (128: 4 x 4 blocks of the 512 frame), flipped at random (a scattering pattern is
centrosymmetric about its beam, so a flip keeps the state). `--pool mean+max` gives it each block's maximum
beside its mean: a Bragg spot a pixel or two wide, which the mean of 16 pixels all but hides, keeps its
height. About 0.25 s a step on 2 cores; checkpoints (`last.pt`) hold the model, optimiser, schedule and step;
`--stop-at N` ends a sitting at step N and `--resume` continues on the same batches and schedule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from operators.model.contrast_tune import ImagePairs, draw_pairs, pair_contrast

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


@dataclass
class EmbeddingSettings:
    data: list[str]
    out: str
    steps: int = 4000  # the whole run: the one-cycle schedule spans these
    stop_at: int | None = None  # stop after this step (one sitting's share of a long run; --resume goes on)
    lr: float = 2e-3  # peak of a one-cycle schedule
    groups: int = 16  # broad groups a step: 4 frames each
    project: int = 8  # project pairs a step: 2 frames each
    width: int = 16  # channels of the first stage (doubling to 8 x width)
    size: int = 128  # input side: the 512 frame pooled over (512 / size)^2 blocks
    pool: str = "mean"  # what each block gives: "mean" or "mean+max" (one input channel each)
    dim: int = 128  # output of the projection head the loss sees
    temperature: float = 0.1
    weight_decay: float = 1e-4
    seed: int = 0
    ckpt_every: int = 250
    threads: int | None = None
    resume: bool = False
    history: list[float] = field(default_factory=list, repr=False)


class EmbeddingNet(nn.Module):
    """Five stride-2 stages of two 3x3 convolutions (GroupNorm, GELU), global average pool, a projection head.

    `features` (8 x width, pooled) is the embedding the clustering is scored on; the head serves the loss only,
    as in SimCLR, so the features keep what the loss would otherwise throw away late."""

    def __init__(self, width: int = 16, dim: int = 128, in_channels: int = 1) -> None:
        super().__init__()
        channels = [in_channels, width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(channels):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(8 * width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        x = x[..., ::-1]
    if rng.random() < 0.5:
        x = x[..., ::-1, :]
    return np.ascontiguousarray(x)


def train_embedding(s: EmbeddingSettings) -> Path:
    """Train (or, with `resume`, go on training) and return the checkpoint's path."""
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    torch.manual_seed(s.seed)
    ops = pool_ops(s.pool)
    net = EmbeddingNet(s.width, s.dim, len(ops))
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps, pct_start=0.05)
    step = 0
    if s.resume and ckpt.is_file():
        ck = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, s.history = ck["step"], ck["settings"]["history"]
        log.info("resumed %s at step %d", ckpt, step)
    sets = []
    for stem in s.data:
        pairs = ImagePairs.load(stem)
        sets.append(pairs.pooled(pairs.broad.shape[-1] // s.size, ops))
    net.train()
    t0, logged = time.perf_counter(), step
    last = min(s.steps, s.stop_at or s.steps)
    while step < last:
        rng = np.random.default_rng([s.seed, step])  # a resumed run draws the batches it would have drawn
        frames, labels, _ = draw_pairs(rng, sets, s.groups, s.project)
        loss = pair_contrast(net(torch.from_numpy(_flip(frames, rng))), torch.from_numpy(labels), s.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        s.history.append(float(loss.item()))
        if step % 50 == 0:
            now = time.perf_counter()
            log.info("step %d: contrast %.4f (%.2f s/step)", step, np.mean(s.history[-50:]),
                     (now - t0) / (step - logged))
            t0, logged = now, step
        if step % s.ckpt_every == 0 or step == last:
            _save(ckpt, net, opt, sched, step, s)
    return ckpt


def _save(path: Path, net: EmbeddingNet, opt, sched, step: int, s: EmbeddingSettings) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "settings": asdict(s)}, tmp)
    tmp.replace(path)  # a run killed mid-save keeps its previous checkpoint


def pool_ops(pool: str) -> tuple[str, ...]:
    """"mean+max" -> ("mean", "max"): the input channels, in order."""
    ops = tuple(pool.split("+"))
    if not ops or set(ops) - {"mean", "max"} or len(set(ops)) != len(ops):
        raise ValueError(f"pool must be 'mean', 'max' or 'mean+max', got {pool!r}")
    return ops


@dataclass(frozen=True)
class Embedding:
    """A trained embedding, ready to embed preprocessed frames."""

    net: EmbeddingNet
    size: int
    pool: tuple[str, ...] = ("mean",)

    @classmethod
    def load(cls, checkpoint: str | Path) -> Embedding:
        ck = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        s = ck["settings"]
        ops = pool_ops(s.get("pool", "mean"))
        net = EmbeddingNet(s["width"], s["dim"], len(ops))
        net.load_state_dict(ck["model"])
        return cls(net.eval(), s["size"], ops)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, S, S) preprocessed frames, S a multiple of `size` -> (B, 8 x width): the served computation."""
        factor = x.shape[-1] // self.size
        pools = {"mean": nn.functional.avg_pool2d, "max": nn.functional.max_pool2d}
        return self.net.features(torch.cat([pools[op](x, factor) for op in self.pool], dim=1))

    def __call__(self, frames: np.ndarray, batch: int = 64) -> np.ndarray:
        """(n, S, S) preprocessed frames in [0, 1] -> (n, 8 x width) features. S is the bundle's input size or,
        for a mean-only embedding, frames already averaged down to `size`."""
        x = np.asarray(frames, np.float32)
        if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[-1] % self.size:
            raise ValueError(f"frames must be (n, S, S) with S a multiple of {self.size}, got {x.shape}")
        if x.shape[-1] == self.size and self.pool != ("mean",):
            raise ValueError(f"a {'+'.join(self.pool)} embedding needs the unpooled preprocessed frames")
        with torch.no_grad():
            return np.concatenate([self.features(torch.from_numpy(x[i:i + batch, None])).numpy()
                                   for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="image pair stem (repeatable)")
    p.add_argument("--out", required=True)
    d = EmbeddingSettings(data=[], out="")
    for name in ("steps", "stop_at", "lr", "groups", "project", "width", "size", "pool", "dim", "temperature",
                 "weight_decay", "seed", "ckpt_every", "threads"):
        default = getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default) if default is not None else int,
                       default=default)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = EmbeddingSettings(**vars(a))
    path = train_embedding(settings)
    print(json.dumps({"checkpoint": str(path), "steps": settings.steps,
                      "contrast_last_50": float(np.mean(settings.history[-50:]))}))


if __name__ == "__main__":
    main()
