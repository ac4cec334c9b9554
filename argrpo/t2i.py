"""LlamaGen text-to-image as a policy: condition ids index a prompt set whose caption features are cached."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from argrpo.gpt import GPT
from argrpo.policy import Policy, Rollout
from argrpo.sampling import SamplingConfig, caption_token_logprobs, sample_caption_tokens
from argrpo.text import PromptFeatures
from argrpo.vq import VQModel


class LlamaGenT2IPolicy(Policy):
    """LlamaGen T2I (`net`: a t2i GPT, LlamaGen's layout) with the VQ tokenizer and a prompt set's features.

    Condition id i is prompt i of `prompt_features` (`argrpo.text.PromptFeatures`: left-padded caption
    features [P, L, D] and mask [P, L], computed once by `argrpo.text.compute_prompt_features`). Like the
    tokenizer, the features are frozen data kept out of the module tree: no parameter, not in
    `state_dict`, shared (not copied) by `frozen_copy`, and left where they are by `.to()`; each call
    gathers its N rows and moves them to the network's device. Rollouts guide against the null caption
    (`uncond_embedding`) under the caption's mask, as LlamaGen samples. `prompt_labels` [P] optionally
    gives the class each prompt asks for (-1: none), which `labels` returns for prompt accuracy.
    """

    def __init__(self, gpt: GPT, vq: VQModel, prompt_features: PromptFeatures,
                 prompt_labels: Sequence[int] | torch.Tensor | None = None):
        c = gpt.config
        if c.model_type != "t2i":
            raise ValueError("LlamaGenT2IPolicy needs a text-to-image GPT (model_type t2i), got model_type "
                             f"{c.model_type}")
        if (prompt_features.length, prompt_features.dim) != (c.cls_token_num, c.caption_dim):
            raise ValueError(
                f"prompt features are [P, {prompt_features.length}, {prompt_features.dim}] but the GPT takes "
                f"[P, {c.cls_token_num}, {c.caption_dim}] captions (cls_token_num, caption_dim)"
            )
        if vq.config.codebook_size != c.vocab_size:
            raise ValueError(f"the tokenizer has {vq.config.codebook_size} codes but the GPT's vocabulary is "
                             f"{c.vocab_size}")
        super().__init__(gpt, vq.eval().requires_grad_(False))
        object.__setattr__(self, "prompt_features", prompt_features)
        self.num_conditions = len(prompt_features)
        table = torch.full((self.num_conditions,), -1) if prompt_labels is None else torch.as_tensor(prompt_labels)
        if table.ndim != 1 or len(table) != self.num_conditions:
            raise ValueError(f"prompt_labels must give one label per prompt ({self.num_conditions}), got shape "
                             f"{tuple(table.shape)}")
        self.register_buffer("prompt_labels", table.long(), persistent=False)
        self.num_tokens = c.block_size
        self.vocab_size = c.vocab_size

    def labels(self, conditions: torch.Tensor) -> torch.Tensor:
        self.check_conditions(conditions)
        return self.prompt_labels[conditions]

    def captions(self, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption features [N, L, D] float32 and mask [N, L] of condition ids [N], on the network's device."""
        self.check_conditions(conditions)
        return self.prompt_features.lookup(conditions, self.device)

    def forward(self, conditions: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                drop_conditions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = self.captions(conditions)
        return caption_token_logprobs(self.net, features, mask, tokens, temperature, drop_captions=drop_conditions)

    @torch.no_grad()
    def rollout(self, conditions: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Rollout:
        features, mask = self.captions(conditions)
        sample = sample_caption_tokens(self.net, features, mask, sampling, generator)
        return Rollout(sample.tokens, sample.logprobs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(tokens)

    def forward_passes(self, sampling: SamplingConfig) -> float:
        """Sequence rows per image: the caption prefill (cls_token_num rows) and block_size - 1 decode steps,
        doubled under guidance (once doubled, the batch stays doubled for the whole call)."""
        c = self.net.config
        rows = c.cls_token_num + c.block_size - 1
        return float(2 * rows if sampling.guided else rows)

    def frozen_copy(self) -> LlamaGenT2IPolicy:
        """A copy with its own frozen weights (the KL reference) sharing the tokenizer and the prompt features."""
        shared = {id(self.tokenizer): self.tokenizer, id(self.prompt_features): self.prompt_features}
        return copy.deepcopy(self, memo=shared).requires_grad_(False).eval()
