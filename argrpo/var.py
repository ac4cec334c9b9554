"""VAR: class-conditional next-scale prediction over the token pyramid of the multi-scale VQVAE.

Same module names, shapes and maths as FoundationVision's VAR, so the released `var_d16.pth` ...
`var_d30.pth` (bare state dicts) load key for key:

- Input: scale 0 is the start token, class embedding + `pos_start`; scale k >= 1 reads
  `word_embed(area-downsample(f_hat after scales < k))` (argrpo.msvq). Every position adds its absolute
  `pos_1LC` and its scale's `lvl_embed`. The class table `class_emb` has a null row (id num_classes)
  for classifier-free guidance.
- Blocks: AdaLN with one SiLU -> Linear(C, 6C) per block (`blocks.{i}.ada_lin.1`) giving
  (gamma1, gamma2, scale1, scale2, shift1, shift2);
  x += gamma1 * attn(LN(x) (1 + scale1) + shift1), x += gamma2 * ffn(LN(x) (1 + scale2) + shift2),
  LayerNorm eps 1e-6 without affine weights, FFN ratio 4 with tanh-GELU. Attention L2-normalises q and
  k per head and multiplies q by exp(min(scale_mul_1H11, log 100)), a learned per-head log-scale
  (initialised to log 4); q and v have biases, k a zero bias buffer.
- Mask: block-causal by scale (`attn_bias_for_masking`, 0 where a token may look, else VAR's -inf): a token
  sees every token of its own scale and of the earlier ones. `lvl_1L` holds each position's scale. Here the
  mask holds the most negative finite float32 (`MASKED`) instead of -inf, also after loading VAR's files:
  the softmax is the same (exp underflows to exactly 0), and every tensor of a fine-tuned network stays
  finite, so that the GRPO loop's check that no non-finite weight is ever written guards real weights.
- Head: LN(x) (1 + scale) + shift from SiLU -> Linear(C, 2C) (`head_nm`), then Linear(C, V).

Sampling runs one forward per scale with a KV cache; all pn^2 tokens of a scale are drawn in parallel.
Guidance ramps with the scale as in VAR, logits = (1 + t) cond - t uncond with t = cfg * k / (K - 1).
Here `SamplingConfig.cfg_scale` s is the guidance scale reached at the last scale in LlamaGen's
convention (logits = uncond + s (cond - uncond)), so VAR's own `cfg` is s - 1: VAR's FID setting
cfg 1.5 is cfg_scale 2.5, and cfg_scale <= 1 samples from the conditional model alone, as for LlamaGen.

VAR pretrains with stochastic depth (drop_path 0.1 * depth / 24); it is left out here, because GRPO's
ratios need the teacher-forced pass to be the network that sampled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.checkpoints import load_into, read_state_dict
from argrpo.config import ConfigError, require
from argrpo.msvq import MSVQVAE, VAR_PATCH_NUMS, MSVQConfig, MultiScaleQuantizer, scale_of_tokens
from argrpo.policy import Policy, Rollout
from argrpo.sampling import SamplingConfig, draw, filter_logits

# VAR clamps the learned log-scale at log(100), computed in float32
MAX_LOG_SCALE = float(torch.tensor(100.0).log())
# the attention bias of a masked position: VAR's files hold -inf there (see the module docstring)
MASKED = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    dim: int = 1024  # C; VAR's presets use 64 * depth
    n_head: int = 16  # VAR's presets use depth heads of 64 channels
    mlp_ratio: float = 4.0
    vocab_size: int = 4096  # V of the VQVAE
    cvae: int = 32  # code channels of the VQVAE
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1  # pretraining's label dropout, applied only when asked (drop_labels)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        require(self.depth > 0 and self.dim > 0 and self.n_head > 0, "depth/dim/n_head", "must be > 0",
                (self.depth, self.dim, self.n_head))
        require(self.dim % self.n_head == 0, "dim", f"must be divisible by n_head={self.n_head}", self.dim)
        require(self.mlp_ratio > 0, "mlp_ratio", "must be > 0", self.mlp_ratio)
        require(self.vocab_size > 0, "vocab_size", "must be > 0", self.vocab_size)
        require(self.cvae > 0, "cvae", "must be > 0", self.cvae)
        require(self.num_classes > 0, "num_classes", "must be > 0", self.num_classes)
        require(len(self.patch_nums) >= 2, "patch_nums", "must list at least two scales", self.patch_nums)
        require(all(p >= 1 for p in self.patch_nums) and list(self.patch_nums) == sorted(set(self.patch_nums)),
                "patch_nums", "must be strictly increasing positive sides", self.patch_nums)
        require(0.0 <= self.cond_drop_rate < 1.0, "cond_drop_rate", "must be in [0, 1)", self.cond_drop_rate)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        """Tokens of scale 0, all fed the start token."""
        return self.patch_nums[0] ** 2

    @property
    def scale_slices(self) -> list[slice]:
        ends = torch.tensor([p * p for p in self.patch_nums]).cumsum(0).tolist()
        return [slice(end - p * p, end) for p, end in zip(self.patch_nums, ends, strict=True)]

    @property
    def mlp_hidden(self) -> int:
        return round(self.dim * self.mlp_ratio)


VAR_PRESETS: dict[str, dict] = {
    "VAR-d16": dict(depth=16, dim=1024, n_head=16),
    "VAR-d20": dict(depth=20, dim=1280, n_head=20),
    "VAR-d24": dict(depth=24, dim=1536, n_head=24),
    "VAR-d30": dict(depth=30, dim=1920, n_head=30),
    # small presets for the embedded default and the tests (same widths as the GPT presets)
    "small": dict(depth=4, dim=128, n_head=4),
    "tiny": dict(depth=2, dim=32, n_head=2),
}


def var_config(preset: str, tokenizer: MSVQConfig | None = None, **overrides) -> VARConfig:
    """The named preset's config; `tokenizer` supplies vocab_size, cvae and patch_nums, `overrides` the rest."""
    if preset not in VAR_PRESETS:
        raise ConfigError(f"unknown VAR preset {preset!r}; valid presets: {', '.join(VAR_PRESETS)}")
    fitted = {}
    if tokenizer is not None:
        fitted = dict(vocab_size=tokenizer.vocab_size, cvae=tokenizer.cvae, patch_nums=tokenizer.patch_nums)
    return VARConfig(**{**VAR_PRESETS[preset], **fitted, **overrides})


class ScaleCache:
    """Keys (L2-normalised) and values of every block for one sampling call, allocated once."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0  # positions filled so far


class SelfAttention(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        C, H = config.dim, config.n_head
        self.n_head, self.head_dim = H, config.head_dim
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: ScaleCache | None,
                layer: int) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        # cosine attention: unit q and k, sharpened by a learned per-head temperature
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_LOG_SCALE).exp()
        k = F.normalize(k, dim=-1)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            # a scale sees all earlier scales and itself: everything cached so far, no mask
            k, v = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_hidden)
        self.fc2 = nn.Linear(config.mlp_hidden, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.dim, self.eps = config.dim, config.norm_eps
        self.attn = SelfAttention(config)
        self.ffn = FFN(config)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None, cache: ScaleCache | None,
                layer: int) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        h = F.layer_norm(x, (self.dim,), eps=self.eps) * (1 + scale1) + shift1
        x = x + self.attn(h, mask, cache, layer) * gamma1
        h = F.layer_norm(x, (self.dim,), eps=self.eps) * (1 + scale2) + shift2
        return x + self.ffn(h) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.dim, self.eps = config.dim, config.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 2 * config.dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return F.layer_norm(x, (self.dim,), eps=self.eps) * (1 + scale) + shift


class VAR(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        C, L = config.dim, config.num_tokens
        self.pos_start = nn.Parameter(torch.empty(1, config.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        scales = scale_of_tokens(config.patch_nums)  # [L]
        self.register_buffer("lvl_1L", scales[None].clone())
        visible = scales[:, None] >= scales[None, :]  # [L, L]: row i sees column j at its scale or before
        mask = torch.zeros(L, L).masked_fill(~visible, MASKED)
        self.register_buffer("attn_bias_for_masking", mask[None, None])
        self.word_embed = nn.Linear(config.cvae, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)  # row num_classes: the null class
        self.lvl_embed = nn.Embedding(config.num_scales, C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config) for _ in range(config.depth))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = nn.Linear(C, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """VAR's initialisation: truncated normal of std sqrt(1 / (3C)), near-identity blocks, a small head."""
        std = math.sqrt(1 / self.config.dim / 3)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        C, depth = self.config.dim, self.config.depth
        for block in self.blocks:
            # residual branches scaled by depth; gammas start near zero so every block starts near identity
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.ada_lin[-1].weight[2 * C :].mul_(init_adaln)
            block.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)

    def check_labels(self, labels: torch.Tensor, allow_null: bool = False) -> None:
        top = self.config.num_classes + int(allow_null)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
            bad = labels[(labels < 0) | (labels >= top)][0].item()
            raise ValueError(f"class id {bad} out of range [0, {top - 1}]")

    def class_condition(self, labels: torch.Tensor, drop_labels: bool = False) -> torch.Tensor:
        """labels [B] -> class embeddings [B, C]; `drop_labels` swaps labels for the null class with
        cond_drop_rate (pretraining only: explicit, so RL updates in train mode never drop by accident)."""
        if drop_labels and self.config.cond_drop_rate > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)
        return self.class_emb(labels)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Position and scale embeddings of sequence positions start..end-1: [1, end - start, C]."""
        return self.pos_1LC[:, start:end] + self.lvl_embed(self.lvl_1L[:, start:end])

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, C] -> scale 0's input [B, first_l, C]."""
        first = self.config.first_l
        return cond[:, None].expand(-1, first, -1) + self.pos_start + self.positions(0, first)

    def scale_input(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """VQVAE features [B, l, Cvae] at positions start..start+l-1 -> token inputs [B, l, C]."""
        return self.word_embed(inputs) + self.positions(start, start + inputs.shape[1])

    def run(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None,
            cache: ScaleCache | None) -> torch.Tensor:
        """Blocks and head: x [B, l, C] -> logits [B, l, V] float32."""
        for i, block in enumerate(self.blocks):
            x = block(x, cond, mask, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.head_nm(x.float(), cond.float()).to(x.dtype)).float()

    def forward(self, labels: torch.Tensor, inputs: torch.Tensor, drop_labels: bool = False) -> torch.Tensor:
        """Teacher-forced logits of every token of the first scales.

        labels [B] (num_classes is the null class); inputs [B, l, Cvae], the VQVAE's teacher-forcing
        input (argrpo.msvq) of scales 1..k, or of all scales 1..K-1 (l = L - first_l). Returns logits
        [B, first_l + l, V] in float32: position j predicts token j of the flat sequence.
        """
        end = self.config.first_l + inputs.shape[1]
        if end not in [s.stop for s in self.config.scale_slices]:
            raise ValueError(f"inputs of {inputs.shape[1]} tokens do not end at a scale boundary "
                             f"(scales {self.config.patch_nums})")
        cond = self.class_condition(labels, drop_labels)  # [B, C]
        x = torch.cat([self.start_tokens(cond), self.scale_input(inputs, self.config.first_l)], dim=1)
        return self.run(x, cond, self.attn_bias_for_masking[:, :, :end, :end], None)

    def new_cache(self, batch: int) -> ScaleCache:
        c, p = self.config, self.head.weight
        return ScaleCache(c.depth, batch, c.n_head, c.num_tokens, c.head_dim, p.dtype, p.device)


def guidance_ramp(cfg: float, scale: int, num_scales: int) -> float:
    """VAR's guidance strength t at scale k of K: cfg * k / (K - 1) (0 at the first scale, cfg at the last)."""
    return cfg * scale / (num_scales - 1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """VAR's guidance: (1 + t) cond - t uncond."""
    return (1 + t) * cond - t * uncond


@dataclass
class VARSample:
    tokens: torch.Tensor  # [N, L] long, scale after scale
    logprobs: torch.Tensor  # [N, L] float32 under the conditional policy
    f_hat: torch.Tensor  # [N, Cvae, h, w]: the VQVAE latent the tokens decode from


def check_pair(net: VAR, quantizer: MultiScaleQuantizer) -> None:
    c, q = net.config, quantizer.config
    if (c.vocab_size, c.cvae, c.patch_nums) != (q.vocab_size, q.cvae, q.patch_nums):
        raise ValueError(f"VAR (vocab {c.vocab_size}, Cvae {c.cvae}, scales {c.patch_nums}) does not fit the "
                         f"VQVAE (vocab {q.vocab_size}, Cvae {q.cvae}, scales {q.patch_nums})")


def draw_scale(logits: torch.Tensor, N: int, scale: int, num_scales: int, sampling: SamplingConfig,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of scale `scale` from logits [N or 2N, l, V] ([cond; null] when guided) and their
    log-probs under the conditional policy, softmax(cond / temperature); both [N, l]."""
    cond = logits[:N] / sampling.temperature
    shaped = cond
    if sampling.guided:
        t = guidance_ramp(sampling.cfg_scale - 1, scale, num_scales)  # VAR's cfg is cfg_scale - 1
        shaped = guided_logits(cond, logits[N:] / sampling.temperature, t)
    probs = filter_logits(shaped.flatten(0, 1), sampling.top_k, sampling.top_p).softmax(-1)  # [N * l, V]
    tokens = draw(probs, generator).view(N, -1)
    return tokens, cond.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


def prepare(net: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor,
            sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, then (labels of the batch the network runs [N or 2N], an empty f_hat [N, Cvae, h, w])."""
    net.check_labels(labels)
    check_pair(net, quantizer)
    if sampling.guided and sampling.cfg_interval >= 0:
        raise ValueError(f"VAR guides every scale on its ramp; cfg_interval must be -1, got {sampling.cfg_interval}")
    c = net.config
    batch_labels = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if sampling.guided else labels
    f_hat = torch.zeros(labels.shape[0], c.cvae, c.patch_nums[-1], c.patch_nums[-1], device=labels.device,
                        dtype=quantizer.embedding.weight.dtype)
    return batch_labels, f_hat


@torch.no_grad()
def sample_scales(net: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor,
                  sampling: SamplingConfig, generator: torch.Generator | None = None) -> VARSample:
    """Sample every scale for `labels` [N]: one forward per scale through one KV cache."""
    batch_labels, f_hat = prepare(net, quantizer, labels, sampling)
    c, N = net.config, labels.shape[0]
    cond = net.class_condition(batch_labels)  # [N or 2N, C]: the guided batch is [cond; null]
    cache = net.new_cache(cond.shape[0])
    x = net.start_tokens(cond)
    tokens, logprobs = [], []
    for k, span in enumerate(c.scale_slices):
        logits = net.run(x, cond, None, cache)  # [N or 2N, pn^2, V]
        ids, logp = draw_scale(logits, N, k, c.num_scales, sampling, generator)
        tokens.append(ids)
        logprobs.append(logp)
        f_hat, next_input = quantizer.accumulate(f_hat, k, ids)  # next_input: [N, pn_{k+1}^2, Cvae]
        if next_input is not None:
            x = net.scale_input(next_input.to(x.dtype), span.stop)
            if sampling.guided:  # both halves continue from the same sampled tokens
                x = x.repeat(2, 1, 1)
    return VARSample(torch.cat(tokens, 1), torch.cat(logprobs, 1), f_hat)


@torch.no_grad()
def sample_scales_nocache(net: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor,
                          sampling: SamplingConfig,
                          generator: torch.Generator | None = None) -> VARSample:
    """The same sampler recomputing every earlier scale at each step (teacher-forced, masked): the
    reference for tests and benchmarks."""
    batch_labels, f_hat = prepare(net, quantizer, labels, sampling)
    c, N = net.config, labels.shape[0]
    inputs = torch.zeros(N, 0, c.cvae, device=labels.device, dtype=f_hat.dtype)
    tokens, logprobs = [], []
    for k, span in enumerate(c.scale_slices):
        batch_inputs = inputs.repeat(2, 1, 1) if sampling.guided else inputs
        logits = net(batch_labels, batch_inputs)[:, span]  # [N or 2N, pn^2, V]
        ids, logp = draw_scale(logits, N, k, c.num_scales, sampling, generator)
        tokens.append(ids)
        logprobs.append(logp)
        f_hat, next_input = quantizer.accumulate(f_hat, k, ids)
        if next_input is not None:
            inputs = torch.cat([inputs, next_input], dim=1)
    return VARSample(torch.cat(tokens, 1), torch.cat(logprobs, 1), f_hat)


def token_logprobs(net: VAR, tokenizer: MSVQVAE, labels: torch.Tensor, tokens: torch.Tensor,
                   temperature: float = 1.0, drop_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies [N, L] of `tokens` [N, L] under the conditional policy
    (`drop_labels`: each label replaced by the null class with the network's cond-dropout rate)."""
    with torch.no_grad():  # the tokenizer is frozen: its features are data, not parameters
        inputs = tokenizer.var_input(tokens)  # [N, L - first_l, Cvae]
    logp = (net(labels, inputs, drop_labels=drop_labels) / temperature).log_softmax(-1)  # [N, L, V]
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def next_scale_loss(net: VAR, tokenizer: MSVQVAE, labels: torch.Tensor, tokens: torch.Tensor,
                    drop_labels: bool = True) -> torch.Tensor:
    """Pretraining loss: mean cross-entropy of every token of `tokens` [N, L], labels dropped to the null
    class with cond_drop_rate when `drop_labels`."""
    with torch.no_grad():
        inputs = tokenizer.var_input(tokens)
    logits = net(labels, inputs, drop_labels=drop_labels)  # [N, L, V]
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def load_var(path: str | Path, config: VARConfig) -> VAR:
    """VAR weights from `var_d16.pth` ... `var_d30.pth` (bare state dicts; `weights_only=True`); the file's
    -inf mask entries become `MASKED`."""
    net = load_into(VAR(config), read_state_dict(path), str(path)).eval()
    with torch.no_grad():
        net.attn_bias_for_masking.clamp_(min=MASKED)
    return net


def load_msvq(path: str | Path, config: MSVQConfig) -> MSVQVAE:
    """The VQVAE from `vae_ch160v4096z32.pth` (a bare state dict; `weights_only=True`)."""
    return load_into(MSVQVAE(config), read_state_dict(path), str(path)).eval()


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write the bare state dict, as VAR's published files are (read back with `read_state_dict`, weights
    only), atomically: a killed writer never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


class VARPolicy(Policy):
    """VAR as a policy: condition ids map to class labels, one forward per scale.

    `net` is the VAR transformer (its state dict is VAR's layout); the multi-scale VQVAE `tokenizer`
    builds the transformer's inputs from tokens, samples' f_hat, and decodes. `condition_classes`
    [num_conditions] gives each condition id's class label (default: the identity over the classes);
    a task with (class, style) pairs maps every pair to its class, so the policy sees only the class.
    """

    def __init__(self, net: VAR, tokenizer: MSVQVAE, condition_classes: Sequence[int] | torch.Tensor | None = None):
        check_pair(net, tokenizer.quantize)
        super().__init__(net, tokenizer.eval().requires_grad_(False))
        c = net.config
        table = torch.arange(c.num_classes) if condition_classes is None else torch.as_tensor(condition_classes)
        table = table.long().flatten()
        if table.numel() == 0 or int(table.min()) < 0 or int(table.max()) >= c.num_classes:
            raise ValueError(f"condition_classes must be class labels in [0, {c.num_classes - 1}], got "
                             f"{table.tolist()[:10]}")
        self.register_buffer("condition_classes", table, persistent=False)
        self.num_conditions = table.numel()
        self.num_tokens = c.num_tokens
        self.vocab_size = c.vocab_size

    def labels(self, conditions: torch.Tensor) -> torch.Tensor:
        self.check_conditions(conditions)
        return self.condition_classes[conditions]

    def forward(self, conditions: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                drop_conditions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.net, self.tokenizer, self.labels(conditions), tokens, temperature,
                              drop_labels=drop_conditions)

    @torch.no_grad()
    def rollout(self, conditions: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Rollout:
        sample = sample_scales(self.net, self.tokenizer.quantize, self.labels(conditions), sampling, generator)
        return Rollout(sample.tokens, sample.logprobs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(tokens)

    def forward_passes(self, sampling: SamplingConfig) -> float:
        """Sequence rows through the network per image, the unit LlamaGen's count uses: one row per image
        per network call, two under guidance. VAR makes K calls (one per scale) where LlamaGen makes one
        per token, so this is K, or 2K guided (20 for VAR's 10 scales against LlamaGen's 512 at 256 px).
        It counts sequential calls, not work: a VAR call carries a whole scale (pn^2 positions), and all
        calls together process L = sum(pn^2) positions per row (680 at 256 px, LlamaGen 256)."""
        K = self.net.config.num_scales
        return float(2 * K if sampling.guided else K)
