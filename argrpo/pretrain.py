"""Pretraining for the embedded defaults: the tokenizer on images, then the transformer on its codes.

`train_vq` trains LlamaGen's VQ and VAR's multi-scale VQVAE alike (both return reconstruction, codebook
and commitment losses). The transformers: `train_gpt` (LlamaGen class-to-image, class dropout),
`train_caption_gpt` (LlamaGen text-to-image on prompts that ask for each image's class, caption dropout)
and `train_var` (next-scale prediction, class dropout), all so that classifier-free guidance works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from argrpo.config import Float, Int, require
from argrpo.gpt import GPT
from argrpo.msvq import MSVQVAE
from argrpo.text import PromptFeatures
from argrpo.var import VAR, next_scale_loss
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


def train_vq(vq: VQModel | MSVQVAE, images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
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


def fit_prior(net: torch.nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, cfg: TrainConfig,
              generator: torch.Generator, log: Logger | None, progress: bool, desc: str) -> torch.nn.Module:
    """AdamW with cosine learning rate and gradient clipping 1.0 on `batch_loss(indices [B])`, indices drawn
    from range(n) with `generator`."""
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    net.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        loss = batch_loss(torch.randint(n, (cfg.batch_size,), generator=generator))
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log(step, {f"{desc}/loss": loss.item()})
    return net.eval()


def train_caption_gpt(gpt: GPT, codes: torch.Tensor, labels: torch.Tensor, captions: PromptFeatures,
                      caption_classes: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
                      log: Logger | None = None, progress: bool = True) -> GPT:
    """A text-to-image GPT on codes [N, T] of images of class labels [N]: each image is paired, afresh every
    step, with a random prompt of `captions` whose class (`caption_classes` [P]) is the image's, and the
    caption is dropped to the null caption with class_dropout_prob."""
    by_class = {int(c): torch.nonzero(caption_classes == c).flatten() for c in labels.unique()}
    empty = [c for c, ids in by_class.items() if not len(ids)]
    if empty:
        raise ValueError(f"no prompt asks for class {empty[0]}; every class of the images needs one")
    L = gpt.config.cls_token_num

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x, y = codes[idx], labels[idx]
        pick = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (), generator=generator)]
                            for c in y])  # a prompt id per image
        features, mask = captions.lookup(pick, x.device)  # [B, L, D], [B, L]
        logits = gpt(x[:, :-1], features, drop_labels=True, cond_mask=mask)[:, L - 1 :]  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), x.flatten())

    return fit_prior(gpt, batch_loss, len(codes), cfg, generator, log, progress, "gpt")


def train_var(net: VAR, tokenizer: MSVQVAE, codes: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator, log: Logger | None = None, progress: bool = True) -> VAR:
    """VAR on the multi-scale codes [N, L] of images of class labels [N] (next-scale cross-entropy of every
    token, labels dropped to the null class with cond_drop_rate)."""

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return next_scale_loss(net, tokenizer, labels[idx], codes[idx], drop_labels=True)

    return fit_prior(net, batch_loss, len(codes), cfg, generator, log, progress, "var")


@torch.no_grad()
def encode_all(vq: VQModel | MSVQVAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """images [N, 3, H, W] -> codes [N, T] in raster order (multi-scale: the scales concatenated)."""
    return torch.cat([vq.encode(images[i : i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])
