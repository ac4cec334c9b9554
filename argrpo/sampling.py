"""Batched autoregressive sampling with a KV cache, classifier-free guidance and teacher-forced log-probs.

The policy GRPO trains is the *conditional* model: `sample_tokens` returns the log-probability of
each sampled token under softmax(conditional logits / temperature), whatever guidance, top-k or top-p
shaped the sampling distribution, and `token_logprobs` recomputes exactly that with gradients.
`sample_caption_tokens` and `caption_token_logprobs` are the same pair for text-to-image models,
conditioned on left-padded caption features and their mask; their unconditional branch is the null
caption under the caption's own mask, as LlamaGen samples.

Compiled sampling (`SamplingConfig.compile`): the prefill and each decode step, with the token choice,
run as one `torch.compile` graph without breaks, as gpt-fast does. The graph sees no position-dependent
shape (the KV cache is allocated at full length, positions are tensors, attention reads whole blocks of
KV_BLOCK cache positions: `GPT.forward_at`) and no generator: each step's exponential noise is drawn
eagerly from the caller's generator, with the same shape and in the same order as the eager sampler
draws it, so the random stream is the eager one. The tokens equal the eager sampler's unless a race is
decided within float rounding; the log-probs agree to rounding. "reduce-overhead" adds CUDA graphs on a
GPU (one replay per token; on a CPU it runs as "default"). docs/gpu_plan.md has the expected speed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from argrpo.config import Float, Int, require
from argrpo.gpt import GPT, KVCache

COMPILE_MODES = ("off", "default", "reduce-overhead")


@dataclass(frozen=True)
class SamplingConfig:
    cfg_scale: Float = 1.0  # <= 1: a single conditional branch, no doubled batch
    cfg_interval: Int = -1  # LlamaGen's meaning: guide tokens 0..cfg_interval + 1 only; -1: every token
    temperature: Float = 1.0
    top_k: Int = 0  # 0: off
    top_p: Float = 1.0
    # LlamaGen samplers (VAR's ignores it): "off" eager; "default" torch.compile of the prefill and the decode
    # step; "reduce-overhead" the same with CUDA graphs. The eager random stream either way (module docstring)
    compile: str | bool = "off"  # YAML 1.1 reads a bare `off` (as `dvc exp run -S ...=off` writes it) as false

    def __post_init__(self) -> None:
        if self.compile is False:
            object.__setattr__(self, "compile", "off")
        require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        require(self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)", self.top_k)
        require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0", self.cfg_scale)
        require(self.cfg_interval >= -1, "cfg_interval", "must be >= -1 (-1: guide every token)", self.cfg_interval)
        require(self.compile in COMPILE_MODES, "compile", f"must be one of {', '.join(COMPILE_MODES)}", self.compile)

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
    return race(probs, race_noise(probs.shape, probs.dtype, probs.device, generator))


def race_noise(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device,
               generator: torch.Generator | None) -> torch.Tensor:
    """Exponential(1) noise for `race`: the only random numbers the sampler draws."""
    return torch.empty(shape, dtype=dtype, device=device).exponential_(1.0, generator=generator)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax_v probs[v] / noise[v] with Exponential(1) noise [N, V] is a draw from probs [N, V]."""
    return (probs / noise).argmax(-1)


def guided_now(cfg: SamplingConfig, t: int) -> bool:
    """Whether token t is drawn from guided logits. LlamaGen's cfg_interval = k guides the prefilled first
    token and then decode steps i <= k: tokens 0..k + 1."""
    return cfg.guided and (cfg.cfg_interval < 0 or t <= cfg.cfg_interval + 1)


def pick_token(logits: torch.Tensor, noise: torch.Tensor, N: int, cfg: SamplingConfig,
               guide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The token drawn by `noise` [N, V] from logits [N or 2N, V] ([cond; null] when guided), and its
    conditional log-prob, both [N]. `guide`: mix in the null branch with cfg_scale."""
    cond_logits = logits[:N] / cfg.temperature
    shaped = cond_logits
    if guide:
        uncond = logits[N:] / cfg.temperature
        shaped = uncond + (cond_logits - uncond) * cfg.cfg_scale
    token = race(filter_logits(shaped, cfg.top_k, cfg.top_p).softmax(-1), noise)
    return token, cond_logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]


def next_token(logits: torch.Tensor, N: int, t: int, cfg: SamplingConfig,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t from logits [N or 2N, V] ([cond; null] when guided) and its conditional log-prob, both [N]."""
    noise = race_noise((N, logits.shape[-1]), logits.dtype, logits.device, generator)  # [N, V]
    return pick_token(logits, noise, N, cfg, guided_now(cfg, t))


@torch.no_grad()
def sample_tokens(model: GPT, labels: torch.Tensor, cfg: SamplingConfig = SamplingConfig(),
                  generator: torch.Generator | None = None) -> Sample:
    """Sample image tokens for `labels` [N] in one batched call with one KV cache."""
    model.check_labels(labels)
    N = labels.shape[0]
    cond = labels
    if cfg.guided:  # [cond; null] share one batch and every sampled token
        cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    if cfg.compile != "off":
        return sample_compiled(model, cond, None, N, cfg, generator)
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


def prefill_and_pick(model: GPT, cond: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                     noise: torch.Tensor, N: int, cfg: SamplingConfig,
                     guide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition into the cache at `positions` [cls_token_num], then token 0 and its log-prob [N]."""
    return pick_token(model.prefill_at(cond, positions, cache), noise, N, cfg, guide)


def decode_and_pick(model: GPT, token: torch.Tensor, position: torch.Tensor, length: int, cache: KVCache,
                    noise: torch.Tensor, N: int, cfg: SamplingConfig,
                    guide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t-1 [N] into the cache at `position` [1], attending to the first `length` positions, then token t
    and its log-prob [N]: one graph per step."""
    logits = model.decode_at(token.repeat(2) if cfg.guided else token, position, cache, length)  # [N or 2N, V]
    return pick_token(logits, noise, N, cfg, guide)


KV_BLOCK = 32  # compiled decoding attends to the cache in whole blocks of this many positions


def attended_length(position: int, max_len: int) -> int:
    """Cache positions the compiled decode step at `position` attends to: position + 1 rounded up to whole
    KV_BLOCKs. The keys read grow with the position (at most KV_BLOCK - 1 masked ones), as in eager
    decoding, for max_len / KV_BLOCK shapes in all (one CUDA graph each)."""
    return min(max_len, -(-(position + 1) // KV_BLOCK) * KV_BLOCK)


# the compiled step functions by mode; dynamo keeps a graph per model shape, batch and setting
_compiled: dict[str, Callable] = {}
# reduce-overhead: one KV cache per (model, batch), reused so that CUDA graphs keep their addresses
_static_caches: weakref.WeakKeyDictionary[GPT, dict[int, KVCache]] = weakref.WeakKeyDictionary()


def compiled_steps(mode: str) -> tuple[Callable, Callable]:
    """`prefill_and_pick` and `decode_and_pick` compiled whole (fullgraph: a graph break is an error).

    The prefill runs once per call and is compiled without CUDA graphs in either mode; the decode step,
    run block_size - 1 times, takes the mode ("reduce-overhead": replayed as a CUDA graph on a GPU).
    """
    if "prefill" not in _compiled:
        _compiled["prefill"] = torch.compile(prefill_and_pick, fullgraph=True)
    if mode not in _compiled:
        _compiled[mode] = torch.compile(decode_and_pick, mode=mode, fullgraph=True)
    return _compiled["prefill"], _compiled[mode]


def static_cache(model: GPT, batch: int) -> KVCache:
    """A zeroed KV cache for `batch` rows, the same tensors on every call (CUDA graphs replay on fixed
    addresses); kept while the model lives."""
    caches = _static_caches.setdefault(model, {})
    p = model.output.weight
    cache = caches.get(batch)
    if cache is None or cache.k[0].dtype != p.dtype or cache.k[0].device != p.device:
        cache = caches[batch] = model.new_cache(batch)
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t, guard=False)
    for t in cache.k + cache.v:  # stale values sit only at masked positions, but a stale inf would give 0 * inf
        t.zero_()
    cache.length, cache.valid = 0, None
    return cache


def sample_compiled(model: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None, N: int, cfg: SamplingConfig,
                    generator: torch.Generator | None) -> Sample:
    """`sample_after_prefill` after a prefill of `cond` [N or 2N, ...] (caption mask `cond_mask`), with the
    prefill and every decode step one compiled graph (`compiled_steps`) and the same random draws."""
    prefill, decode = compiled_steps(cfg.compile)
    c, device = model.config, cond.device
    cudagraphs = cfg.compile == "reduce-overhead"
    cache = static_cache(model, cond.shape[0]) if cudagraphs else model.new_cache(cond.shape[0])
    if cond_mask is not None:
        model.mask_cache(cache, cond_mask)
    T, V, max_len = c.block_size, c.vocab_size, c.cls_token_num + c.block_size
    tokens = torch.empty(N, T, dtype=torch.long, device=device)
    logprobs = torch.empty(N, T, dtype=torch.float32, device=device)
    positions = torch.arange(c.cls_token_num, device=device)
    noise = race_noise((N, V), torch.float32, device, generator)  # [N, V]; the model's logits are float32
    token, logprob = prefill(model, cond, positions, cache, noise, N, cfg, guided_now(cfg, 0))
    tokens[:, 0], logprobs[:, 0] = token, logprob
    position = torch.full((1,), c.cls_token_num, dtype=torch.long, device=device)
    for t in range(1, T):
        noise = race_noise((N, V), torch.float32, device, generator)
        if cudagraphs:  # the last replay's outputs are copied out: the next one may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        length = attended_length(c.cls_token_num + t - 1, max_len)
        token, logprob = decode(model, token, position, length, cache, noise, N, cfg, guided_now(cfg, t))
        tokens[:, t], logprobs[:, t] = token, logprob
        token = token.clone()
        position += 1
    cache.length = c.cls_token_num + T - 1
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
    if cfg.compile != "off":
        return sample_compiled(model, cond, mask, N, cfg, generator)
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
