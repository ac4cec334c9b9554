"""Pretraining for the embedded default: the VQ tokenizer on images, then the GPT on its codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from argrpo.config import Float, Int, require
from argrpo.gpt import GPT
from argrpo.vq import VQModel

Logger = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: Int = 1000
    batch_size: Int = 64
    lr: Float = 1e-3
    weight_decay: Float = 0.0
    log_every: Int = 50

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1", self.steps)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(self.lr > 0, "lr", "must be > 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        require(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain` section: the embedded default's tokenizer and GPT training."""

    seed: Int = 0
    vq: TrainConfig = field(default_factory=TrainConfig)
    gpt: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", "must be >= 0", self.seed)


def cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / max(1, total - warmup))).item())


def train_vq(vq: VQModel, images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
             log: Logger | None = None, progress: bool = True) -> VQModel:
    """Reconstruction (L1 + MSE) + codebook + commitment losses; images [N, 3, H, W] in [-1, 1]."""
    opt = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    vq.train()
    bar = tqdm(range(cfg.steps), desc="vq", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        x = images[idx]
        recon, codebook_loss, commit_loss = vq(x)
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + codebook_loss + commit_loss
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            stats = {"vq/loss": loss.item(), "vq/recon": rec.item(), "vq/codebook": codebook_loss.item(),
                     "vq/commit": commit_loss.item()}
            bar.set_postfix(recon=f"{rec.item():.4f}")
            if log:
                log(step, stats)
    return vq.eval()


def train_gpt(gpt: GPT, codes: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
              log: Logger | None = None, progress: bool = True) -> GPT:
    """Next-token cross-entropy on codes [N, T] with class dropout (labels -> null class)."""
    opt = torch.optim.AdamW(gpt.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gpt.train()
    bar = tqdm(range(cfg.steps), desc="gpt", disable=not progress)
    for step in bar:
        idx = torch.randint(len(codes), (cfg.batch_size,), generator=generator)
        x, y = codes[idx], labels[idx]
        logits = gpt(x[:, :-1], y, drop_labels=True)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log(step, {"gpt/loss": loss.item()})
    return gpt.eval()


@torch.no_grad()
def encode_all(vq: VQModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """images [N, 3, H, W] -> codes [N, T] in raster order."""
    return torch.cat([vq.encode(images[i : i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])
