"""The attention-based convolutional VAE of the paper (section 2.1), in two sizes from one definition.

Encoder: an optional patchifying stem, then `depth` stages of strided 3x3 convolution (stride 2), each
followed by residual conv blocks and, where the stage asks for it, Swin-style windowed self-attention
blocks (alternating plain and shifted windows). The final feature map is flattened and mapped by two
fully connected heads to the mean and log-variance of a diagonal Gaussian. The decoder mirrors it with
transposed convolutions and the same attention blocks. The latent used downstream is the mean.

All reshapes use Python ints computed from the config (never from tensor shapes) so the graph exports
to ONNX with static spatial shapes; the cyclic shift is written as slice + concat instead of torch.roll.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CVAEConfig:
    """Architecture hyper-parameters. `depth` counts the stride-2 stages after the stem."""

    name: str
    input_size: int = 512
    in_channels: int = 1
    stem_stride: int = 1  # 1: a 3x3 conv keeps 512x512; 4: a 4x4/stride-4 patchify conv (lite)
    stem_channels: int = 32
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    res_blocks: tuple[int, ...] = (1, 1, 1, 1, 1)  # residual conv blocks after each strided conv
    attn_blocks: tuple[int, ...] = (0, 0, 2, 2, 2)  # windowed attention blocks after each stage
    window: int = 8
    heads: int = 8
    mlp_ratio: float = 2.0
    head_channels: int | None = None  # 1x1 conv before flattening (keeps the lite FC heads small)
    latent_dim: int = 512
    beta: float = 0.5
    extra: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def final_size(self) -> int:
        return self.input_size // (self.stem_stride * 2**self.depth)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["res_blocks"] = list(self.res_blocks)
        d["attn_blocks"] = list(self.attn_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CVAEConfig:
        d = dict(d)
        for key in ("channels", "res_blocks", "attn_blocks"):
            d[key] = tuple(d[key])
        return cls(**d)


# `paper`: ~123M parameters like the paper's model (most of them in the FC heads on a 16x16x256 map).
# `lite`: a stride-4 stem, narrow stages and a 1x1 reduction before the heads, so one 512x512 frame
# encodes in a few ms on a 2-core CPU and the encoder (~2M parameters) is small enough to ship.
CONFIGS: dict[str, CVAEConfig] = {
    "paper": CVAEConfig(
        name="paper",
        stem_stride=1,
        stem_channels=32,
        channels=(64, 128, 256, 384, 224),
        res_blocks=(1, 1, 2, 2, 2),
        attn_blocks=(0, 0, 2, 2, 2),
        window=8,
        heads=8,
    ),
    "lite": CVAEConfig(
        name="lite",
        stem_stride=4,
        stem_channels=16,
        channels=(24, 48, 96, 128, 128),
        res_blocks=(0, 1, 1, 1, 1),
        attn_blocks=(0, 0, 1, 2, 2),
        window=8,
        heads=4,
        head_channels=32,
    ),
}


def get_config(name: str) -> CVAEConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown C-VAE config {name!r}; choose one of {sorted(CONFIGS)}") from None


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class WindowAttentionBlock(nn.Module):
    """Pre-norm transformer block with self-attention inside non-overlapping w x w windows.

    `shift` > 0 cyclically shifts the map by shift pixels first (Swin), with an attention mask that keeps
    tokens from attending across the wrap-around seam. The spatial size is fixed at construction.
    """

    def __init__(self, dim: int, size: int, window: int, heads: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = min(window, size)
        if size % self.window:
            raise ValueError(f"feature map {size} not divisible by window {self.window}")
        self.size = size
        self.shift = shift if self.window < size else 0
        self.heads = heads
        self.dim = dim
        self.head_dim = dim // heads
        if self.head_dim * heads != dim:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.scale = self.head_dim**-0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        n = self.window * self.window
        # learned relative position bias, one table per head (Swin)
        self.rel_bias = nn.Parameter(torch.zeros(heads, (2 * self.window - 1) ** 2))
        coords = torch.stack(
            torch.meshgrid(torch.arange(self.window), torch.arange(self.window), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (self.window - 1)
        self.register_buffer("rel_index", (rel[..., 0] * (2 * self.window - 1) + rel[..., 1]).reshape(n * n), False)
        self.register_buffer("attn_mask", self._shift_mask(), False)

    def _shift_mask(self) -> Tensor:
        nw = (self.size // self.window) ** 2
        n = self.window * self.window
        if not self.shift:
            return torch.zeros(nw, n, n)
        img = torch.zeros(self.size, self.size)
        cnt = 0
        bounds = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        for hs in bounds:
            for ws in bounds:
                img[hs, ws] = cnt
                cnt += 1
        win = self._partition(img[None, :, :, None]).squeeze(-1)  # (nW, N)
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))

    def _partition(self, x: Tensor) -> Tensor:
        # (B, S, S, C) -> (B * nW, w*w, C) with static ints only
        b = x.shape[0]
        s, w, c = self.size, self.window, x.shape[-1]
        x = x.reshape(b, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, w * w, c)

    def _merge(self, x: Tensor, b: int) -> Tensor:
        s, w = self.size, self.window
        x = x.reshape(b, s // w, s // w, w, w, self.dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, s, s, self.dim)

    def _roll(self, x: Tensor, k: int) -> Tensor:
        # cyclic shift along H and W by k (negative = towards the origin), as slice + concat
        k = k % self.size
        x = torch.cat([x[:, k:], x[:, :k]], dim=1)
        return torch.cat([x[:, :, k:], x[:, :, :k]], dim=2)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        t = x.permute(0, 2, 3, 1)  # (B, S, S, C)
        h = self.norm1(t)
        if self.shift:
            h = self._roll(h, self.shift)
        win = self._partition(h)  # (B*nW, N, C)
        n = self.window * self.window
        nw = (self.size // self.window) ** 2
        qkv = self.qkv(win).reshape(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        bias = self.rel_bias[:, self.rel_index].reshape(self.heads, n, n)
        attn = attn + bias[None]
        attn = attn.reshape(-1, nw, self.heads, n, n) + self.attn_mask[None, :, None]
        attn = attn.reshape(-1, self.heads, n, n).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, self.dim)
        out = self._merge(self.proj(out), b)
        if self.shift:
            out = self._roll(out, -self.shift)
        t = t + out
        t = t + self.mlp(self.norm2(t))
        return t.permute(0, 3, 1, 2)


def _attn_stack(dim: int, size: int, cfg: CVAEConfig, count: int) -> list[nn.Module]:
    w = min(cfg.window, size)
    heads = cfg.heads
    while dim % heads:
        heads //= 2
    return [
        WindowAttentionBlock(dim, size, w, heads, shift=(w // 2 if i % 2 else 0), mlp_ratio=cfg.mlp_ratio)
        for i in range(count)
    ]


class Encoder(nn.Module):
    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        s = cfg.input_size
        if cfg.stem_stride == 1:
            self.stem = nn.Conv2d(cfg.in_channels, cfg.stem_channels, 3, padding=1)
        else:
            self.stem = nn.Conv2d(cfg.in_channels, cfg.stem_channels, cfg.stem_stride, stride=cfg.stem_stride)
        s //= cfg.stem_stride
        layers: list[nn.Module] = []
        c_in = cfg.stem_channels
        for c, nres, nattn in zip(cfg.channels, cfg.res_blocks, cfg.attn_blocks, strict=True):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
            s //= 2
            layers += [ResBlock(c) for _ in range(nres)]
            layers += _attn_stack(c, s, cfg, nattn)
            c_in = c
        if cfg.head_channels:
            layers += [nn.Conv2d(c_in, cfg.head_channels, 1), nn.SiLU()]
            c_in = cfg.head_channels
        self.body = nn.Sequential(*layers)
        flat = c_in * s * s
        self.fc_mu = nn.Linear(flat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(flat, cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(F.silu(self.stem(x))).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.c0 = cfg.head_channels or cfg.channels[-1]
        self.s0 = cfg.final_size
        self.fc = nn.Linear(cfg.latent_dim, self.c0 * self.s0 * self.s0)
        self.expand = nn.Conv2d(self.c0, cfg.channels[-1], 1) if cfg.head_channels else nn.Identity()
        layers: list[nn.Module] = []
        s = self.s0
        chans = list(cfg.channels[::-1]) + [cfg.stem_channels]
        for i, (nres, nattn) in enumerate(zip(cfg.res_blocks[::-1], cfg.attn_blocks[::-1], strict=True)):
            c, c_out = chans[i], chans[i + 1]
            layers += _attn_stack(c, s, cfg, nattn)
            layers += [ResBlock(c) for _ in range(nres)]
            layers += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), nn.GroupNorm(_groups(c_out), c_out)]
            layers += [nn.SiLU()]
            s *= 2
        self.body = nn.Sequential(*layers)
        if cfg.stem_stride == 1:
            self.head = nn.Conv2d(cfg.stem_channels, cfg.in_channels, 3, padding=1)
        else:
            self.head = nn.ConvTranspose2d(
                cfg.stem_channels, cfg.in_channels, cfg.stem_stride, stride=cfg.stem_stride
            )

    def forward(self, z: Tensor) -> Tensor:
        h = self.expand(self.fc(z).reshape(-1, self.c0, self.s0, self.s0))
        return self.head(self.body(h))  # logits; sigmoid gives the [0, 1] image


class CVAE(nn.Module):
    """forward(x) -> (reconstruction logits, mu, logvar). `encode_mean` is what serving exports."""

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        if cfg.input_size % (cfg.stem_stride * 2**cfg.depth):
            raise ValueError(f"input {cfg.input_size} not divisible by total stride")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x)
        z = self.reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def encode_mean(self, x: Tensor) -> Tensor:
        return self.encoder(x)[0]


class MeanEncoder(nn.Module):
    """The exported serving graph: (B, 1, S, S) float32 -> (B, latent_dim) latent means."""

    def __init__(self, model: CVAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)[0]


def vae_loss(
    logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float, weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """beta-VAE loss per image: summed BCE over valid pixels + beta * KL; returns (total, recon, kl) means."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    if weight is not None:
        bce = bce * weight
    recon = bce.flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    total = recon + beta * kl
    return total.mean(), recon.mean(), kl.mean()


def view_contrast_loss(mu: Tensor, temperature: float) -> Tensor:
    """InfoNCE between two views of each sample: rows i and B + i of `mu` (2B, D) are one sample's views.

    On the unit sphere (the clustering compares L2-normalised latents), each view must pick its partner
    out of the other 2B - 2 latents of the batch. Training with it makes the latent invariant to what
    differs between the views (feature amplitudes, flux, beam jitter, defects, noise) while the
    reconstruction keeps everything the views share."""
    n = mu.shape[0] // 2
    z = F.normalize(mu, dim=1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=mu.device), -torch.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(mu.device)
    return F.cross_entropy(sim, partner)


def build(name_or_cfg: str | CVAEConfig) -> CVAE:
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    return CVAE(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

