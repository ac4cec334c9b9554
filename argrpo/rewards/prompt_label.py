"""A class-label reward on prompt conditions: each prompt's label stands in for its condition id.

Text-to-image conditions index a prompt set; a reward that scores images against a class label (the
embedded default's classifier: does the image show the digit the prompt asks for?) gets, for each
condition id, the label its prompt carries (`argrpo.prompts.PromptSet.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from argrpo.rewards import Reward


class PromptLabelReward:
    """reward(images [N, 3, H, W], conditions [N]) -> inner(images, labels[conditions]) [N]."""

    def __init__(self, inner: Reward, labels: Sequence[int] | torch.Tensor):
        self.inner = inner
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if self.labels.ndim != 1 or not len(self.labels):
            raise ValueError(f"labels must be a non-empty sequence, one per prompt, got shape "
                             f"{tuple(self.labels.shape)}")

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        if conditions.numel() and (int(conditions.min()) < 0 or int(conditions.max()) >= len(self.labels)):
            raise ValueError(f"condition ids must lie in [0, {len(self.labels)}), got range "
                             f"[{int(conditions.min())}, {int(conditions.max())}]")
        return self.inner(images, self.labels[conditions.cpu()].to(conditions.device))
