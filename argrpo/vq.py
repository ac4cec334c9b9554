"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8): a conv encoder-decoder with an L2-normalised codebook.

Module names and shapes follow LlamaGen's `VQModel`, so `vq_ds16_c2i.pt` loads as it is:
`encoder.*`, `decoder.*`, `quantize.embedding.weight`, `quantize.codebook_used`, `quant_conv`,
`post_quant_conv`. `decode_code` maps token ids to pixels in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.config import ConfigError, require


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder has one more per level, as in LlamaGen
    norm_groups: int = 32
    beta: float = 0.25  # commitment loss weight
    codebook_used_size: int = 65536  # LlamaGen's usage buffer; kept so checkpoints match key for key

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        require(self.codebook_size > 0, "codebook_size", "must be > 0", self.codebook_size)
        require(len(self.ch_mult) >= 1, "ch_mult", "must have at least one level", self.ch_mult)
        for c in [self.ch * m for m in self.ch_mult] + [self.z_channels]:
            require(c % self.norm_groups == 0, "ch", f"x ch_mult must divide into {self.norm_groups} groups", c)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: dict[str, dict] = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
    # the embedded default: 4x downsampling, a small codebook, narrow channels
    "small": dict(codebook_size=256, codebook_embed_dim=8, z_channels=32, ch=16, ch_mult=(1, 2, 2),
                  num_res_blocks=1, norm_groups=8, codebook_used_size=256),
    "tiny": dict(codebook_size=64, codebook_embed_dim=4, z_channels=16, ch=16, ch_mult=(1, 1),
                 num_res_blocks=1, norm_groups=8, codebook_used_size=64),
    # VQ-16's 16x downsampling with tiny channels: 384 px images are LlamaGen's 24 x 24 tokens at a cost a CPU
    # can decode (benchmarks/bench_memory.py measures real-scale image sizes with it)
    "tiny-f16": dict(codebook_size=64, codebook_embed_dim=4, z_channels=8, ch=8, ch_mult=(1, 1, 1, 1, 1),
                     num_res_blocks=1, norm_groups=4, codebook_used_size=64),
}


def vq_config(preset: str, **overrides) -> VQConfig:
    if preset not in VQ_PRESETS:
        raise ConfigError(f"unknown VQ preset {preset!r}; valid presets: {', '.join(VQ_PRESETS)}")
    return VQConfig(**{**VQ_PRESETS[preset], **overrides})


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in LlamaGen


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").type_as(x))


def middle_blocks(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups)])


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks):
                block.res.append(ResnetBlock(block_in, c.ch * mult, c.norm_groups))
                block_in = c.ch * mult
                if i == levels - 1:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(block_in, c.norm_groups))
            if i != levels - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = middle_blocks(block_in, c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = middle_blocks(block_in, c.norm_groups)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, c.ch * c.ch_mult[i], c.norm_groups))
                block_in = c.ch * c.ch_mult[i]
                if i == levels - 1:
                    block.attn.append(AttnBlock(block_in, c.norm_groups))
            if i != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(c.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.beta = c.beta
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(c.codebook_used_size))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: [B, D, h, w] -> (quantised z, straight-through; codebook loss; commitment loss; codes [B, h, w])."""
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # [B, h, w, D]
        book = self.codebook()
        # on the unit sphere the nearest code is the one with the largest dot product
        codes = (z.reshape(-1, z.shape[-1]) @ book.t()).argmax(-1).view(z.shape[:-1])
        zq = book[codes]
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = self.beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()
        return zq.permute(0, 3, 1, 2), codebook_loss, commit_loss, codes


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def check_image_size(self, *sizes: int) -> None:
        ds = self.config.downsample
        for size in sizes:  # height and width: a non-square image can fail on either
            if size % ds:
                raise ValueError(f"image size {size} is not divisible by the tokenizer's downsampling factor {ds}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction [B, 3, H, W], codebook loss, commitment loss (for training the tokenizer)."""
        self.check_image_size(*images.shape[-2:])
        zq, codebook_loss, commit_loss, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(zq)), codebook_loss, commit_loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes [B, H/ds, W/ds] long."""
        self.check_image_size(*images.shape[-2:])
        return self.quantize(self.quant_conv(self.encoder(images)))[3]

    def decode_code(self, codes: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """codes (any shape with B*h*w ids) and shape (B, D, h, w) -> pixels [B, 3, H, W] in [-1, 1]."""
        B, D, h, w = shape
        zq = self.quantize.codebook()[codes.reshape(B, h, w)].permute(0, 3, 1, 2)  # [B, D, h, w]
        return self.decoder(self.post_quant_conv(zq)).clamp(-1, 1)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] in raster order on a square grid -> pixels [B, 3, H, W] in [-1, 1]."""
        g = math.isqrt(tokens.shape[1])
        return self.decode_code(tokens, (tokens.shape[0], self.config.codebook_embed_dim, g, g))
