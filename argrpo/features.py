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
REWARD_NETWORKS = ("same", "torchvision_inception")


@dataclass(frozen=True)
class RefStatsConfig:
    """The `ref_stats` section: which network's features the metrics and LOO-FID use."""

    features: str = "classifier"  # classifier (embedded judge networks) | inception (weights.inception)
    # LOO-FID's features: "same" as above (the reward classifier's with classifier), or the LOO-FID paper's
    # torchvision Inception-v3 (weights.reward_inception)
    reward_features: str = "same"
    batch_size: Int = 256

    def __post_init__(self) -> None:
        require(self.features in FEATURE_NETWORKS, "features", f"must be one of {', '.join(FEATURE_NETWORKS)}",
                self.features)
        require(self.reward_features in REWARD_NETWORKS, "reward_features",
                f"must be one of {', '.join(REWARD_NETWORKS)}", self.reward_features)
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionInceptionFeatures:
    """The LOO-FID paper's reward features: torchvision's Inception-v3 (its IMAGENET1K_V1 weights, read from
    a local file) avgpool output [N, 2048], after that code's preprocessing: images quantised to 8 bits
    (truncating, as its uint8 conversion does), a bilinear antialiased resize to 299, ImageNet mean/std,
    no `transform_input`.

    This is not the FID Inception (argrpo/inception.py, which evaluates); `ref_stats.reward_features:
    torchvision_inception` makes LOO-FID score with it, as the paper does.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64):
        from torchvision.models.inception import Inception3

        from argrpo.checkpoints import load_into, read_state_dict

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
        load_into(model, read_state_dict(path), f"torchvision Inception-v3 weights {path}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = torch.device(device), batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] -> the network's input [N, 3, 299, 299]."""
        x = torch.floor((images.float().to(self.device) * 0.5 + 0.5).clamp(0, 1) * 255.0) / 255.0
        if x.shape[-2:] != (299, 299):
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False,
                                                antialias=True)
        return (x - self.mean) / self.std

    def _pool_and_logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        hook = self.model.avgpool.register_forward_hook(lambda _m, _i, out: pooled.append(out.flatten(1)))
        try:
            logits = self.model(self.network_input(x))
        finally:
            hook.remove()
        return torch.cat([pooled[0], logits.softmax(-1)], dim=1)  # [n, 2048 + 1000]

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([self._pool_and_logits(images[i : i + self.batch_size]).to(images.device)
                          for i in range(0, images.shape[0], self.batch_size)]).float()
        return both[:, :2048], both[:, 2048:]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[0]

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[1]
