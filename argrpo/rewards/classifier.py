"""Classifier reward: log-probability of the requested class under the judge's classifier.

Log-probabilities rather than probabilities keep the signal alive where it matters most: a sample
the classifier finds hopeless (p ~ 1e-6) still scores differently from a nearly-hopeless one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from argrpo.classifier import load_classifier


class ClassifierReward:
    def __init__(self, model_or_path: nn.Module | str | Path, device: str | torch.device | None = None,
                 batch_size: int = 256):
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            model = load_classifier(model_or_path)
        if device is not None:
            model = model.to(device)
        self.model = model.eval().requires_grad_(False)  # eval: BatchNorm must use its running statistics
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1], labels [N] -> log p(label | image) [N] float32."""
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, images.shape[0], self.batch_size):
            logits = self.model(images[start : start + self.batch_size].to(device)).float()  # [n, C]
            y = labels[start : start + self.batch_size].to(device)
            scores.append(logits.log_softmax(-1).gather(-1, y[:, None])[:, 0])
        return self.shape(torch.cat(scores)).to(images.device)

    def shape(self, logp: torch.Tensor) -> torch.Tensor:
        return logp


class ClassifierProbReward(ClassifierReward):
    """p(label | image) rather than its log: bounded, so a hopeless sample cannot dominate a group's spread,
    and the reward keeps separating clear samples from merely recognisable ones."""

    def shape(self, logp: torch.Tensor) -> torch.Tensor:
        return logp.exp()
