"""The image generator: a GPT over the tokens of a VQ tokenizer, built from one `model` config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from argrpo.config import Float, Int, require
from argrpo.distributed import Dist, derived_seed, shard_indices
from argrpo.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_config
from argrpo.policy import Policy, Rollout
from argrpo.sampling import SamplingConfig, sample_tokens, token_logprobs
from argrpo.vq import VQ_PRESETS, VQConfig, VQModel, vq_config


@dataclass(frozen=True)
class ModelConfig:
    gpt_preset: str = "small"
    vq_preset: str = "small"
    image_size: Int = 16
    num_classes: Int = 10
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
        require(self.num_classes >= 1, "num_classes", "must be >= 1", self.num_classes)
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


@dataclass(frozen=True)
class SampleConfig:
    """The `sample` section: the class-balanced, seeded images every configuration is evaluated on."""

    num_images: Int = 1000
    batch_size: Int = 250
    cfg_scale: Float = 2.0  # the base model's guided row
    temperature: Float = 1.0
    top_k: Int = 0
    top_p: Float = 1.0
    seed: Int = 1234
    save_png: Int = 100  # PNG files written per configuration (all go into the .npz)

    def __post_init__(self) -> None:
        require(self.num_images >= 2, "num_images", "must be >= 2", self.num_images)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(self.cfg_scale > 1, "cfg_scale", "must be > 1 (the guided row of the base model)", self.cfg_scale)
        require(self.save_png >= 0, "save_png", "must be >= 0", self.save_png)
        self.sampling(self.cfg_scale)  # temperature, top-k and top-p are checked where they are used

    def sampling(self, cfg_scale: float) -> SamplingConfig:
        return SamplingConfig(cfg_scale=cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def build_models(cfg: ModelConfig) -> tuple[GPT, VQModel]:
    return GPT(cfg.gpt()), VQModel(cfg.vq())


class LlamaGenPolicy(Policy):
    """LlamaGen class-to-image as a policy: condition ids are class labels, one token per forward.

    `net` is the GPT (its state dict is LlamaGen's layout); the VQ tokenizer decodes.
    """

    def __init__(self, gpt: GPT, vq: VQModel):
        super().__init__(gpt, vq.eval().requires_grad_(False))
        self.num_conditions = gpt.config.num_classes
        self.num_tokens = gpt.config.block_size
        self.vocab_size = gpt.config.vocab_size

    def forward(self, conditions: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                drop_conditions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.net, conditions, tokens, temperature, drop_labels=drop_conditions)

    @torch.no_grad()
    def rollout(self, conditions: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Rollout:
        sample = sample_tokens(self.net, conditions, sampling, generator)
        return Rollout(sample.tokens, sample.logprobs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(tokens)

    def forward_passes(self, sampling: SamplingConfig) -> float:
        return forward_passes_per_image(sampling, self.num_tokens)


@torch.no_grad()
def generate_sharded(policy: Policy, conditions: torch.Tensor, sampling: SamplingConfig, batch_size: int,
                     seed: int, dist: Dist | None = None, progress: bool = True, desc: str = "sample",
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the images for condition ids [N]: (global indices [n] long, images
    [n, 3, H, W] on CPU).

    The N images are cut by index into chunks of `batch_size`; chunk c is one sampling call with its own
    generator seeded `derived_seed(seed, c)`, and the chunks are spread over the processes in contiguous runs.
    So each image depends on (seed, batch_size, its index) and not on how many processes share the work,
    and the shards of all processes tile 0..N-1 in rank order. Keep batch_size <= N / world_size, or some
    processes get no chunk.
    """
    dist = dist or Dist()
    device = policy.device
    n = len(conditions)
    chunks = shard_indices(math.ceil(n / batch_size), dist.rank, dist.world_size)
    start, stop = min(chunks.start * batch_size, n), min(chunks.stop * batch_size, n)
    out = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for c in tqdm(chunks, desc=desc, disable=not (progress and dist.is_main)):
        batch = conditions[c * batch_size : (c + 1) * batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(derived_seed(seed, c))
        with autocast:
            tokens = policy.rollout(batch, sampling, generator).tokens
        out.append(policy.decode(tokens).float().cpu())
    if not out:  # a process without a chunk still returns a well-shaped tensor
        side = policy.decode(torch.zeros(1, policy.num_tokens, dtype=torch.long, device=device)).shape[-1]
        out.append(torch.empty(0, 3, side, side))
    return torch.arange(start, stop), torch.cat(out)


def forward_passes_per_image(sampling: SamplingConfig, block_size: int) -> float:
    """Model forward passes (sequence rows) spent per image: CFG doubles the guided steps."""
    guided = block_size if sampling.cfg_interval < 0 else min(block_size, sampling.cfg_interval + 2)
    # once the batch is doubled it stays doubled for the whole call (one shared KV cache)
    return float(2 * block_size) if sampling.guided and guided > 0 else float(block_size)
