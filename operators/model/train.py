"""Train the C-VAE (paper section 2.2): Adam, cosine schedule, beta-VAE loss, AMP on CUDA, DDP under torchrun.

    python -m operators.model.train --data data/cache/train_s100 --config lite --epochs 10 --out runs/lite
    torchrun --nproc_per_node 4 -m operators.model.train --config paper ...   # DDP when WORLD_SIZE > 1

Checkpoints (`last.pt`, every `--ckpt-every` steps and at each epoch end) hold the model, optimiser,
scheduler, scaler, epoch and step; `--resume` continues from `last.pt` in the output directory, on its
original schedule. `--init-from CKPT` takes only the weights of another run and starts a fresh optimiser and
cosine schedule: how a model trained part-way is annealed to a low learning rate.

With a pair cache as `--data` (operators.model.data.build_pair_cache: two nuisance draws of each training
state), `--contrast-weight W` adds W x InfoNCE between the two views' latent means to the beta-VAE loss
(cvae.view_contrast_loss): the latent learns to ignore amplitude and flux drift. A batch of `--batch-size`
frames then holds batch-size / 2 pairs, each view mirrored independently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from operators.model.cvae import (
    CVAE,
    CVAEConfig,
    build,
    count_parameters,
    get_config,
    vae_loss,
    view_contrast_loss,
)
from operators.model.data import load_cache

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


@dataclass
class TrainSettings:
    data: str
    out: str
    config: str = "lite"
    epochs: int = 10
    batch_size: int = 16  # frames per step (with a pair cache: both views of batch_size / 2 pairs)
    lr: float = 1e-3
    schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.0
    beta: float | None = None  # default: the config's (0.5)
    kl_warmup_steps: int = 200  # beta ramps from 0 so the encoder learns structure before the prior bites
    seed: int = 0
    ckpt_every: int = 100
    max_steps: int | None = None
    max_minutes: float | None = None
    resume: bool = False
    init_from: str | None = None  # fine-tune: start from this checkpoint's weights with a fresh optimiser and schedule
    threads: int | None = None
    amp: bool = True  # only on CUDA
    contrast_weight: float = 0.0  # x InfoNCE between the views of a pair cache; 0 = plain beta-VAE
    contrast_temperature: float = 0.1
    contrast_batches: str = "mixed"  # or "scenario": every batch from one scenario (harder negatives)

    def to_argv(self) -> list[str]:
        """The command line of `python -m operators.model.train` that gives these settings (for torchrun)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default and f.name not in ("data", "out"):
                continue
            flag = f"--{f.name.replace('_', '-')}"
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            else:
                argv += [flag, str(value)]
        return argv


def _epoch_batches(
    rng: np.random.Generator, n: int, per_batch: int, rank: int, world: int, groups: np.ndarray | None
) -> list[np.ndarray]:
    """This rank's batches of one epoch (cache indices): a random order, disjoint shards across ranks.

    With `groups`, every batch is drawn from one group (the negatives of the contrastive term are then
    other states of the same scenario, not easy ones from another), in a random order of batches."""
    order = rng.permutation(n)
    if groups is None:
        mine = order[: n - n % world][rank::world]  # equal shards: every rank takes as many steps
        return [mine[i : i + per_batch] for i in range(0, len(mine) - per_batch + 1, per_batch)]
    batches = []
    for g in np.unique(groups):
        members = order[groups[order] == g]
        batches += [members[i : i + per_batch] for i in range(0, len(members) - per_batch + 1, per_batch)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[: len(batches) - len(batches) % world][rank::world]


def _dist_info() -> tuple[int, int, int]:
    # torchrun's contract: it tells each process its place by these variables, not by arguments.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def save_checkpoint(path: Path, model: CVAE, opt, sched, scaler, epoch: int, step: int, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": model.cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "extra": extra,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a crash mid-save never leaves a truncated checkpoint


def load_model(checkpoint: str | Path) -> CVAE:
    """Rebuild the model from a checkpoint (the config travels inside it)."""
    ck = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    model = CVAE(CVAEConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


def train(s: TrainSettings) -> Path:
    """Run training; returns the path of the final checkpoint."""
    world, rank, local = _dist_info()
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed + rank)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = load_cache(Path(s.data))
    if s.contrast_weight > 0 and cache.views != 2:
        raise ValueError(f"--contrast-weight needs a cache of training pairs; {s.data} holds single frames")
    if s.batch_size % cache.views:
        raise ValueError(f"batch size {s.batch_size} does not split into pairs of views")
    if s.contrast_batches not in ("mixed", "scenario") or (s.contrast_batches == "scenario" and cache.views != 2):
        raise ValueError(f"contrast batches {s.contrast_batches!r}: 'mixed', or 'scenario' with a pair cache")
    if s.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {s.schedule!r}; valid: cosine, constant")
    per_batch = s.batch_size // cache.views  # cache items (frames or pairs) per step
    cfg = get_config(s.config)
    beta = cfg.beta if s.beta is None else s.beta
    model = build(cfg).to(device)
    use_amp = s.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    groups = cache.scenarios if s.contrast_batches == "scenario" else None  # type: ignore[union-attr]
    steps_per_epoch = max(1, len(_epoch_batches(np.random.default_rng(0), len(cache), per_batch, 0, world, groups)))
    schedule = s.epochs * steps_per_epoch  # the cosine schedule spans all epochs ...
    total = min(schedule, s.max_steps) if s.max_steps else schedule  # ... max_steps only stops early
    if s.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, schedule), eta_min=s.lr * 0.02)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    epoch, step = 0, 0
    ck_path = out / CHECKPOINT
    if s.init_from and not (s.resume and ck_path.is_file()):
        ck = torch.load(str(s.init_from), map_location=device, weights_only=False)
        if CVAEConfig.from_dict(ck["config"]) != cfg:
            raise ValueError(f"{s.init_from} holds a different model configuration than {cfg.name!r}")
        model.load_state_dict(ck["model"])
        log.info("initialised from %s (its step %d); fresh optimiser and schedule", s.init_from, ck["step"])
    if s.resume and ck_path.is_file():
        ck = torch.load(str(ck_path), map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        epoch, step = ck["epoch"], ck["step"]
        log.info("resumed from %s at epoch %d step %d", ck_path, epoch, step)
    net = DDP(model, device_ids=[local] if device.type == "cuda" else None) if world > 1 else model
    if rank == 0:
        log.info("training %s (%.2fM params) on %d %s, %d steps, device %s, world %d", cfg.name,
                 count_parameters(model) / 1e6, len(cache), "pairs" if cache.views == 2 else "frames", total,
                 device, world)
        (out / "train_settings.json").write_text(json.dumps(s.__dict__, indent=2))
    t0 = time.monotonic()
    history: list[dict] = []
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=step, desc=f"train {cfg.name}", mininterval=10)
    done = step >= total
    while not done:
        rng = np.random.default_rng([s.seed, epoch])
        batches = _epoch_batches(rng, len(cache), per_batch, rank, world, groups)
        for idx in batches[step % steps_per_epoch :]:
            x = torch.from_numpy(cache.batch(idx)).to(device, non_blocking=True)
            # left-right mirror, each view on its own: same physics, a cheap augmentation
            x = torch.cat([torch.flip(v, dims=(3,)) if rng.uniform() < 0.5 else v for v in x.chunk(cache.views)])
            b = beta * min(1.0, (step + 1) / max(1, s.kl_warmup_steps))
            net.train()
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits, mu, logvar = net(x)
            loss, recon, kl = vae_loss(logits.float(), x, mu.float(), logvar.float(), b)
            contrast = view_contrast_loss(mu.float(), s.contrast_temperature) if cache.views == 2 else None
            if contrast is not None and s.contrast_weight > 0:
                loss = loss + s.contrast_weight * contrast
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
            sched.step()
            step += 1
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss became {loss_v} at step {step}")
            if rank == 0:
                rec = {"step": step, "epoch": epoch, "loss": loss_v, "recon": recon.item(),
                       "kl": kl.item(), "lr": sched.get_last_lr()[0]}
                if contrast is not None:
                    rec["contrast"] = contrast.item()
                history.append(rec)
                pbar.update(1)
                pbar.set_postfix(loss=f"{rec['loss']:.0f}", kl=f"{rec['kl']:.0f}")
                if step % s.ckpt_every == 0:
                    save_checkpoint(ck_path, model, opt, sched, scaler, epoch, step, {"history_tail": history[-5:]})
                    log.info("step %d epoch %d %s", step, epoch,
                             " ".join(f"{k} {rec[k]:.4g}" for k in ("loss", "recon", "kl", "contrast") if k in rec))
            elapsed_min = (time.monotonic() - t0) / 60
            if step >= total or (s.max_minutes and elapsed_min >= s.max_minutes):
                done = True
                break
        else:
            epoch += 1
    if rank == 0:
        pbar.close()
        save_checkpoint(ck_path, model, opt, sched, scaler, epoch, step, {"history_tail": history[-5:]})
        with open(out / "history.jsonl", "a") as f:
            for rec in history:
                f.write(json.dumps(rec) + "\n")
        log.info("training done: step %d, %.1f min, checkpoint %s", step, (time.monotonic() - t0) / 60, ck_path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ck_path


def parse_settings(argv: list[str] | None = None) -> TrainSettings:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, default in TrainSettings.__dataclass_fields__.items():
        typ = {"int": int, "float": float, "str": str, "bool": bool}.get(str(default.type).split(" ")[0], str)
        if f in ("data", "out"):
            p.add_argument(f"--{f}", required=True)
        elif default.type == "bool":
            p.add_argument(f"--{f.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default.default)
        elif f in ("beta", "max_minutes"):
            p.add_argument(f"--{f.replace('_', '-')}", type=float, default=None)
        elif f in ("max_steps", "threads"):
            p.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
        else:
            p.add_argument(f"--{f.replace('_', '-')}", type=typ, default=default.default)
    return TrainSettings(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(settings)


if __name__ == "__main__":
    main()
