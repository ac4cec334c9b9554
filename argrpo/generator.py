"""The image generator: a GPT over the tokens of a VQ tokenizer, built from one `model` config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from argrpo.config import require
from argrpo.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_config
from argrpo.sampling import SamplingConfig, sample_tokens
from argrpo.vq import VQ_PRESETS, VQConfig, VQModel, vq_config


@dataclass(frozen=True)
class ModelConfig:
    gpt_preset: str = "small"
    vq_preset: str = "small"
    image_size: int = 16
    num_classes: int = 10
    source: str = "embedded"  # embedded: trained by the pretrain stage; weights: files named in `weights`
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (sampling and the GRPO forward passes)

    def __post_init__(self) -> None:
        require(self.gpt_preset in GPT_PRESETS, "gpt_preset", f"must be one of {', '.join(GPT_PRESETS)}",
                self.gpt_preset)
        require(self.vq_preset in VQ_PRESETS, "vq_preset", f"must be one of {', '.join(VQ_PRESETS)}", self.vq_preset)
        require(self.source in ("embedded", "weights"), "source", "must be 'embedded' or 'weights'", self.source)
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda", self.device)
        require(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16", self.precision)
        ds = self.vq().downsample
        require(self.image_size % ds == 0, "image_size", f"must be divisible by the tokenizer's downsampling {ds}",
                self.image_size)

    def vq(self) -> VQConfig:
        return vq_config(self.vq_preset)

    def gpt(self) -> GPTConfig:
        grid = self.image_size // self.vq().downsample
        return gpt_config(self.gpt_preset, vocab_size=self.vq().codebook_size, num_classes=self.num_classes,
                          block_size=grid * grid)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def build_models(cfg: ModelConfig) -> tuple[GPT, VQModel]:
    return GPT(cfg.gpt()), VQModel(cfg.vq())


@torch.no_grad()
def generate_images(gpt: GPT, vq: VQModel, labels: torch.Tensor, sampling: SamplingConfig, batch_size: int,
                    generator: torch.Generator | None = None, progress: bool = True, desc: str = "sample",
                    precision: str = "fp32") -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for `labels` [N], sampled in batches on the models' device."""
    device = next(gpt.parameters()).device
    out = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress):
        batch = labels[i : i + batch_size].to(device)
        with autocast:
            tokens = sample_tokens(gpt, batch, sampling, generator).tokens
        out.append(vq.decode_tokens(tokens).float().cpu())
    return torch.cat(out)


def forward_passes_per_image(sampling: SamplingConfig, block_size: int) -> float:
    """Model forward passes (sequence rows) spent per image: CFG doubles the guided steps."""
    guided = block_size if sampling.cfg_interval < 0 else min(block_size, sampling.cfg_interval + 1)
    # once the batch is doubled it stays doubled for the whole call (one shared KV cache)
    return float(2 * block_size) if sampling.guided and guided > 0 else float(block_size)
