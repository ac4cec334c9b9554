"""Aesthetic reward: LAION's "improved aesthetic predictor" on the CLIP ViT-L/14 image embedding.

The predictor is a small MLP, Linear(768, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2)
-> Linear(128, 64) -> Dropout(0.1) -> Linear(64, 16) -> Linear(16, 1), with no activations between the
layers, applied to the L2-normalised image embedding of OpenAI's CLIP ViT-L/14. Its released
checkpoint `sac+logos+ava1-l14-linearMSE.pth` is a bare state dict with keys `layers.{0,2,4,6,7}.weight`
and `.bias`; scores land roughly on the 1-10 scale of the ratings it was fitted to.

Both files are local: the predictor is read with `weights_only=True`, CLIP is an open_clip
architecture loaded from its own file (OpenAI's weights: use `ViT-L-14-quickgelu`). The score ignores
the requested condition: it rates the image alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.checkpoints import load_into, read_state_dict
from argrpo.rewards.clip import build_open_clip, clip_pixels


class AestheticMLP(nn.Module):
    """The predictor head; `embed_dim` is the CLIP embedding width (768 for ViT-L/14)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)[:, 0]  # [N]


def load_aesthetic_mlp(path: str, embed_dim: int = 768) -> AestheticMLP:
    """The predictor from its bare state dict file; a missing file or a misfit names the file and keys."""
    return load_into(AestheticMLP(embed_dim), read_state_dict(path), f"aesthetic predictor {path}").eval()


class AestheticReward:
    """reward(images [N, 3, H, W] in [-1, 1], conditions [N]) -> aesthetic score [N] (conditions unused).

    `weights`: the predictor file (sac+logos+ava1-l14-linearMSE.pth); `clip_weights`: a local open_clip
    checkpoint for `clip_model`, empty for random CLIP weights (tests only).
    """

    def __init__(
        self,
        weights: str,
        clip_weights: str | None,
        clip_model: str = "ViT-L-14-quickgelu",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        clip = build_open_clip(clip_model, clip_weights, model_kwargs)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        size = self.clip.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mlp = load_aesthetic_mlp(weights, self.clip.visual.output_dim).to(self.device).requires_grad_(False)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings [N, D] of images [N, 3, H, W] in [-1, 1]."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = clip_pixels(images[start : start + self.batch_size].to(self.device), self.image_size)
            chunks.append(F.normalize(self.clip.encode_image(x).float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or conditions.shape != images.shape[:1]:
            raise ValueError(f"expected images [N, 3, H, W] and conditions [N], got {tuple(images.shape)} "
                             f"and {tuple(conditions.shape)}")
        scores = self.mlp(self.image_embeddings(images))  # scores: [N]
        return scores.float().to(images.device)
