"""The policy interface: what GRPO, sampling and evaluation need from a generator.

Every model family (LlamaGen class-to-image, LlamaGen text-to-image, VAR) implements `Policy`; the
GRPO loop, the sample stage and the evaluate stage are written once against it and never ask which
family they hold (docs/method.md, "The policy").

Conditions are integer ids [N] into the task's condition set: the class label for class-conditional
models, the index of a prompt for text-to-image (the policy looks up that prompt's cached text
features), a (class, style) pair for VAR's style prompts. Rewards receive the same ids and map them to
what they score against.

A policy is an `nn.Module` whose trainable network is the submodule `net`, saved and loaded in its
family's published checkpoint layout. The tokenizer that turns tokens into pixels is frozen and kept
outside the module tree: it is no parameter, not in `state_dict`, and shared (not copied) by
`frozen_copy`. `forward` is the teacher-forced pass, so DDP and FSDP wrap a policy like any model.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, L] long: every token the policy chose, in generation order
    logprobs: torch.Tensor  # [N, L] float32: their log-probs under the conditional policy (no guidance)


class Policy(nn.Module, ABC):
    """A generator GRPO can fine-tune. Subclasses set `net`, `tokenizer` and the three sizes below."""

    num_conditions: int  # ids run over range(num_conditions)
    num_tokens: int  # L: tokens per image
    vocab_size: int  # V: the entropy is normalised by log(V)

    def __init__(self, net: nn.Module, tokenizer: nn.Module | None):
        super().__init__()
        self.net = net
        # kept out of the module tree: frozen, never trained, never saved with the policy, never copied
        object.__setattr__(self, "tokenizer", tokenizer)

    @abstractmethod
    def forward(self, conditions: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                drop_conditions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs and entropies [N, L] (float32) of `tokens` [N, L] under the conditional
        policy at `temperature`, with gradients: exactly what `rollout` returned as `logprobs`.

        `drop_conditions` replaces each condition by the null one with the network's conditioning-dropout
        probability (pretraining's dropout; the LOO-FID paper keeps it on in its ratio passes).
        """

    @abstractmethod
    def rollout(self, conditions: torch.Tensor, sampling, generator: torch.Generator | None = None) -> Rollout:
        """Sample one token sequence per condition id [N] (no gradients), seeded by `generator`.

        `sampling` (argrpo.sampling.SamplingConfig) may guide the draw (CFG, top-k, top-p); the returned
        log-probs are always the conditional policy's, which is what GRPO trains.
        """

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, L] -> images [N, 3, H, W] in [-1, 1] (no gradients)."""

    @abstractmethod
    def forward_passes(self, sampling) -> float:
        """Network forward passes (sequence rows) one image costs under `sampling`: the inference cost."""

    def labels(self, conditions: torch.Tensor) -> torch.Tensor:
        """The class of each condition id [N] -> [N] long, -1 where a condition has none.

        For class-conditional families, the class label the network is conditioned on (a (class, style)
        pair's class); for text-to-image, the class a prompt asks for when its prompt set says (the digit
        of a digit prompt). The sample stage writes these beside the images, so evaluation's class (prompt)
        accuracy needs nothing else. This default knows no classes.
        """
        self.check_conditions(conditions)
        return torch.full_like(conditions, -1)

    def check_conditions(self, conditions: torch.Tensor) -> None:
        if conditions.numel() and (int(conditions.min()) < 0 or int(conditions.max()) >= self.num_conditions):
            bad = conditions[(conditions < 0) | (conditions >= self.num_conditions)][0].item()
            raise ValueError(f"condition id {bad} out of range [0, {self.num_conditions - 1}]")

    def frozen_copy(self) -> Policy:
        """A copy with its own frozen weights (the KL reference) that shares the tokenizer."""
        shared = {id(self.tokenizer): self.tokenizer}
        return copy.deepcopy(self, memo=shared).requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


@torch.no_grad()
def decode_images(policy: Policy, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """tokens [N, L] -> images [N, 3, H, W] in [-1, 1], `batch` sequences per tokenizer call."""
    return torch.cat([policy.decode(tokens[i : i + batch]) for i in range(0, tokens.shape[0], batch)])
