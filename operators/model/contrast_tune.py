"""Fine-tune the encoder alone so that a new feature moves its latent more than any drift within a phase.

    python -m operators.model.contrast_tune --init runs/recovered/last.pt --data data/metric/img_s11 \
        [--data data/metric/img_s12] --out runs/contrast [--steps 1500] [--anchor-weight 50] [--resume]

Data: image caches of `operators.model.metric_data --images`: broad sibling groups (a state and the same state
plus one feature, each seen twice under drift, on several detector grids with the beam anywhere) and the
project's training pairs. A step takes `groups` broad groups and `project` project pairs; the loss is
- InfoNCE on the unit sphere (the clustering compares L2-normalised latents): each view must pick its partner
  out of the batch, whose other pairs include its sibling (the same state plus or minus one feature, the hard
  negative); project pairs of one training phase are not each other's negatives;
- plus `anchor_weight` x the squared distance between each project frame's normalised latent and the one the
  starting encoder gives it: the project's scenarios keep the latents their map, reference clusters and
  settings were fitted on, while the broad frames are free to move.
Only the encoder is trained (its mean head): the decoder of the shipped model is not in the bundle
(operators.model.recover). Checkpoints (`last.pt` every `--ckpt-every` steps) hold the model, optimiser, step
and the data's names; `--resume` continues a run where it stopped, so a long run can span several sittings.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


@dataclass
class TuneSettings:
    init: str
    data: list[str]
    out: str
    steps: int = 1500
    groups: int = 3  # broad groups a step: 4 frames each
    project: int = 4  # project pairs a step: 2 frames each
    lr: float = 5e-5
    temperature: float = 0.1
    anchor_weight: float = 50.0
    seed: int = 0
    ckpt_every: int = 50
    threads: int | None = None
    resume: bool = False


@dataclass(frozen=True)
class ImagePairs:
    broad: np.ndarray  # (G, 2, 2, S, S) uint8 memmap (`pooled`: (G, 2, 2, C, S, S) float16 in memory)
    project: np.ndarray  # (N, 2, S, S) uint8 memmap
    project_phase: np.ndarray  # (N,)

    @classmethod
    def load(cls, stem: str | Path) -> ImagePairs:
        stem = Path(stem)
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
            phases = z["project_phase"]
        return cls(np.load(stem.with_suffix(".broad.npy"), mmap_mode="r"),
                   np.load(stem.with_suffix(".project.npy"), mmap_mode="r"), phases)

    def pooled(self, factor: int, ops: tuple[str, ...] = ("mean",), chunk: int = 100) -> ImagePairs:
        """The same pairs pooled over factor x factor blocks, one channel per op ("mean", "max"), in memory
        (float16, still 0-255; the channel axis is the third last)."""
        def pool(a: np.ndarray) -> np.ndarray:
            parts = []
            for i in range(0, len(a), chunk):
                x = np.asarray(a[i:i + chunk], np.float32)
                s = x.shape[-1] // factor
                blocks = x.reshape(*x.shape[:-2], s, factor, s, factor)
                parts.append(np.stack([getattr(blocks, op)((-1, -3)) for op in ops], axis=-3).astype(np.float16))
            return np.concatenate(parts)

        return ImagePairs(pool(self.broad), pool(self.project), self.project_phase)


def draw_pairs(rng: np.random.Generator, sets: list[ImagePairs], groups: int,
               project: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`groups` broad groups and `project` project pairs of one set: (frames (2P, C, S, S) float32, first views
    then second views, C = 1 unless the set is `pooled` into channels; pair labels (P,), project pairs of one
    phase sharing theirs; where project pairs start)."""
    data = sets[int(rng.integers(len(sets)))]
    g = np.sort(rng.choice(len(data.broad), groups, replace=False))
    p = np.sort(rng.choice(len(data.project), project, replace=False))
    frame_shape = data.project.shape[2:]  # (S, S) or, pooled, (C, S, S)
    broad = data.broad[g].reshape(-1, 2, *frame_shape)  # (2G, 2, ...): state, sibling, ...
    pairs = np.concatenate([broad, data.project[p]])
    frames = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.float32) / 255.0
    if frames.ndim == 3:
        frames = frames[:, None]
    labels = np.concatenate([np.arange(len(broad)), len(broad) + data.project_phase[p]])
    return frames, labels, len(broad)


def pair_contrast(mu, labels, temperature: float):
    """InfoNCE on the unit sphere: each view picks its partner; views with the same label are not negatives."""
    import torch
    import torch.nn.functional as F

    n = len(labels)
    z = F.normalize(mu, dim=1)
    sim = z @ z.T / temperature
    lab = torch.cat([labels, labels])
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    same = lab[:, None] == lab[None, :]
    not_negative = same.clone()
    not_negative[torch.arange(2 * n), partner] = False  # the partner stays: it is the target
    return F.cross_entropy(sim.masked_fill(not_negative, -torch.inf), partner)


def tune(s: TuneSettings) -> Path:
    import torch
    import torch.nn.functional as F

    from operators.model.train import load_model

    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    model = load_model(s.init)
    teacher = load_model(s.init).encoder.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    enc = model.encoder.train()
    opt = torch.optim.AdamW(enc.parameters(), lr=s.lr, weight_decay=0.0)
    step, history = 0, []
    if s.resume and ckpt.is_file():
        ck = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history = ck["step"], ck["extra"].get("history", [])
        log.info("resumed %s at step %d", ckpt, step)
    sets = [ImagePairs.load(d) for d in s.data]
    (out / "tune_settings.json").write_text(json.dumps(asdict(s), indent=1) + "\n")
    t0, logged = time.perf_counter(), step
    while step < s.steps:
        rng = np.random.default_rng([s.seed, step])  # a resumed run draws the batches it would have drawn
        frames, labels, first_project = draw_pairs(rng, sets, s.groups, s.project)
        x = torch.from_numpy(frames)
        mu = enc(x)[0]
        contrast = pair_contrast(mu, torch.from_numpy(labels), s.temperature)
        n = len(labels)
        proj = torch.cat([torch.arange(first_project, n), torch.arange(n + first_project, 2 * n)])
        with torch.no_grad():
            target = F.normalize(teacher(x[proj])[0], dim=1)
        anchor = (F.normalize(mu[proj], dim=1) - target).pow(2).sum(1).mean()
        loss = contrast + s.anchor_weight * anchor
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), "contrast": contrast.item(), "anchor": anchor.item()})
        if step % 10 == 0:
            now = time.perf_counter()
            log.info("step %d: contrast %.4f anchor %.5f (%.2f s/step)", step, contrast.item(), anchor.item(),
                     (now - t0) / (step - logged))
            t0, logged = now, step
        if step % s.ckpt_every == 0 or step == s.steps:
            _save(ckpt, model, opt, step, history, s)
    return ckpt


def _save(path: Path, model, opt, step: int, history: list[dict], s: TuneSettings) -> None:
    import torch

    tail = history[-50:]
    extra = {"history": history, "history_tail": [{"loss": np.mean([h["loss"] for h in tail]),
                                                   "contrast": np.mean([h["contrast"] for h in tail]),
                                                   "anchor": np.mean([h["anchor"] for h in tail])}],
             "decoder_trained": False, "tuned_from": s.init}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict(), "optimizer": opt.state_dict(),
                "step": step, "epoch": 0, "extra": extra}, tmp)
    tmp.replace(path)  # a run killed mid-save keeps its previous checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint to start from (operators.model.recover)")
    p.add_argument("--data", action="append", required=True, help="image pair stem (repeatable)")
    p.add_argument("--out", required=True)
    d = TuneSettings(init="", data=[], out="")
    for name in ("steps", "groups", "project", "lr", "temperature", "anchor_weight", "seed", "ckpt_every", "threads"):
        default = getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default) if default is not None else int,
                       default=default)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TuneSettings(**{k: v for k, v in vars(a).items()})
    print(tune(settings))


if __name__ == "__main__":
    main()
