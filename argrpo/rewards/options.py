"""The `reward_options` section and building the configured instance rewards from it.

`grpo.rewards` names the rewards and their weights; `reward_options.<name>` holds what else each needs
(AR-GRPO's 5 x CLIP and HPSv2 scores are `scale: 5`, a judge's mode, batch sizes). The files come from
the `weights` section, and the condition set gives each reward what it scores a condition id against:
the prompt of every id (CLIP, HPSv2, the judges) or its class (the classifier; `PromptLabelReward` maps
ids to classes, so (class, style) pairs and labelled prompts work as plain classes do).

Models are loaded once however many rewards share them: `clip` and `clip_quantized` share one CLIP,
`hpsv2` and `hpsv2_quantized` one HPSv2, and every judge of a dtype one Qwen2.5-VL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from argrpo.conditions import ConditionSet
from argrpo.config import Float, Int, require
from argrpo.features import FeatureExtractor
from argrpo.rewards import Reward, build_reward
from argrpo.rewards.prompt_label import PromptLabelReward
from argrpo.rewards.vlm_judge import DTYPES, GENERATE_PROMPTS, JUDGE_MODES, load_judge
from argrpo.weights import WeightsConfig

JUDGE_NAMES = {"vlm_faithfulness": "faithfulness", "vlm_fake": "fake", "vlm_weird": "weird"}


@dataclass(frozen=True)
class BatchOptions:
    batch_size: Int = 64  # images per network call

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class ScoreOptions(BatchOptions):
    scale: Float = 1.0  # the reward is scale x cosine (AR-GRPO: 5)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.scale > 0, "scale", "must be > 0", self.scale)


@dataclass(frozen=True)
class RealismOptions:
    k: Int = 3  # the k-th nearest real image's distance

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", "must be >= 1", self.k)


@dataclass(frozen=True)
class ManiqaOptions(BatchOptions):
    batch_size: Int = 16
    crops: Int = 20  # 224-pixel crops averaged per image (pyiqa's default)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.crops >= 1, "crops", "must be >= 1", self.crops)


@dataclass(frozen=True)
class JudgeOptions(BatchOptions):
    """A Qwen2.5-VL judge (argrpo.rewards.vlm_judge); AR-GRPO: generate mode, 3 tries, score / 4."""

    batch_size: Int = 8
    mode: str = "generate"  # generate (parse a JSON score) | logits (p(yes), one forward pass)
    max_attempts: Int = 3
    score_divisor: Float = 4.0
    max_new_tokens: Int = 256
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.mode in JUDGE_MODES, "mode", f"must be one of {', '.join(JUDGE_MODES)}", self.mode)
        require(self.max_attempts >= 1, "max_attempts", "must be >= 1", self.max_attempts)
        require(self.score_divisor > 0, "score_divisor", "must be > 0", self.score_divisor)
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}", self.dtype)


@dataclass(frozen=True)
class AnyJudgeOptions(JudgeOptions):
    judge: str = "faithfulness"  # which built-in question the generic vlm_judge asks

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.judge in GENERATE_PROMPTS, "judge", f"must be one of {', '.join(GENERATE_PROMPTS)}", self.judge)


@dataclass(frozen=True)
class RewardOptions:
    """The `reward_options` section: one entry per registered instance reward."""

    classifier: BatchOptions = field(default_factory=lambda: BatchOptions(batch_size=256))
    classifier_prob: BatchOptions = field(default_factory=lambda: BatchOptions(batch_size=256))
    realism: RealismOptions = field(default_factory=RealismOptions)
    clip: ScoreOptions = field(default_factory=ScoreOptions)
    clip_quantized: BatchOptions = field(default_factory=BatchOptions)
    hpsv2: ScoreOptions = field(default_factory=ScoreOptions)
    hpsv2_quantized: BatchOptions = field(default_factory=BatchOptions)
    aesthetic: BatchOptions = field(default_factory=BatchOptions)
    maniqa: ManiqaOptions = field(default_factory=ManiqaOptions)
    vlm_judge: AnyJudgeOptions = field(default_factory=AnyJudgeOptions)
    vlm_faithfulness: JudgeOptions = field(default_factory=JudgeOptions)
    vlm_fake: JudgeOptions = field(default_factory=JudgeOptions)
    vlm_weird: JudgeOptions = field(default_factory=JudgeOptions)


def build_rewards(weights: Mapping[str, float], options: RewardOptions, files: WeightsConfig,
                  conditions: ConditionSet, device: str | torch.device,
                  classifier: str | Path = "models/judge/reward_classifier.pt",
                  reward_features: Callable[[], tuple[FeatureExtractor, torch.Tensor]] | None = None,
                  ) -> dict[str, tuple[Reward, float]]:
    """name -> (reward, weight) for every reward of `weights`, scoring the ids of `conditions`.

    `classifier` is the embedded reward classifier's file (the judge stage writes it); `reward_features()`
    gives the reward-side feature extractor and the real images' features (the realism reward).
    """
    shared: dict = {}  # models loaded once: "clip", "hpsv2", ("judge", dtype)
    prompts = list(conditions.prompts)

    def clip_reward(name: str) -> Reward:
        if "clip" not in shared:
            shared["clip"] = build_reward("clip", model_name=files.clip_model, weights=files.clip_weights,
                                          prompts=prompts, device=device, batch_size=options.clip.batch_size)
        return shared["clip"].variant(quantize=name == "clip_quantized", scale=options.clip.scale)

    def hpsv2_reward(name: str) -> Reward:
        if "hpsv2" not in shared:
            shared["hpsv2"] = build_reward("hpsv2", weights=files.hpsv2_weights, prompts=prompts, device=device,
                                           batch_size=options.hpsv2.batch_size)
        return shared["hpsv2"].variant(quantize=name == "hpsv2_quantized", scale=options.hpsv2.scale)

    def judge_reward(name: str) -> Reward:
        opts = getattr(options, name)
        key = ("judge", opts.dtype)
        if key not in shared:
            shared[key] = load_judge(files.qwen_vl_dir, opts.dtype)
        model, processor = shared[key]
        # the vlm_<judge> rewards fix their question; the generic one takes it from its options
        question = {"judge": options.vlm_judge.judge} if name == "vlm_judge" else {}
        return build_reward(name, prompts=prompts, mode=opts.mode, max_attempts=opts.max_attempts,
                            score_divisor=opts.score_divisor, max_new_tokens=opts.max_new_tokens, device=device,
                            batch_size=opts.batch_size, model=model, processor=processor, **question)

    def classifier_reward(name: str) -> Reward:
        inner = build_reward(name, model_or_path=str(classifier), device=device,
                             batch_size=getattr(options, name).batch_size)
        return PromptLabelReward(inner, conditions.require_classes(f"the {name} reward"))

    def realism_reward(name: str) -> Reward:
        if reward_features is None:
            raise ValueError("the realism reward needs the reward-side features of real images")
        extractor, real = reward_features()
        return build_reward("realism", extractor=extractor, real_features=real, k=options.realism.k)

    builders = {
        "classifier": classifier_reward,
        "classifier_prob": classifier_reward,
        "realism": realism_reward,
        "clip": clip_reward,
        "clip_quantized": clip_reward,
        "hpsv2": hpsv2_reward,
        "hpsv2_quantized": hpsv2_reward,
        "aesthetic": lambda name: build_reward("aesthetic", weights=files.aesthetic_weights,
                                               clip_weights=files.clip_weights, clip_model=files.clip_model,
                                               device=device, batch_size=options.aesthetic.batch_size),
        "maniqa": lambda name: build_reward("maniqa", weights=files.maniqa_weights, device=device,
                                            batch_size=options.maniqa.batch_size, crops=options.maniqa.crops),
        "vlm_judge": judge_reward,
        **{name: judge_reward for name in JUDGE_NAMES},
    }
    unknown = sorted(set(weights) - set(builders))
    if unknown:
        raise KeyError(f"no way to build reward {unknown[0]!r} from params; buildable: {', '.join(builders)}")
    return {name: (builders[name](name), float(weight)) for name, weight in weights.items()}
