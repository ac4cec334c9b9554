"""Reward registry.

A reward scores decoded images for their conditions:
    reward(images, conditions) -> scores
with `images` [N, 3, H, W] float in [-1, 1], `conditions` [N] long (class labels, or indices into a
prompt set), `scores` [N] float32 (higher is better; NaN where a judge could not score an image).
Rewards are looked up by name and imported lazily, so optional dependencies (pyiqa for MANIQA,
transformers' vision-language models for the judges) are imported only when that reward is configured.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


REWARDS: dict[str, str] = {
    "classifier": "argrpo.rewards.classifier:ClassifierReward",
    "classifier_prob": "argrpo.rewards.classifier:ClassifierProbReward",
    "realism": "argrpo.rewards.realism:RealismReward",
    "loo_fid": "argrpo.rewards.loo_fid:LooFidReward",
    "clip": "argrpo.rewards.clip:ClipReward",
    "clip_quantized": "argrpo.rewards.clip:QuantizedClipReward",
    "hpsv2": "argrpo.rewards.hpsv2:HpsV2Reward",
    "hpsv2_quantized": "argrpo.rewards.hpsv2:QuantizedHpsV2Reward",
    "maniqa": "argrpo.rewards.maniqa:ManiqaReward",
    "aesthetic": "argrpo.rewards.aesthetic:AestheticReward",
    "vlm_judge": "argrpo.rewards.vlm_judge:VlmJudgeReward",
    # AR-GRPO's three judges under their own names, so that one run can weight all three
    "vlm_faithfulness": "argrpo.rewards.vlm_judge:FaithfulnessJudgeReward",
    "vlm_fake": "argrpo.rewards.vlm_judge:FakeJudgeReward",
    "vlm_weird": "argrpo.rewards.vlm_judge:WeirdJudgeReward",
}


def reward_class(name: str) -> type:
    """The class registered under `name`; an unknown name lists the valid ones."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}")
    module, attr = REWARDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_reward(name: str, **kwargs: Any) -> Reward:
    return reward_class(name)(**kwargs)
