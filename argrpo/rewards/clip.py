"""CLIP reward: cosine similarity between an image and the prompt of its condition.

The prompt of condition id i is either `template` filled with class name i (class-conditional
models) or the explicit prompt i of a prompt set (`prompts=`, text-to-image models).
The model is an open_clip architecture loaded from a local weights file (never a download tag).
Text features of every prompt are computed once at construction; scoring a batch then costs
one image-encoder pass.

AR-GRPO's CLIP and HPSv2 rewards come in two forms: 5 x cosine (`scale=5.0`) and a quantised form
(`quantize=True`, `quantize_scores`): cosine < 0 -> -1, [0, 0.3) -> 0.5, [0.3, 0.6) -> 1,
[0.6, 1] -> 1.5. `variant` gives the other form over the same loaded model.

Images arrive in [-1, 1] and are brought to the model's input the way open_clip's own preprocessing
does (bicubic resize of the shorter side, centre crop, CLIP mean/std), but on tensors, so a batch
never round-trips through PIL.

OpenAI's CLIP weights use QuickGELU: pair them with the `-quickgelu` model name (for example
`ViT-L-14-quickgelu`), since a local file carries no tag from which open_clip could infer it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from argrpo.imagenet import DEFAULT_TEMPLATE, class_prompts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# AR-GRPO's quantised CLIP / HPSv2 reward: bin edges of the cosine and the reward below, inside and above them
QUANTIZE_EDGES = (0.0, 0.3, 0.6, 1.0)
QUANTIZE_VALUES = (-1.0, 0.5, 1.0, 1.5)


def quantize_scores(scores: torch.Tensor, edges: Sequence[float] = QUANTIZE_EDGES,
                    values: Sequence[float] = QUANTIZE_VALUES) -> torch.Tensor:
    """AR-GRPO's discrete reward map of scores [N]: below edges[0] -> values[0]; in [edges[i], edges[i+1])
    -> values[i + 1]; at or above the last edge -> values[-1]. NaN stays NaN.

    With the default edges a cosine of exactly 1 has no bin in AR-GRPO's code (its lookup runs past the
    end of its value list); here it takes the top value, 1.5, like the bin below it.
    """
    if len(values) != len(edges):
        raise ValueError(f"need one value per edge ({len(edges)}), got {len(values)}")
    if any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"edges must increase, got {tuple(edges)}")
    # compared in float64 as AR-GRPO compares Python floats
    bins = torch.bucketize(scores.double(), torch.tensor(edges, dtype=torch.float64, device=scores.device),
                           right=True)  # [N]: how many edges are <= score
    table = torch.tensor(values, dtype=torch.float32, device=scores.device)
    out = table[bins.clamp(max=len(values) - 1)]
    return torch.where(torch.isnan(scores), torch.full_like(out, float("nan")), out)


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


def condition_prompts(class_names: Sequence[str] | None, template: str, prompts: Sequence[str] | None) -> list[str]:
    """One prompt per condition id: the explicit `prompts`, or `template` filled with each class name."""
    if (class_names is None) == (prompts is None):
        raise ValueError("give exactly one of class_names (with template) and prompts")
    if prompts is not None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty sequence of strings, one per condition id")
        return list(prompts)
    if not class_names:
        raise ValueError("class_names must not be empty")
    return class_prompts(class_names, template)


class ClipReward:
    """reward(images [N, 3, H, W] in [-1, 1], conditions [N]) -> cosine(image, prompt of condition) [N].

    `weights` is a local open_clip checkpoint for `model_name`; empty builds the architecture with
    random weights (tests only). Prompts: `class_names` with `template`, or `prompts` (one per condition
    id). The score is `scale` x cosine, or with `quantize` AR-GRPO's binned cosine (`quantize_scores`).
    """

    def __init__(
        self,
        model_name: str,
        weights: str | None,
        class_names: Sequence[str] | None = None,
        template: str = DEFAULT_TEMPLATE,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        model_kwargs: dict[str, Any] | None = None,
        prompts: Sequence[str] | None = None,
        quantize: bool = False,
        scale: float = 1.0,
    ):
        texts = condition_prompts(class_names, template, prompts)
        model = build_open_clip(model_name, weights, model_kwargs)
        self._setup(model, model_name, texts, device, batch_size, quantize, scale)

    def _setup(
        self,
        model: torch.nn.Module,
        model_name: str,
        prompts: list[str],
        device: str | torch.device,
        batch_size: int,
        quantize: bool = False,
        scale: float = 1.0,
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.quantize, self.scale = bool(quantize), float(scale)
        self.model = model.to(self.device).eval().requires_grad_(False)
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)
        self.prompts = prompts
        self.text_features = self._encode_prompts(tokenizer)  # text_features: [C, D], unit norm

    def variant(self, quantize: bool, scale: float = 1.0) -> ClipReward:
        """The same reward model and prompts with another output form (shares the model: no second load)."""
        other = copy.copy(self)
        other.quantize, other.scale = bool(quantize), float(scale)
        return other

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
        scores = (image_features * text_features).sum(dim=-1).float()
        scores = quantize_scores(scores) if self.quantize else scores * self.scale
        return scores.to(images.device)  # scores: [N]


class QuantizedClipReward(ClipReward):
    """AR-GRPO's quantised CLIP reward: `ClipReward` with `quantize=True`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "quantize": True})
