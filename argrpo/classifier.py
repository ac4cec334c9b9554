"""The embedded judge: a small digit CNN that scores generated images and supplies their features.

Trained by the pipeline on scikit-learn's digits upscaled to RGB; it plays the roles Inception and
an ImageNet classifier play at full scale (classifier reward, FID / IS / precision-recall features).
Training adds small shifts and noise so that it stays reliable on generated images, which are
never pixel-perfect copies of the training digits.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from argrpo.config import Bool, Float, Int, require


@dataclass(frozen=True)
class JudgeConfig:
    """The `judge` section: the embedded reward classifier and the independent evaluation network."""

    reward_seed: Int = 1
    eval_seed: Int = 2
    epochs: Int = 8
    batch_size: Int = 64
    lr: Float = 2e-3
    eval_holdout_fraction: Float = 0.3
    enabled: Bool = True  # false at real scale, where Inception and the reward files judge

    def __post_init__(self) -> None:
        require(self.reward_seed != self.eval_seed, "eval_seed", "must differ from reward_seed", self.eval_seed)
        require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(self.lr > 0, "lr", "must be > 0", self.lr)
        require(0 < self.eval_holdout_fraction < 1, "eval_holdout_fraction", "must be in (0, 1)",
                self.eval_holdout_fraction)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitClassifier(nn.Module):
    """A conv at full resolution, two at half, one at quarter, average-pooled to `feat_dim`.

    Deliberately shallow at full resolution, where convolutions cost most, so that training on CPU
    takes seconds. Works for any square input whose side is a multiple of 4 and at least 8 pixels.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, feat_dim: int = 64):
        super().__init__()
        require(num_classes >= 2, "classifier.num_classes", "must be >= 2", num_classes)
        require(width >= 1, "classifier.width", "must be >= 1", width)
        require(feat_dim >= 1, "classifier.feat_dim", "must be >= 1", feat_dim)
        self.config = {"num_classes": num_classes, "width": width, "feat_dim": feat_dim}
        self.body = nn.Sequential(
            _conv_block(3, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, feat_dim),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features: images [N, 3, H, W] in [-1, 1] -> [N, feat_dim]."""
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 8 or shape[2] % 4:
            raise ValueError(f"images must be [N, 3, H, H] with H a multiple of 4 >= 8, got {shape}")
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(images))


def _augment(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 2, max_noise: float = 0.1
) -> torch.Tensor:
    """Shift each image by up to `max_shift` px (edges replicated) and add Gaussian noise of a
    random strength up to `max_noise`."""
    n, _, h, w = images.shape  # images: [N, 3, H, W]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(3)[None, :, None, None]
    shifted = padded[batch, channel, rows, cols]
    strength = max_noise * torch.rand(n, 1, 1, 1, generator=generator)
    noise = strength * torch.randn(shifted.shape, generator=generator)
    return (shifted + noise).clamp(-1.0, 1.0)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    augment: bool = True,
    progress: bool = False,
    num_classes: int = 10,
    width: int = 32,
    feat_dim: int = 64,
) -> DigitClassifier:
    """Train a DigitClassifier with Adam (cosine-decayed learning rate) on images [N, 3, H, W] in
    [-1, 1] and labels [N].

    Deterministic for a given seed on CPU; the global torch RNG is left untouched.
    """
    require(epochs >= 1, "epochs", "must be >= 1", epochs)
    require(batch_size >= 1, "batch_size", "must be >= 1", batch_size)
    require(lr > 0, "lr", "must be > 0", lr)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be [N, 3, H, W] and labels [N], got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    images, labels = images.float().cpu(), labels.long().cpu()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter initialisation draws from the global RNG
        model = DigitClassifier(num_classes=num_classes, width=width, feat_dim=feat_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = epochs * math.ceil(images.shape[0] / batch_size)
    # decaying to zero settles the weights; a constant rate leaves the last epoch's accuracy noisy
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    model.train()
    for _ in tqdm(range(epochs), desc="judge", disable=not progress):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            idx = order[start : start + batch_size]
            x = _augment(images[idx], generator) if augment else images[idx]
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of `model` (run in eval mode) on images [N, 3, H, W] and labels [N]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / images.shape[0]


def save_classifier(path: str | Path, model: DigitClassifier) -> None:
    """Write {"model": state_dict, "config": {...}} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt")
    os.close(fd)
    try:
        torch.save({"model": state, "config": dict(model.config)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild a DigitClassifier from a file written by `save_classifier`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitClassifier(**checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
