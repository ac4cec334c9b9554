"""CLIP reward: cosine similarity between an image and the prompt of its requested class.

The model is an open_clip architecture loaded from a local weights file (never a download tag).
Text features of every class prompt are computed once at construction; scoring a batch then costs
one image-encoder pass. Images arrive in [-1, 1] and are brought to the model's input the way
open_clip's own preprocessing does (bicubic resize of the shorter side, centre crop, CLIP mean/std),
but on tensors, so a batch never round-trips through PIL.

OpenAI's CLIP weights use QuickGELU: pair them with the `-quickgelu` model name (for example
`ViT-L-14-quickgelu`), since a local file carries no tag from which open_clip could infer it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from argrpo.imagenet import DEFAULT_TEMPLATE, class_prompts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_open_clip(model_name: str, weights: str | None, model_kwargs: dict[str, Any] | None = None):
    """An open_clip model `model_name`, loaded from the local file `weights` (random when empty).

    `model_kwargs` override the architecture config (tests shrink `vision_cfg` / `text_cfg`).
    """
    import open_clip

    if weights and not os.path.isfile(weights):
        # open_clip would otherwise treat an unknown string as a download tag
        raise FileNotFoundError(f"CLIP weights not found: {weights}")
    return open_clip.create_model(model_name, pretrained=weights or None, **(model_kwargs or {}))


def clip_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> CLIP input [N, 3, *size], normalised with CLIP mean/std."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    # resize the shorter side to the target and centre-crop, as open_clip's Resize + CenterCrop
    scale = max(size[0] / h, size[1] / w)
    resized = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    if resized != (h, w):
        x = F.interpolate(x, size=resized, mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    x = x[..., top : top + size[0], left : left + size[1]]
    # bicubic overshoots; PIL clamps to the pixel range, so do the same
    x = x.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipReward:
    """reward(images [N, 3, H, W] in [-1, 1], labels [N]) -> cosine(image, prompt of label) [N].

    `weights` is a local open_clip checkpoint for `model_name`; empty builds the architecture with
    random weights (tests only).
    """

    def __init__(
        self,
        model_name: str,
        weights: str | None,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        model_kwargs: dict[str, Any] | None = None,
    ):
        model = build_open_clip(model_name, weights, model_kwargs)
        self._setup(model, model_name, class_names, template, device, batch_size)

    def _setup(
        self,
        model: torch.nn.Module,
        model_name: str,
        class_names: Sequence[str],
        template: str,
        device: str | torch.device,
        batch_size: int,
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not class_names:
            raise ValueError("class_names must not be empty")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = model.to(self.device).eval().requires_grad_(False)
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)
        self.prompts = class_prompts(class_names, template)
        self.text_features = self._encode_prompts(tokenizer)  # text_features: [C, D], unit norm

    @torch.no_grad()
    def _encode_prompts(self, tokenizer) -> torch.Tensor:
        chunks = []
        for start in range(0, len(self.prompts), self.batch_size):
            tokens = tokenizer(self.prompts[start : start + self.batch_size]).to(self.device)
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features [N, D] of images [N, 3, H, W] in [-1, 1]."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = clip_pixels(images[start : start + self.batch_size].to(self.device), self.image_size)
            chunks.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(chunks)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected images [N, 3, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        num_classes = self.text_features.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        image_features = self.image_features(images)  # [N, D]
        text_features = self.text_features[labels.to(self.device)]  # [N, D]
        scores = (image_features * text_features).sum(dim=-1)
        return scores.float().to(images.device)  # scores: [N]
