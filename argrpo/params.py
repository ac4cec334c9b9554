"""The whole pipeline's parameters as one typed object, checked before any stage does any work.

`parse_params(mapping)` validates every section of a params file against its component's config
dataclass (types, ranges, unknown keys), every GRPO variant as the `grpo` section it overrides, and the
checks that span sections; the first problem raises `ConfigError` naming the dotted key and the value.
Stages call it on the whole file first, so a bad value anywhere stops `dvc repro` at its first stage
within seconds, before anything is trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from argrpo.classifier import JudgeConfig
from argrpo.conditions import CLASS_PROMPTS, DIGIT_PROMPTS, SPLITS, PromptsConfig
from argrpo.config import ConfigError, Int, load_section, require
from argrpo.data import DataConfig
from argrpo.distributed import DistributedConfig
from argrpo.features import RefStatsConfig
from argrpo.generator import ModelConfig, SampleConfig
from argrpo.grpo import GRPOConfig
from argrpo.metrics import EvaluateConfig
from argrpo.pretrain import PretrainConfig
from argrpo.rewards.options import RewardOptions
from argrpo.text import StandInT5
from argrpo.weights import WeightsConfig

DIGITS_CLASSES = 10


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merge(out[key], value) if nested else value
    return out


@dataclass(frozen=True)
class GRPORunsConfig:
    """The GRPO runs of the pipeline: every variant (a partial `grpo` section laid over it) x every seed."""

    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    seeds: tuple[Int, ...] = (0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", {name: dict(v or {}) for name, v in self.variants.items()})
        object.__setattr__(self, "seeds", tuple(self.seeds))
        require(bool(self.variants), "variants", "must name at least one variant", self.variants)
        for name in self.variants:
            require(name.replace("_", "").replace("-", "").isalnum(), f"variants.{name}",
                    "must be named with letters, digits, - and _ only (it names files and MLflow runs)", name)
        require(bool(self.seeds), "seeds", "must list at least one seed", self.seeds)
        require(len(set(self.seeds)) == len(self.seeds), "seeds", "must not repeat a seed", self.seeds)
        require(all(s >= 0 for s in self.seeds), "seeds", "must be >= 0", self.seeds)


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml, typed."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    ref_stats: RefStatsConfig = field(default_factory=RefStatsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    grpo_runs: GRPORunsConfig = field(default_factory=GRPORunsConfig)
    reward_options: RewardOptions = field(default_factory=RewardOptions)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the file as read, for logging

    def grpo_variant(self, variant: str, seed: int) -> GRPOConfig:
        """The GRPO config of one run: the `grpo` section, the variant's overrides, the seed."""
        if variant not in self.grpo_runs.variants:
            raise ConfigError(f"grpo_runs.variants has no variant {variant!r}; defined: "
                              f"{', '.join(self.grpo_runs.variants)}")
        return load_section(GRPOConfig, self.grpo_section(variant, seed), f"grpo_runs.variants.{variant}")

    def grpo_section(self, variant: str, seed: int) -> dict[str, Any]:
        """The merged mapping behind `grpo_variant` (what a run logs as its parameters)."""
        return merge(merge(self.raw.get("grpo") or {}, self.grpo_runs.variants[variant]), {"seed": seed})

    def instance_rewards(self) -> list[str]:
        """Every instance reward some GRPO run uses."""
        names = {name for v in self.grpo_runs.variants for name in self.grpo_variant(v, 0).rewards}
        return sorted(names)


SECTIONS = {
    "distributed": DistributedConfig, "data": DataConfig, "model": ModelConfig, "weights": WeightsConfig,
    "prompts": PromptsConfig, "pretrain": PretrainConfig, "judge": JudgeConfig, "ref_stats": RefStatsConfig,
    "grpo": GRPOConfig, "grpo_runs": GRPORunsConfig, "reward_options": RewardOptions, "sample": SampleConfig,
    "evaluate": EvaluateConfig,
}


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate a whole params mapping (as read from params.yaml); raises ConfigError naming the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known section; valid sections: {', '.join(SECTIONS)}")
    sections = {name: load_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    params = Params(**sections, raw=dict(raw))
    for variant in params.grpo_runs.variants:  # each run's merged section must itself be valid
        params.grpo_variant(variant, params.grpo_runs.seeds[0])
    check_across_sections(params)
    return params


def check_across_sections(p: Params) -> None:
    """The checks no single section can make."""
    require(p.data.image_size == p.model.image_size, "data.image_size",
            f"must equal model.image_size={p.model.image_size} (the generator is trained and evaluated on the "
            "data's images)", p.data.image_size)
    if p.data.kind == "digits":
        require(p.model.num_classes == DIGITS_CLASSES, "model.num_classes",
                f"must be {DIGITS_CLASSES} for data.kind digits", p.model.num_classes)
    world = p.distributed.world_size
    for variant, override in p.grpo_runs.variants.items():
        cfg = p.grpo_variant(variant, p.grpo_runs.seeds[0])
        key = f"grpo_runs.variants.{variant}.batch_classes" if "batch_classes" in override else "grpo.batch_classes"
        if world is not None:
            require(cfg.batch_classes % world == 0, key, f"must be divisible by the number of processes ({world} = "
                    "distributed.nproc_per_node x --nnodes)", cfg.batch_classes)
    check_family(p)
    classifiers = [name for name in p.instance_rewards() if name.startswith("classifier")]
    embedded_judges = p.ref_stats.features == "classifier" or bool(classifiers)
    if embedded_judges:
        require(p.judge.enabled, "judge.enabled", "must be true when ref_stats.features or a GRPO reward is "
                "classifier (the embedded judge networks supply them)", p.judge.enabled)


def check_family(p: Params) -> None:
    """The prompts and sampling a model family can take."""
    m, prompts = p.model, p.prompts
    for split in SPLITS:
        source = getattr(prompts, split)
        if m.text_conditional:
            require(source != CLASS_PROMPTS, f"prompts.{split}", f"must be {DIGIT_PROMPTS} or a prompt file for "
                    "model.family llamagen_t2i (its conditions are prompts)", source)
        else:
            require(source == CLASS_PROMPTS, f"prompts.{split}", f"must be {CLASS_PROMPTS} for model.family "
                    f"{m.family} (a class-conditional model; prompts come from prompts.template)", source)
        if source == DIGIT_PROMPTS:
            require(p.data.kind == "digits", f"prompts.{split}", "must not be digits unless data.kind is digits "
                    "(the digit prompts ask for the digits' classes)", source)
    if m.text_conditional:
        require(not prompts.styles and not prompts.eval_styles, "prompts.styles",
                "must be empty for model.family llamagen_t2i (styles make (class, style) conditions)", prompts.styles)
        if prompts.encoder == "stand_in":
            width = StandInT5().d_model
            require(m.caption_dim == width, "model.caption_dim", f"must be {width}, the stand-in text encoder's "
                    "width (prompts.encoder stand_in)", m.caption_dim)
    if m.family == "var":
        for variant in p.grpo_runs.variants:
            cfg = p.grpo_variant(variant, p.grpo_runs.seeds[0])
            require(cfg.sampling.cfg_interval == -1, "grpo.sampling.cfg_interval", "must be -1 for model.family var "
                    "(VAR guides every scale on its ramp)", cfg.sampling.cfg_interval)
