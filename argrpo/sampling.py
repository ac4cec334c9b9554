"""Batched autoregressive sampling with a KV cache, classifier-free guidance and teacher-forced log-probs.

The policy GRPO trains is the *conditional* model: `sample_tokens` returns the log-probability of
each sampled token under softmax(conditional logits / temperature), whatever guidance, top-k or top-p
shaped the sampling distribution, and `token_logprobs` recomputes exactly that with gradients.
`sample_caption_tokens` and `caption_token_logprobs` are the same pair for text-to-image models,
conditioned on left-padded caption features and their mask; their unconditional branch is the null
caption under the caption's own mask, as LlamaGen samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from argrpo.config import Float, Int, require
from argrpo.gpt import GPT, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    cfg_scale: Float = 1.0  # <= 1: a single conditional branch, no doubled batch
    cfg_interval: Int = -1  # LlamaGen's meaning: guide tokens 0..cfg_interval + 1 only; -1: every token
    temperature: Float = 1.0
    top_k: Int = 0  # 0: off
    top_p: Float = 1.0

    def __post_init__(self) -> None:
        require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        require(self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)", self.top_k)
        require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0", self.cfg_scale)
        require(self.cfg_interval >= -1, "cfg_interval", "must be >= -1 (-1: guide every token)", self.cfg_interval)

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


@dataclass
class Sample:
    tokens: torch.Tensor  # [N, T] long
    logprobs: torch.Tensor  # [N, T] float32, conditional policy


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [N, V] outside the top-k and outside the smallest top-p nucleus with -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of probs [N, V] (exponential race: no host sync, seedable)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def next_token(logits: torch.Tensor, N: int, t: int, cfg: SamplingConfig,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t from logits [N or 2N, V] ([cond; null] when guided) and its conditional log-prob, both [N]."""
    cond_logits = logits[:N] / cfg.temperature
    guided = cond_logits
    # LlamaGen guides the prefilled first token and then decode steps i <= cfg_interval: tokens 0..k + 1
    if cfg.guided and (cfg.cfg_interval < 0 or t <= cfg.cfg_interval + 1):
        uncond = logits[N:] / cfg.temperature
        guided = uncond + (cond_logits - uncond) * cfg.cfg_scale
    token = draw(filter_logits(guided, cfg.top_k, cfg.top_p).softmax(-1), generator)
    return token, cond_logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def sample_tokens(model: GPT, labels: torch.Tensor, cfg: SamplingConfig = SamplingConfig(),
                  generator: torch.Generator | None = None) -> Sample:
    """Sample image tokens for `labels` [N] in one batched call with one KV cache."""
    model.check_labels(labels)
    N = labels.shape[0]
    cond = labels
    if cfg.guided:  # [cond; null] share one batch and every sampled token
        cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    cache = model.new_cache(cond.shape[0])
    logits = model.prefill(cond, cache)  # [N or 2N, V]
    return sample_after_prefill(model, logits, cache, N, cfg, generator)


def sample_after_prefill(model: GPT, logits: torch.Tensor, cache: KVCache, N: int, cfg: SamplingConfig,
                         generator: torch.Generator | None) -> Sample:
    """Draw all block_size tokens one at a time from a prefilled cache; `logits` [N or 2N, V] predict the first."""
    T = model.config.block_size
    tokens = torch.empty(N, T, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(N, T, dtype=torch.float32, device=logits.device)
    for t in range(T):
        tokens[:, t], logprobs[:, t] = next_token(logits, N, t, cfg, generator)
        if t + 1 < T:
            token = tokens[:, t]
            logits = model.decode_one(token.repeat(2) if cfg.guided else token, cache)
    return Sample(tokens, logprobs)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `tokens` [N, T] and entropies [N, T] under logits [N, T, V]."""
    logp = logits.log_softmax(-1)
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def token_logprobs(model: GPT, labels: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   drop_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies [N, T] of `tokens` [N, T] under the conditional policy
    (`drop_labels`: each label replaced by the null class with the model's class-dropout probability)."""
    logits = model(tokens[:, :-1], labels, drop_labels=drop_labels)[:, -tokens.shape[1]:] / temperature
    return chosen_logprobs(logits, tokens)


@torch.no_grad()
def sample_caption_tokens(model: GPT, captions: torch.Tensor, caption_mask: torch.Tensor | None,
                          cfg: SamplingConfig = SamplingConfig(),
                          generator: torch.Generator | None = None) -> Sample:
    """Sample image tokens for left-padded captions [N, cls_token_num, caption_dim] (mask [N, cls_token_num]
    bool, True on valid tokens) in one batched call with one KV cache (text-to-image models)."""
    model.check_captions(captions, caption_mask)
    N = captions.shape[0]
    cond, mask = captions, caption_mask
    if cfg.guided:  # [cond; null caption] share one batch and every sampled token
        cond = torch.cat([captions, model.null_condition(N).to(captions)])
        mask = None if caption_mask is None else torch.cat([caption_mask, caption_mask])
    cache = model.new_cache(cond.shape[0])
    logits = model.prefill(cond, cache, cond_mask=mask)  # [N or 2N, V]
    return sample_after_prefill(model, logits, cache, N, cfg, generator)


def caption_token_logprobs(model: GPT, captions: torch.Tensor, caption_mask: torch.Tensor | None,
                           tokens: torch.Tensor, temperature: float = 1.0,
                           drop_captions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies [N, T] of `tokens` [N, T] under the caption-conditional policy
    (`drop_captions`: each caption replaced by the null caption with the model's dropout probability)."""
    model.check_captions(captions, caption_mask)
    logits = model(tokens[:, :-1], captions, cond_mask=caption_mask, drop_labels=drop_captions)
    logits = logits[:, -tokens.shape[1]:] / temperature
    return chosen_logprobs(logits, tokens)  # logits: [N, T, V]


@torch.no_grad()
def sample_tokens_nocache(model: GPT, labels: torch.Tensor, cfg: SamplingConfig = SamplingConfig(),
                          generator: torch.Generator | None = None) -> Sample:
    """The same sampler recomputing the whole prefix every step: the reference for tests and benchmarks."""
    model.check_labels(labels)
    N, T = labels.shape[0], model.config.block_size
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if cfg.guided else labels
    tokens = torch.empty(N, 0, dtype=torch.long, device=labels.device)
    logprobs = []
    for t in range(T):
        idx = tokens.repeat(2, 1) if cfg.guided else tokens
        token, logprob = next_token(model(idx, cond)[:, -1], N, t, cfg, generator)
        logprobs.append(logprob)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return Sample(tokens, torch.stack(logprobs, 1))
