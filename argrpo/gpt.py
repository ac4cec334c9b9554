"""The class-conditional LlamaGen GPT ("c2i"): a Llama-style decoder over VQ image tokens.

Same module names, shapes and maths as LlamaGen, so checkpoints load both ways: pre-norm RMSNorm in
float32, SwiGLU feed-forward, no biases, 2D rotary embedding with interleaved pairs and zeroed class
rows, a separate output head, and a class table with one extra (null) row for classifier-free
guidance. Any square token grid works with the same weights (256 tokens at 256 px, 576 at 384 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.config import ConfigError, require


@dataclass(frozen=True)
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: n_head (no released LlamaGen config uses GQA)
    vocab_size: int = 16384
    num_classes: int = 1000
    cls_token_num: int = 1
    block_size: int = 256  # image tokens per sample, a square grid
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to this
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        require(self.dim > 0 and self.n_layer > 0 and self.n_head > 0, "dim/n_layer/n_head", "must be > 0",
                (self.dim, self.n_layer, self.n_head))
        require(self.dim % self.n_head == 0, "dim", f"must be divisible by n_head={self.n_head}", self.dim)
        require(self.head_dim % 4 == 0, "dim", "must give a head_dim divisible by 4 (2D RoPE)", self.dim)
        g = math.isqrt(self.block_size)
        require(g * g == self.block_size, "block_size", "must be a square number of tokens", self.block_size)
        require(self.vocab_size > 0, "vocab_size", "must be > 0", self.vocab_size)
        require(self.num_classes > 0, "num_classes", "must be > 0", self.num_classes)
        require(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob", "must be in [0, 1)",
                self.class_dropout_prob)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of


GPT_PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    # small presets for the embedded default and the tests
    "small": dict(n_layer=4, n_head=4, dim=128),
    "tiny": dict(n_layer=2, n_head=2, dim=32),
}


def gpt_config(preset: str, **overrides) -> GPTConfig:
    """The named preset's config with `overrides` (vocab_size, num_classes, block_size, ...)."""
    if preset not in GPT_PRESETS:
        raise ConfigError(f"unknown GPT preset {preset!r}; valid presets: {', '.join(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[preset], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the norm is computed in float32 whatever the activation dtype
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Keys and values of every layer for one sampling call, allocated once."""

    def __init__(self, n_layer: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # positions filled so far


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of `x` [B, L, H, D] by `freqs` [L, D/2, 2] (cos, sin)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xp.size(1), 1, xp.size(3), 2)
    out = torch.stack(
        [xp[..., 0] * f[..., 0] - xp[..., 1] * f[..., 1], xp[..., 1] * f[..., 0] + xp[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def rope_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """[cls_token_num + g*g, head_dim/2, 2]: rows then columns, zero rows for the class positions."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # [g, head_dim/4]
    grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # [g, g, head_dim/2]: first half follows the row, second half the column
    cache = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    # cos = sin = 0 makes the class token's query and key zero in every layer, as LlamaGen does
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, L, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(B, L, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rotary(k.view(B, L, self.kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k, v = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
            causal = start == 0 and L > 1
            if start > 0 and L > 1:  # a chunk after a prefix: each new position sees the prefix and itself
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
        if self.kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_head // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class table with a null row (id `num_classes`) for the unconditional branch."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, drop: bool = False) -> torch.Tensor:
        if drop and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        freqs = rope_2d(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        self.register_buffer("freqs_cis", freqs, persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def check_labels(self, labels: torch.Tensor, allow_null: bool = False) -> None:
        top = self.config.num_classes + int(allow_null)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
            bad = labels[(labels < 0) | (labels >= top)][0].item()
            raise ValueError(f"class id {bad} out of range [0, {top - 1}]")

    def forward(self, idx: torch.Tensor, cond_idx: torch.Tensor, cache: KVCache | None = None,
                drop_labels: bool = False) -> torch.Tensor:
        """Teacher-forced logits. idx: [B, L] image tokens (L < block_size); cond_idx: [B].

        Returns logits [B, L + cls_token_num, V] in float32; position j (after the class token)
        predicts image token j. `drop_labels` replaces labels by the null class with
        `class_dropout_prob` (pretraining only: it is explicit so that RL updates in train mode
        never drop the label by accident).
        """
        x = torch.cat([self.cls_embedding(cond_idx, drop_labels)[:, None], self.tok_embeddings(idx)], dim=1)
        start = 0 if cache is None else cache.length
        return self._run(x, start, cache)

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        freqs = self.freqs_cis[start : start + x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.output(self.norm(x)).float()

    def prefill(self, cond_idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Class token into an empty cache; logits of the first image token [B, V]."""
        return self._run(self.cls_embedding(cond_idx)[:, None], 0, cache)[:, -1]

    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One image token [B] into the cache; logits of the next one [B, V]."""
        return self._run(self.tok_embeddings(token)[:, None], cache.length, cache)[:, -1]

    def new_cache(self, batch: int) -> KVCache:
        c, p = self.config, self.output.weight
        return KVCache(c.n_layer, batch, c.kv_heads, c.cls_token_num + c.block_size, c.head_dim,
                       p.dtype, p.device)

    def with_block_size(self, block_size: int) -> GPT:
        """The same weights on another token grid (e.g. 256 -> 576 tokens for 384 px)."""
        other = GPT(replace(self.config, block_size=block_size)).to(self.output.weight.device)
        other.load_state_dict(self.state_dict())
        return other


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
