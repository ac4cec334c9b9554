"""VAR's multi-scale residual VQVAE: one image becomes K token maps, from 1x1 up to the latent grid.

Module names and shapes follow VAR's `VQVAE`, so the released `vae_ch160v4096z32.pth` (a bare state
dict) loads key for key: `encoder.down.{i}.block.{j}`, `encoder.down.{i}.attn.{j}` (fused `qkv` and
`proj_out` 1x1 convs), `encoder.mid.{block_1,attn_1,block_2}`, the mirrored `decoder.up.{i}`,
`quantize.embedding` (V x Cvae), the four shared residual convs `quantize.quant_resi.qresi_ls.{0..3}`,
the usage buffer `quantize.ema_vocab_hit_SV` [K, V], and 3x3 `quant_conv` / `post_quant_conv`.

The quantiser, from the smallest scale k = 0 to the largest K-1, with f the encoder's latent
[B, Cvae, h, w] and f_rest = f, f_hat = 0 at the start:
    z_k     = area-downsample(f_rest) to pn_k x pn_k (the last scale is the full grid, not resampled)
    token   = nearest code of z_k by plain L2 distance (codes are not normalised)
    h_k     = phi_k(bicubic-upsample(embedding[token]) to h x w)   (no upsampling at the last scale)
    f_hat  += h_k;  f_rest -= h_k
with phi(h) = (1 - 0.5) h + 0.5 conv3x3(h). Four phi convs are shared by the K scales: scale k uses the
conv whose tick in linspace(1/12, 11/12, 4) lies nearest to k / (K - 1). The decoder reads f_hat.

The transformer sees the same pyramid: its input for scale k + 1 is area-downsample(f_hat after scales
0..k) to pn_{k+1} x pn_{k+1} (`var_input`), for teacher forcing and sampling alike.
Token ids of one image are kept flat, [L] with L = sum(pn_k^2), scale after scale, each in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from argrpo.config import ConfigError, require
from argrpo.vq import Downsample, ResnetBlock, Upsample, swish

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class MSVQConfig:
    vocab_size: int = 4096  # V
    cvae: int = 32  # Cvae: channels of the latent and of every code vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder has one more per level, as in VAR
    norm_groups: int = 32
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS  # side of each scale's token map; the last is the latent grid
    phi_count: int = 4  # phi convs shared by the scales (VAR's share_quant_resi)
    phi_ratio: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    beta: float = 0.25  # commitment loss weight

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        require(self.vocab_size > 0, "vocab_size", "must be > 0", self.vocab_size)
        require(self.cvae > 0, "cvae", "must be > 0", self.cvae)
        require(len(self.ch_mult) >= 1, "ch_mult", "must have at least one level", self.ch_mult)
        for c in [self.ch * m for m in self.ch_mult]:
            require(c % self.norm_groups == 0, "ch", f"x ch_mult must divide into {self.norm_groups} groups", c)
        require(len(self.patch_nums) >= 2, "patch_nums", "must list at least two scales", self.patch_nums)
        require(all(p >= 1 for p in self.patch_nums) and list(self.patch_nums) == sorted(set(self.patch_nums)),
                "patch_nums", "must be strictly increasing positive sides", self.patch_nums)
        require(self.phi_count >= 2, "phi_count", "must be >= 2 (VAR's partially shared phi)", self.phi_count)
        require(0.0 < self.phi_ratio <= 1.0, "phi_ratio", "must be in (0, 1]", self.phi_ratio)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Side of the latent grid: the last scale."""
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.grid * self.downsample

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def scale_slices(self) -> list[slice]:
        """Where each scale's tokens lie in the flat [L] sequence."""
        ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        return [slice(end - p * p, end) for p, end in zip(self.patch_nums, ends, strict=True)]


MSVQ_PRESETS: dict[str, dict] = {
    # VAR's released tokenizer vae_ch160v4096z32.pth: 16x downsampling, 256 px -> 16x16, 680 tokens
    "VAR-VQVAE": dict(),
    # the embedded default: 16 px digits, 4x downsampling -> 4x4 latent, scales 1, 2, 3, 4 (30 tokens)
    "small": dict(vocab_size=256, cvae=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                  patch_nums=(1, 2, 3, 4)),
    # tests: 8 px images, 2x downsampling -> 4x4 latent, scales 1, 2, 3, 4
    "tiny": dict(vocab_size=64, cvae=8, ch=16, ch_mult=(1, 1), num_res_blocks=1, norm_groups=8,
                 patch_nums=(1, 2, 3, 4)),
}


def msvq_config(preset: str, **overrides) -> MSVQConfig:
    if preset not in MSVQ_PRESETS:
        raise ConfigError(f"unknown multi-scale VQVAE preset {preset!r}; valid presets: {', '.join(MSVQ_PRESETS)}")
    return MSVQConfig(**{**MSVQ_PRESETS[preset], **overrides})


class FusedAttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused q|k|v 1x1 conv, as VAR's VQVAE has it."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each [B, HW, C]
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, attention after each at the lowest."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks))
        self.attn = nn.ModuleList(FusedAttnBlock(cout, groups) for _ in range(blocks if attention else 0))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = FusedAttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: MSVQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            level = Level(block_in, c.ch * mult, c.num_res_blocks, c.norm_groups, attention=i == levels - 1)
            block_in = c.ch * mult
            if i != levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = Middle(block_in, c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c.cvae, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: MSVQConfig):
        super().__init__()
        levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.cvae, block_in, 3, padding=1)
        self.mid = Middle(block_in, c.norm_groups)
        up: list[Level] = []
        for i in reversed(range(levels)):  # built from the lowest resolution up, stored as up.0 = highest
            level = Level(block_in, c.ch * c.ch_mult[i], c.num_res_blocks + 1, c.norm_groups,
                          attention=i == levels - 1)
            block_in = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(c.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - ratio) h + ratio conv3x3(h): the residual refinement of an upsampled code map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhi(nn.Module):
    """`phi_count` phi convs shared by the K scales; scale k takes the one whose tick is nearest k / (K - 1)."""

    def __init__(self, channels: int, ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        # VAR's ticks: linspace(1/(3n), 1 - 1/(3n), n) for n = 4, linspace(1/(2n), 1 - 1/(2n), n) otherwise
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = np.linspace(margin, 1 - margin, count)

    def index(self, scale: int, num_scales: int) -> int:
        # numpy's argmin takes the first of equally near ticks, as VAR does
        return int(np.argmin(np.abs(self.ticks - scale / (num_scales - 1))))

    def at(self, scale: int, num_scales: int) -> Phi:
        return self.qresi_ls[self.index(scale, num_scales)]


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over the scales of `patch_nums` (VAR's VectorQuantizer2, plain L2)."""

    def __init__(self, c: MSVQConfig):
        super().__init__()
        self.config = c
        self.quant_resi = SharedPhi(c.cvae, c.phi_ratio, c.phi_count)
        # per-scale EMA of code usage; kept (and updated in training) so checkpoints match key for key
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(c.num_scales, c.vocab_size))
        self.embedding = nn.Embedding(c.vocab_size, c.cvae)
        self.hits_recorded = 0

    def phi(self, scale: int) -> Phi:
        return self.quant_resi.at(scale, self.config.num_scales)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, Cvae] -> ids [N] of the nearest code by squared L2 distance (no normalisation)."""
        book = self.embedding.weight.detach()
        distance = z.square().sum(1, keepdim=True) + book.square().sum(1) - 2 * z @ book.t()  # [N, V]
        return distance.argmin(1)

    def contribution(self, scale: int, codes: torch.Tensor) -> torch.Tensor:
        """Scale `scale`'s term of f_hat: codes [B, pn^2] -> phi_k(bicubic-upsample(code map)) [B, Cvae, h, w]."""
        c = self.config
        pn = c.patch_nums[scale]
        h = self.embedding(codes).transpose(1, 2).reshape(codes.shape[0], c.cvae, pn, pn)
        if scale != c.num_scales - 1:
            h = F.interpolate(h, size=(c.grid, c.grid), mode="bicubic")
        return self.phi(scale)(h)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """f [B, Cvae, h, w] -> (codes per scale, each [B, pn^2]; f_hat after each scale, each [B, Cvae, h, w])."""
        c = self.config
        if f.shape[-2:] != (c.grid, c.grid):
            raise ValueError(f"latent grid {tuple(f.shape[-2:])} does not match the last scale {c.grid}x{c.grid}")
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        codes, f_hats = [], []
        for k, pn in enumerate(c.patch_nums):
            z = f_rest if k == c.num_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            ids = self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, c.cvae)).view(f.shape[0], pn * pn)
            h = self.contribution(k, ids)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            codes.append(ids)
            f_hats.append(f_hat)
        return codes, f_hats

    def fhat_from_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Codes per scale -> f_hat [B, Cvae, h, w]: the sum of every scale's contribution."""
        return sum(self.contribution(k, ids) for k, ids in enumerate(codes))

    def var_input(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the transformer: codes per scale -> [B, L - pn_0^2, Cvae].

        Row block k (k >= 1) is area-downsample(f_hat after scales 0..k-1) to pn_k x pn_k, raster order;
        the last scale's codes are not needed (nothing comes after them).
        """
        c = self.config
        f_hat = torch.zeros(codes[0].shape[0], c.cvae, c.grid, c.grid, device=codes[0].device,
                            dtype=self.embedding.weight.dtype)
        inputs = []
        for k in range(c.num_scales - 1):
            f_hat = f_hat + self.contribution(k, codes[k])
            pn = c.patch_nums[k + 1]
            inputs.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def accumulate(self, f_hat: torch.Tensor, scale: int,
                   codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step: add scale `scale`'s codes [B, pn^2] to f_hat [B, Cvae, h, w].

        Returns the new f_hat and the transformer's input for the next scale, [B, pn_{k+1}^2, Cvae]
        (None after the last scale).
        """
        c = self.config
        f_hat = f_hat + self.contribution(scale, codes)
        if scale == c.num_scales - 1:
            return f_hat, None
        pn = c.patch_nums[scale + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def record_hits(self, codes: list[torch.Tensor]) -> None:
        """VAR's usage EMA: copy on the first batch, then decay 0.9 for 100 batches, 0.99 after."""
        for k, ids in enumerate(codes):
            hits = ids.flatten().bincount(minlength=self.config.vocab_size).float()
            if self.hits_recorded == 0:
                self.ema_vocab_hit_SV[k].copy_(hits)
            elif self.hits_recorded < 100:
                self.ema_vocab_hit_SV[k].mul_(0.9).add_(hits * 0.1)
            else:
                self.ema_vocab_hit_SV[k].mul_(0.99).add_(hits * 0.01)
        self.hits_recorded += 1

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: f [B, Cvae, h, w] -> (straight-through f_hat, codebook loss, commitment loss).

        Losses as VAR averages them over the K scales: codebook = mean_k mse(f_hat_k, f.detach()) trains the
        codes and phi convs, commitment = beta * mean_k mse(f_hat_k.detach(), f) pulls the encoder to them.
        """
        f = f.float()
        codes, f_hats = self.quantize(f)
        if self.training:
            with torch.no_grad():
                self.record_hits(codes)
        codebook_loss = sum(F.mse_loss(fh, f.detach()) for fh in f_hats) / len(f_hats)
        commit_loss = self.config.beta * sum(F.mse_loss(fh.detach(), f) for fh in f_hats) / len(f_hats)
        f_hat = f + (f_hats[-1] - f).detach()  # straight-through: the decoder's gradient reaches the encoder
        return f_hat, codebook_loss, commit_loss


class MSVQVAE(nn.Module):
    """VAR's VQVAE: encoder -> quant_conv -> multi-scale quantiser -> post_quant_conv -> decoder."""

    def __init__(self, config: MSVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(config)
        self.quant_conv = nn.Conv2d(config.cvae, config.cvae, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.cvae, config.cvae, 3, padding=1)

    def check_image_size(self, *sizes: int) -> None:
        for size in sizes:
            if size != self.config.image_size:
                raise ValueError(f"image size {size} does not fit this tokenizer: its scales end at "
                                 f"{self.config.grid}x{self.config.grid} with {self.config.downsample}x "
                                 f"downsampling, so images must be {self.config.image_size} px")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: reconstruction [B, 3, H, W], codebook loss, commitment loss (images in [-1, 1])."""
        self.check_image_size(*images.shape[-2:])
        f_hat, codebook_loss, commit_loss = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(f_hat)), codebook_loss, commit_loss

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> f [B, Cvae, h, w], the quantiser's input."""
        self.check_image_size(*images.shape[-2:])
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> codes per scale, each [B, pn^2] long."""
        return self.quantize.quantize(self.latent(images))[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> tokens [B, L], the scales concatenated."""
        return torch.cat(self.encode_scales(images), dim=1)

    def split_scales(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [B, L] -> codes per scale, each [B, pn^2]."""
        if tokens.shape[-1] != self.config.num_tokens:
            raise ValueError(f"expected {self.config.num_tokens} tokens per image (scales "
                             f"{self.config.patch_nums}), got {tokens.shape[-1]}")
        return [tokens[:, s] for s in self.config.scale_slices]

    def var_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> the transformer's teacher-forcing input [B, L - pn_0^2, Cvae]."""
        return self.quantize.var_input(self.split_scales(tokens))

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cvae, h, w] -> pixels [B, 3, H, W] in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> pixels [B, 3, H, W] in [-1, 1]."""
        return self.fhat_to_image(self.quantize.fhat_from_codes(self.split_scales(tokens)))


def scale_of_tokens(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """[L] long: the scale index of every position of the flat token sequence."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(patch_nums)])
