"""The LlamaGen GPT: a Llama-style decoder over VQ image tokens, class- ("c2i") or text-conditional ("t2i").

Same module names, shapes and maths as LlamaGen, so checkpoints load both ways: pre-norm RMSNorm in
float32, SwiGLU feed-forward, no biases, 2D rotary embedding with interleaved pairs and zeroed
condition rows, a separate output head. Any square token grid works with the same weights (256
tokens at 256 px, 576 at 384 px).

The two variants differ only in the condition prefix:
- c2i: one class token from a class table with an extra (null) row for classifier-free guidance.
- t2i: `cls_token_num` (120) caption positions. Text-encoder features (FLAN-T5-XL, 2048-d) are
  left-padded (valid tokens at the end, zeros before) and projected by a bias-free MLP
  (`cap_proj.fc1` -> GELU(tanh) -> `cap_proj.fc2`). The buffer `uncond_embedding` [120, 2048] is the
  unconditional caption (guidance, caption dropout); it keeps the caption's mask, as in LlamaGen's
  training and sampling. Padded caption positions are masked as keys in every attention (a padded
  query sees only itself, so no row is empty); the rotary rows of all caption positions are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.config import ConfigError, require

MODEL_TYPES = ("c2i", "t2i")


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
    class_dropout_prob: float = 0.1  # c2i: label dropout; t2i: caption dropout
    model_type: str = "c2i"  # c2i: class-conditional; t2i: conditioned on caption features
    caption_dim: int = 2048  # t2i: width of the text features (FLAN-T5-XL)

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
        require(self.model_type in MODEL_TYPES, "model_type", f"must be one of {', '.join(MODEL_TYPES)}",
                self.model_type)
        if self.model_type == "c2i":
            require(self.cls_token_num == 1, "cls_token_num", "must be 1 for a class-conditional model",
                    self.cls_token_num)
        else:
            require(self.cls_token_num >= 1, "cls_token_num", "must be >= 1 caption positions", self.cls_token_num)
            require(self.caption_dim > 0, "caption_dim", "must be > 0", self.caption_dim)

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


# what LlamaGen's text-to-image models add to a preset: 120 caption positions of FLAN-T5-XL features
T2I_DEFAULTS: dict = dict(cls_token_num=120, caption_dim=2048)


def gpt_config(preset: str, **overrides) -> GPTConfig:
    """The named preset's config with `overrides` (vocab_size, num_classes, block_size, ...).

    `model_type="t2i"` gives LlamaGen's text-to-image model of that size (`T2I_DEFAULTS`: 120 caption
    positions, 2048-d captions, unless overridden): GPT-B / L / XL t2i have 112,282,368 / 345,031,680 /
    777,678,080 parameters.
    """
    if preset not in GPT_PRESETS:
        raise ConfigError(f"unknown GPT preset {preset!r}; valid presets: {', '.join(GPT_PRESETS)}")
    t2i = T2I_DEFAULTS if overrides.get("model_type") == "t2i" else {}
    return GPTConfig(**{**GPT_PRESETS[preset], **t2i, **overrides})


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
        # [batch, max_len] bool: which positions may be attended to (False on padded caption tokens);
        # None: every position (class-conditional, or captions without padding)
        self.valid: torch.Tensor | None = None


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

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: KVCache | None, layer: int,
                key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` [B, 1, L, S] bool (True: attend), built by `attention_mask`, replaces the causal rule
        when captions are padded; S is the number of positions in the cache after this chunk (or L).

        With `positions` [L] long (a tensor: the static-shape path of `forward_at`), the chunk is written
        at those cache positions and attends to the first S cache positions under `key_mask` [B or 1, 1, L, S]
        (`masked_attention`), so that the shapes of a decode step do not depend on the position.
        """
        B, L, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(B, L, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rotary(k.view(B, L, self.kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if positions is not None:  # the cache keeps its dtype under autocast, as the slice copy below does
            cache.k[layer][:, :, positions] = k.to(cache.k[layer].dtype)
            cache.v[layer][:, :, positions] = v.to(cache.v[layer].dtype)
            S = key_mask.shape[-1]  # the first S cache positions: a fixed length per graph
            k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
        elif cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k, v = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
            causal = start == 0 and L > 1
            if start > 0 and L > 1:  # a chunk after a prefix: each new position sees the prefix and itself
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
        if key_mask is not None:
            mask, causal = key_mask, False
        if self.kv_heads != self.n_head:
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_head // self.kv_heads, dim=1)
        if positions is not None:
            y = masked_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), -inf where `mask` is False) v, with q [B, H, L, D], k and v [B, H, S, D], mask
    [B or 1, 1, L, S] bool; [B, H, L, D].

    The static-shape path's attention, written as matmuls so that, compiled, the masking and the softmax
    fuse into one kernel between them (on a CPU the compiled decode step ran 1.3-1.5x faster than eager
    this way, and slower than eager through scaled_dot_product_attention). Scores are softmaxed in
    float32, as the fused attention kernels accumulate them.
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, L, S]
    probs = scores.float().masked_fill(~mask, float("-inf")).softmax(-1)
    return probs.to(v.dtype) @ v


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: KVCache | None, layer: int,
                key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, cache, layer, key_mask, positions)
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


class CaptionMLP(nn.Module):
    """LlamaGen's caption projection: Linear -> GELU(tanh) -> Linear, no biases (keys fc1, fc2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> embeddings [B, T, dim]; `uncond_embedding` is the null caption.

    `uncond_embedding` is a persistent buffer (it is in LlamaGen's checkpoints but is no parameter),
    initialised as LlamaGen does: N(0, 1) / sqrt(caption_dim).
    """

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, captions: torch.Tensor, drop: bool = False) -> torch.Tensor:
        if drop and self.dropout_prob > 0:
            rows = torch.rand(captions.shape[0], device=captions.device) < self.dropout_prob
            captions = torch.where(rows[:, None, None], self.uncond_embedding.to(captions.dtype), captions)
        return self.cap_proj(captions.to(self.cap_proj.fc1.weight.dtype))


def attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Which keys each new query may attend to: [B, 1, L, S] bool from key validity `valid` [B, S].

    The new queries are positions start..S-1. Query i sees key j when j <= i and key j is valid, and
    always itself, so a padded caption position (which nothing else sees) never has an empty row.
    """
    S = valid.shape[1]
    query = torch.arange(start, S, device=valid.device)[:, None]  # [L, 1]
    key = torch.arange(S, device=valid.device)[None]  # [1, S]
    return ((key <= query) & (valid[:, None, :] | (key == query)))[:, None]


def cache_mask(positions: torch.Tensor, length: int, valid: torch.Tensor | None) -> torch.Tensor:
    """`attention_mask` over the first `length` cache positions for queries at `positions` [L] (a tensor).

    Key j is visible to the query at position p when j <= p and j is valid (or j == p); the positions
    after p, not yet written, are masked. [B, 1, L, length] bool with `valid` [B, >= length], else
    [1, 1, L, length].
    """
    query = positions[:, None]  # [L, 1]
    key = torch.arange(length, device=positions.device)[None]  # [1, length]
    if valid is None:
        return (key <= query)[None, None]
    return ((key <= query) & (valid[:, None, :length] | (key == query)))[:, None]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob,
                                                 config.cls_token_num)
        else:
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

    def check_captions(self, captions: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Captions must be [B, cls_token_num, caption_dim] with a bool mask [B, cls_token_num] (or None)."""
        c = self.config
        if c.model_type != "t2i":
            raise ValueError("captions condition a t2i model; this GPT is class-conditional (model_type c2i)")
        if captions.ndim != 3 or tuple(captions.shape[1:]) != (c.cls_token_num, c.caption_dim):
            raise ValueError(f"captions must be [B, {c.cls_token_num}, {c.caption_dim}], got {tuple(captions.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(captions.shape[:2])):
            raise ValueError(f"caption mask must be bool {tuple(captions.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")

    def embed_condition(self, cond: torch.Tensor, drop: bool = False) -> torch.Tensor:
        """The condition prefix [B, cls_token_num, dim]: class labels [B] (c2i) or caption features (t2i)."""
        if self.config.model_type == "t2i":
            return self.cls_embedding(cond, drop)
        return self.cls_embedding(cond, drop)[:, None]

    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional branch's condition: the null class [batch] (c2i) or the null caption
        [batch, cls_token_num, caption_dim] (t2i)."""
        if self.config.model_type == "t2i":
            null = self.cls_embedding.uncond_embedding
            return null[None].expand(batch, -1, -1)
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=self.output.weight.device)

    def forward(self, idx: torch.Tensor, cond_idx: torch.Tensor, cache: KVCache | None = None,
                drop_labels: bool = False, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits. idx: [B, L] image tokens (L < block_size); cond_idx: the condition,
        class labels [B] (c2i) or left-padded caption features [B, cls_token_num, caption_dim] (t2i) with
        `cond_mask` [B, cls_token_num] bool, True on valid caption tokens (None: all valid).

        Returns logits [B, L + cls_token_num, V] in float32; position cls_token_num - 1 + j predicts
        image token j. `drop_labels` replaces labels by the null class (captions by the null caption)
        with `class_dropout_prob` (pretraining only: it is explicit so that RL updates in train mode
        never drop the condition by accident).
        """
        x = torch.cat([self.embed_condition(cond_idx, drop_labels), self.tok_embeddings(idx)], dim=1)
        start = 0 if cache is None else cache.length
        valid = None
        if cond_mask is not None:
            if cache is None:
                valid = torch.cat([cond_mask, cond_mask.new_ones(idx.shape)], dim=1)  # [B, cls + L]
            else:
                self.mask_cache(cache, cond_mask)
        return self._run(x, start, cache, valid)

    def mask_cache(self, cache: KVCache, cond_mask: torch.Tensor) -> None:
        """Record which caption positions of a fresh cache are padding, for every later step."""
        if cache.length != 0:
            raise ValueError(f"a caption mask must come with the first chunk; the cache holds {cache.length} positions")
        valid = torch.ones(cond_mask.shape[0], cache.k[0].shape[2], dtype=torch.bool, device=cond_mask.device)
        valid[:, : cond_mask.shape[1]] = cond_mask
        cache.valid = valid

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        freqs = self.freqs_cis[start : start + x.shape[1]]
        if cache is not None and cache.valid is not None:
            valid = cache.valid[:, : start + x.shape[1]]
        key_mask = None if valid is None else attention_mask(valid, start)  # [B, 1, L, S]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, cache, i, key_mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.output(self.norm(x)).float()

    def prefill(self, cond_idx: torch.Tensor, cache: KVCache, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The condition (class token, or captions with their mask) into an empty cache; logits of the
        first image token [B, V]."""
        if cond_mask is not None:
            self.mask_cache(cache, cond_mask)
        return self._run(self.embed_condition(cond_idx), 0, cache)[:, -1]

    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One image token [B] into the cache; logits of the next one [B, V]."""
        return self._run(self.tok_embeddings(token)[:, None], cache.length, cache)[:, -1]

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   length: int | None = None) -> torch.Tensor:
        """`_run` with static shapes, for compiled sampling: embeddings x [B, L, dim] at cache `positions`
        [L] long (a tensor, so that one graph serves every decode step) -> logits [B, L, V] float32.

        Attention runs over the first `length` cache positions (default: all; at least max(positions) + 1)
        under `cache_mask`, so no shape depends on how many positions are filled; `cache.length` is left to
        the caller (a Python int would be a constant of the graph). The values equal `_run`'s up to
        rounding (`masked_attention` sums the masked keys' exact zeros, in another order).
        """
        freqs = self.freqs_cis[positions]  # [L, head_dim/2, 2]
        key_mask = cache_mask(positions, length or cache.k[0].shape[2], cache.valid)  # [B or 1, 1, L, length]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, cache, i, key_mask, positions)
        return self.output(self.norm(x)).float()

    def prefill_at(self, cond_idx: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`prefill` with static shapes (`forward_at`): the condition at positions 0..cls_token_num-1 of an
        empty cache (its caption mask already recorded by `mask_cache`); logits of the first image token [B, V]."""
        return self.forward_at(self.embed_condition(cond_idx), positions, cache, self.config.cls_token_num)[:, -1]

    def decode_at(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache,
                  length: int | None = None) -> torch.Tensor:
        """`decode_one` with static shapes (`forward_at`): image token [B] at cache `position` [1] long,
        attending to the first `length` positions (> position); logits of the next one [B, V]."""
        return self.forward_at(self.tok_embeddings(token)[:, None], position, cache, length)[:, -1]

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
