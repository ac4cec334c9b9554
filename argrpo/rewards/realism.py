"""Realism reward: how close an image's features come to real images, as a nearest-neighbour distance.

reward(x) = -d_k(f(x)), the distance from the image's features f(x) to the k-th nearest of the real
images' features (the train split's, through the reward-side network). An image the reward network sees
among real images scores near the real images' own spacing; one off the data manifold scores low.
It is a learned-metric realism judge for the embedded default, the role MANIQA, HPSv2 or a
vision-language realism judge play at real scale; it is the same kind of test precision makes, in
another network's feature space (the evaluation network's features never enter a reward).
"""

from __future__ import annotations

import torch

from argrpo.features import FeatureExtractor


class RealismReward:
    def __init__(self, extractor: FeatureExtractor, real_features: torch.Tensor, k: int = 3, chunk: int = 1024):
        if real_features.ndim != 2 or real_features.shape[0] <= k:
            raise ValueError(f"real_features must be [M, F] with M > k={k}, got {tuple(real_features.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.extractor, self.real, self.k, self.chunk = extractor, real_features.float(), k, chunk

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] -> -(distance to the k-th nearest real feature) [N] float32."""
        features = self.extractor.features(images).float().to(self.real.device)  # [N, F]
        kth = [torch.cdist(features[i : i + self.chunk], self.real).topk(self.k, dim=1, largest=False).values[:, -1]
               for i in range(0, features.shape[0], self.chunk)]
        return -torch.cat(kth).to(images.device)
