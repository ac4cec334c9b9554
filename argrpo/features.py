"""Feature extractors: the networks whose features and class probabilities feed the metrics.

Every extractor follows `FeatureExtractor`; FID, precision / recall, IS and the LOO-FID reward
only ever see this interface, so the embedded digit judge and Inception are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from argrpo.classifier import DigitClassifier
from argrpo.config import Int, require

FEATURE_NETWORKS = ("classifier", "inception")


@dataclass(frozen=True)
class RefStatsConfig:
    """The `ref_stats` section: which network's features the metrics and LOO-FID use."""

    features: str = "classifier"  # classifier (embedded judge networks) | inception (weights.inception)
    batch_size: Int = 256

    def __post_init__(self) -> None:
        require(self.features in FEATURE_NETWORKS, "features", f"must be one of {', '.join(FEATURE_NETWORKS)}",
                self.features)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Pooled features and class probabilities of images [N, 3, H, W] in [-1, 1].

    Both methods run under no_grad, batch internally and return float32 tensors on the device of
    `images`.
    """

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, F] (FID, precision / recall, LOO-FID)."""
        ...

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities [N, C] (Inception Score)."""
        ...

    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both of the above from one pass of the network."""
        ...


class ClassifierFeatures:
    """The digit judge as a feature extractor: its pooled penultimate features and its softmax.

    The model is put in eval mode, frozen and moved to `device`.
    """

    def __init__(self, model: DigitClassifier, batch_size: int = 256, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        outputs = [
            fn(images[start : start + self.batch_size].to(self.device, torch.float32)).to(images.device)
            for start in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(outputs).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(images, self.model.features)  # features: [N, feat_dim]

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(images, lambda x: self.model(x).softmax(dim=1))  # probs: [N, num_classes]

    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self._batched(images, self._features_then_probs)  # [N, feat_dim + num_classes]
        return both[:, : self.model.config["feat_dim"]], both[:, self.model.config["feat_dim"] :]

    def _features_then_probs(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)
        return torch.cat([f, self.model.head(f).softmax(dim=1)], dim=1)


def extract(
    extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, F] and class probabilities [N, C] as float32 numpy arrays.

    `images` is one tensor [N, 3, H, W] or an iterable of such batches (e.g. a generator sampling
    them lazily), so large sample sets never need to sit in memory as images at once.
    """
    if isinstance(images, torch.Tensor):
        batches: Iterable[torch.Tensor] = images.split(batch_size)
    else:
        batches = images
    features, probs = [], []
    for batch in batches:
        f, p = extractor.features_and_probs(batch)
        features.append(f.cpu().numpy().astype(np.float32))
        probs.append(p.cpu().numpy().astype(np.float32))
    if not features:
        raise ValueError("extract got no images")
    return np.concatenate(features), np.concatenate(probs)
