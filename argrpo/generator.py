"""The `model` section of every family, LlamaGen class-to-image as a policy, and seeded sharded generation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from argrpo.config import ConfigError, Float, Int, require
from argrpo.distributed import Dist, derived_seed, shard_indices
from argrpo.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_config
from argrpo.msvq import MSVQ_PRESETS, MSVQConfig, msvq_config
from argrpo.policy import Policy, Rollout
from argrpo.sampling import SamplingConfig, sample_tokens, token_logprobs
from argrpo.var import VAR_PRESETS, VARConfig, var_config
from argrpo.vq import VQ_PRESETS, VQConfig, VQModel, vq_config

# the model families the pipeline runs (argrpo.families builds each one's policy)
FAMILIES = ("llamagen", "llamagen_t2i", "var")


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section: which family, which presets, and where it runs.

    `gpt_preset` names the transformer and `vq_preset` the tokenizer of every family: GPT and VQ presets
    (argrpo.gpt, argrpo.vq) for llamagen and llamagen_t2i, VAR and multi-scale VQVAE presets (argrpo.var,
    argrpo.msvq) for var.
    """

    family: str = "llamagen"  # llamagen (class-to-image) | llamagen_t2i (text-to-image) | var (next-scale)
    gpt_preset: str = "small"
    vq_preset: str = "small"
    image_size: Int = 16
    num_classes: Int = 10  # class-conditional families: classes of the network's class table
    cls_token_num: Int = 120  # llamagen_t2i: caption positions (the text features' length)
    caption_dim: Int = 2048  # llamagen_t2i: width of the text features (FLAN-T5-XL: 2048)
    source: str = "embedded"  # embedded: trained by the pretrain stage; weights: files named in `weights`
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (sampling and the GRPO forward passes)

    def __post_init__(self) -> None:
        require(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}", self.family)
        networks, tokenizers = self.presets()
        for key, value, valid in (("gpt_preset", self.gpt_preset, networks), ("vq_preset", self.vq_preset, tokenizers)):
            require(value in valid, key, f"must be one of {', '.join(valid)} for family {self.family}", value)
        require(self.source in ("embedded", "weights"), "source", "must be 'embedded' or 'weights'", self.source)
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda", self.device)
        require(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16", self.precision)
        require(self.num_classes >= 1, "num_classes", "must be >= 1", self.num_classes)
        require(self.cls_token_num >= 1, "cls_token_num", "must be >= 1", self.cls_token_num)
        require(self.caption_dim >= 1, "caption_dim", "must be >= 1", self.caption_dim)
        if self.family == "var":
            side = self.msvq().image_size
            require(self.image_size == side, "image_size", f"must be {side} for the multi-scale VQVAE preset "
                    f"{self.vq_preset} (its last scale times its downsampling)", self.image_size)
        else:
            ds = self.vq().downsample
            require(self.image_size % ds == 0, "image_size",
                    f"must be divisible by the tokenizer's downsampling {ds}", self.image_size)

    def presets(self) -> tuple[list[str], list[str]]:
        """The valid (transformer, tokenizer) presets of this family."""
        if self.family == "var":
            return list(VAR_PRESETS), list(MSVQ_PRESETS)
        return list(GPT_PRESETS), list(VQ_PRESETS)

    @property
    def text_conditional(self) -> bool:
        return self.family == "llamagen_t2i"

    def vq(self) -> VQConfig:
        """The LlamaGen tokenizer (llamagen, llamagen_t2i)."""
        self.require_family("llamagen", "llamagen_t2i")
        return vq_config(self.vq_preset)

    def gpt(self) -> GPTConfig:
        """The LlamaGen GPT (llamagen: class-conditional; llamagen_t2i: caption-conditional)."""
        self.require_family("llamagen", "llamagen_t2i")
        grid = self.image_size // self.vq().downsample
        if self.text_conditional:
            return gpt_config(self.gpt_preset, vocab_size=self.vq().codebook_size, block_size=grid * grid,
                              model_type="t2i", cls_token_num=self.cls_token_num, caption_dim=self.caption_dim)
        return gpt_config(self.gpt_preset, vocab_size=self.vq().codebook_size, num_classes=self.num_classes,
                          block_size=grid * grid)

    def msvq(self) -> MSVQConfig:
        """VAR's multi-scale VQVAE (var)."""
        self.require_family("var")
        return msvq_config(self.vq_preset)

    def var(self) -> VARConfig:
        """The VAR transformer (var), fitted to the tokenizer's vocabulary and scales."""
        self.require_family("var")
        return var_config(self.gpt_preset, self.msvq(), num_classes=self.num_classes)

    def network(self) -> GPTConfig | VARConfig:
        """The config of the trainable transformer, whatever the family."""
        return self.var() if self.family == "var" else self.gpt()

    def tokenizer(self) -> VQConfig | MSVQConfig:
        """The config of the frozen tokenizer, whatever the family."""
        return self.msvq() if self.family == "var" else self.vq()

    @property
    def tokenizer_vocab(self) -> int:
        """Codes of the tokenizer."""
        t = self.tokenizer()
        return t.vocab_size if isinstance(t, MSVQConfig) else t.codebook_size

    def require_family(self, *families: str) -> None:
        if self.family not in families:
            raise ConfigError(f"model.family {self.family} has no such model (it belongs to {', '.join(families)})")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class SampleConfig:
    """The `sample` section: the seeded images, balanced over the evaluation condition ids, every configuration
    is evaluated on."""

    num_images: Int = 1000
    batch_size: Int = 250
    cfg_scale: Float = 2.0  # the base model's guided row
    temperature: Float = 1.0
    top_k: Int = 0
    top_p: Float = 1.0
    seed: Int = 1234
    save_png: Int = 100  # PNG files per configuration (png stage: samples_png/); never re-samples
    compile: str | bool = "off"  # off | default | reduce-overhead: the sampler as one compiled graph (same tokens)

    def __post_init__(self) -> None:
        require(self.num_images >= 2, "num_images", "must be >= 2", self.num_images)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(self.cfg_scale > 1, "cfg_scale", "must be > 1 (the guided row of the base model)", self.cfg_scale)
        require(self.save_png >= 0, "save_png", "must be >= 0", self.save_png)
        self.sampling(self.cfg_scale)  # temperature, top-k and top-p are checked where they are used

    def sampling(self, cfg_scale: float) -> SamplingConfig:
        return SamplingConfig(cfg_scale=cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              compile=self.compile)


class LlamaGenPolicy(Policy):
    """LlamaGen class-to-image as a policy: condition ids map to class labels, one token per forward.

    `net` is the GPT (its state dict is LlamaGen's layout); the VQ tokenizer decodes. `condition_classes`
    [num_conditions] gives each condition id's class label (default: the identity over the classes); a
    task with (class, style) pairs maps every pair to its class, so the network sees only the class.
    """

    def __init__(self, gpt: GPT, vq: VQModel, condition_classes: Sequence[int] | torch.Tensor | None = None):
        super().__init__(gpt, vq.eval().requires_grad_(False))
        c = gpt.config
        if c.model_type != "c2i":
            raise ValueError(f"LlamaGenPolicy needs a class-conditional GPT (model_type c2i), got {c.model_type}")
        table = torch.arange(c.num_classes) if condition_classes is None else torch.as_tensor(condition_classes)
        table = table.long().flatten()
        if table.numel() == 0 or int(table.min()) < 0 or int(table.max()) >= c.num_classes:
            raise ValueError(f"condition_classes must be class labels in [0, {c.num_classes - 1}], got "
                             f"{table.tolist()[:10]}")
        self.register_buffer("condition_classes", table, persistent=False)
        self.num_conditions = table.numel()
        self.num_tokens = c.block_size
        self.vocab_size = c.vocab_size

    def labels(self, conditions: torch.Tensor) -> torch.Tensor:
        self.check_conditions(conditions)
        return self.condition_classes[conditions]

    def forward(self, conditions: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                drop_conditions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.net, self.labels(conditions), tokens, temperature, drop_labels=drop_conditions)

    @torch.no_grad()
    def rollout(self, conditions: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Rollout:
        sample = sample_tokens(self.net, self.labels(conditions), sampling, generator)
        return Rollout(sample.tokens, sample.logprobs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode_tokens(tokens)

    def forward_passes(self, sampling: SamplingConfig) -> float:
        return forward_passes_per_image(sampling, self.num_tokens)


@torch.no_grad()
def generate_chunks(policy: Policy, conditions: torch.Tensor, sampling: SamplingConfig, batch_size: int,
                    seed: int, dist: Dist | None = None, progress: bool = True, desc: str = "sample",
                    precision: str = "fp32") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of the images for condition ids [N], one sampling call at a time: (global
    indices [n] long, images [n, 3, H, W] float on CPU) per call.

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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for c in tqdm(chunks, desc=desc, disable=not (progress and dist.is_main)):
        batch = conditions[c * batch_size : (c + 1) * batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(derived_seed(seed, c))
        with autocast:
            tokens = policy.rollout(batch, sampling, generator).tokens
        yield torch.arange(c * batch_size, c * batch_size + len(batch)), policy.decode(tokens).float().cpu()


def generate_sharded(policy: Policy, conditions: torch.Tensor, sampling: SamplingConfig, batch_size: int,
                     seed: int, dist: Dist | None = None, progress: bool = True, desc: str = "sample",
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """`generate_chunks` gathered: this process's (global indices [n], images [n, 3, H, W]) in memory, for
    small sets (tests, benchmarks); the sample stage streams the chunks to disk instead."""
    chunks = list(generate_chunks(policy, conditions, sampling, batch_size, seed, dist, progress, desc, precision))
    if not chunks:  # a process without a chunk still returns well-shaped tensors
        side = policy.decode(torch.zeros(1, policy.num_tokens, dtype=torch.long, device=policy.device)).shape[-1]
        return torch.arange(0), torch.empty(0, 3, side, side)
    return torch.cat([i for i, _ in chunks]), torch.cat([x for _, x in chunks])


def forward_passes_per_image(sampling: SamplingConfig, block_size: int) -> float:
    """Model forward passes (sequence rows) spent per image: CFG doubles the guided steps."""
    guided = block_size if sampling.cfg_interval < 0 else min(block_size, sampling.cfg_interval + 2)
    # once the batch is doubled it stays doubled for the whole call (one shared KV cache)
    return float(2 * block_size) if sampling.guided and guided > 0 else float(block_size)
