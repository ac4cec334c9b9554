"""HPSv2 / HPSv2.1 reward: human-preference score of an image for its prompt (a class prompt or a
prompt set's prompt; see `ClipReward`, whose `scale` / `quantize` output forms it shares).

HPSv2 is an open_clip `ViT-H-14` fine-tuned on human preference pairs; its score is the cosine
similarity of the image and prompt features (no logit scale). The released checkpoint
(`HPS_v2.1_compressed.pt`, weights under `state_dict`) is loaded strictly into the architecture
built here, so scoring runs batched through the same code as the CLIP reward. HPSv2 resizes the
longer side and pads; for the square images scored here that is the plain resize CLIP does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from argrpo.imagenet import DEFAULT_TEMPLATE
from argrpo.rewards.clip import ClipReward, build_open_clip, condition_prompts


def load_hps_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict inside an HPS checkpoint (`state_dict` key, or the file itself),
    with a DataParallel `module.` prefix removed."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"HPSv2 checkpoint not found: {path!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"HPSv2 checkpoint {path} holds {type(checkpoint).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model`, failing with every missing, unexpected and misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {_list(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(f"{source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


class HpsV2Reward(ClipReward):
    """reward(images [N, 3, H, W] in [-1, 1], conditions [N]) -> HPS score of (image, prompt of condition) [N].

    Prompts: `class_names` with `template`, or `prompts` (one per condition id); output `scale` x score,
    or AR-GRPO's binned score with `quantize` (the same bins as CLIP's).
    """

    def __init__(
        self,
        weights: str,
        class_names: Sequence[str] | None = None,
        model_name: str = "ViT-H-14",
        template: str = DEFAULT_TEMPLATE,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        model_kwargs: dict[str, Any] | None = None,
        prompts: Sequence[str] | None = None,
        quantize: bool = False,
        scale: float = 1.0,
    ):
        texts = condition_prompts(class_names, template, prompts)
        state_dict = load_hps_state_dict(weights)
        # build the bare architecture: the HPS file replaces every weight, so no base CLIP is needed
        model = build_open_clip(model_name, None, model_kwargs)
        load_strict(model, state_dict, f"HPSv2 checkpoint {weights} (open_clip {model_name})")
        self._setup(model, model_name, texts, device, batch_size, quantize, scale)


class QuantizedHpsV2Reward(HpsV2Reward):
    """AR-GRPO's quantised HPSv2 reward: `HpsV2Reward` with `quantize=True`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "quantize": True})
