"""Condition sets: what the integer condition ids of a task mean.

Every policy, reward and evaluation sees condition ids only; a condition set gives id i its meaning:

- class-conditional families (LlamaGen c2i, VAR): id i is a class, or with styles a (class, style) pair.
  `classes[i]` is the class the network is conditioned on; `prompts[i]` is the text the CLIP-style rewards
  and judges score against, a template filled with the class name (and the style): "a photo of a {name}",
  or with styles VAR-GRPO's "a {name} in the style of {style}", which lets a class-conditional model learn
  styles its classes never had. Pairs are numbered class-major: id = class * len(styles) + style.
- text-to-image (LlamaGen T2I): id i is prompt i of a prompt set; `features` hold its cached caption
  features (argrpo.text), and `classes[i]` the class the prompt asks for where the prompt set says
  (the digit of a digit prompt, for prompt accuracy and the classifier reward), else -1.

The prompts stage writes one condition set per split (data/prompts_train.npz for GRPO and pretraining,
data/prompts_eval.npz for sampling and evaluation): `prompts` [P] str, `labels` [P] int64 (-1: none),
and for text-to-image `features` [P, L, D] and `mask` [P, L] as `argrpo.text.save_prompt_features`
writes them, so GRPO never runs the text encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from argrpo.config import Int, require
from argrpo.imagenet import DEFAULT_TEMPLATE
from argrpo.prompts import PromptSet, digit_prompts, load_prompts
from argrpo.text import (
    FEATURE_DTYPES,
    PromptFeatures,
    TextEncoder,
    compute_prompt_features,
    save_prompt_features,
    stand_in_text_encoder,
)

SPLITS = ("train", "eval")
ENCODERS = ("stand_in", "t5")
CLASS_PROMPTS = "classes"  # a split made of the class names (class-conditional families)
DIGIT_PROMPTS = "digits"  # the embedded text-to-image prompts (argrpo.prompts.digit_prompts)
STYLE_TEMPLATE = "a {name} in the style of {style}"  # VAR-GRPO's style prompts


@dataclass(frozen=True)
class PromptsConfig:
    """The `prompts` section: each split's condition set and, for text-to-image, how its features are made.

    `train` / `eval`: "classes" (class-conditional families), "digits" (the embedded text-to-image
    prompts) or a prompt file (.txt, or .jsonl with optional labels; argrpo.prompts). The caption length
    is model.cls_token_num and the feature width model.caption_dim.
    """

    train: str = CLASS_PROMPTS
    eval: str = CLASS_PROMPTS
    template: str = DEFAULT_TEMPLATE  # classes: the prompt of a class ({name})
    style_template: str = STYLE_TEMPLATE  # classes: the prompt of a (class, style) pair ({name}, {style})
    styles: tuple[str, ...] = ()  # classes: train ids enumerate (class, style) pairs when given
    eval_styles: tuple[str, ...] = ()  # classes: the same for the evaluation ids (VAR's FID protocol: none)
    encoder: str = "stand_in"  # text-to-image: stand_in (fixed random small T5) | t5 (weights.t5_dir)
    feature_dtype: str = "float16"  # how the cached features are stored
    batch_size: Int = 32  # prompts per text-encoder call

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", tuple(self.styles))
        object.__setattr__(self, "eval_styles", tuple(self.eval_styles))
        for split in SPLITS:
            value = getattr(self, split)
            require(value in (CLASS_PROMPTS, DIGIT_PROMPTS) or value.endswith((".txt", ".jsonl")), split,
                    f"must be {CLASS_PROMPTS}, {DIGIT_PROMPTS} or a prompt file (.txt or .jsonl)", value)
        require("{name}" in self.template and "{style}" not in self.template, "template",
                "must contain {name} (the class name) and no {style} (style_template has it)", self.template)
        require("{name}" in self.style_template and "{style}" in self.style_template, "style_template",
                "must contain {name} and {style}", self.style_template)
        for key in ("styles", "eval_styles"):
            styles = getattr(self, key)
            require(all(isinstance(s, str) and s.strip() for s in styles), key, "must be non-empty strings", styles)
            require(len(set(styles)) == len(styles), key, "must not repeat a style", styles)
        require(self.encoder in ENCODERS, "encoder", f"must be one of {', '.join(ENCODERS)}", self.encoder)
        require(self.feature_dtype in FEATURE_DTYPES, "feature_dtype", f"must be one of {', '.join(FEATURE_DTYPES)}",
                self.feature_dtype)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)

    def split_styles(self, split: str) -> tuple[str, ...]:
        return self.styles if split == "train" else self.eval_styles

    def split_template(self, split: str) -> str:
        return self.style_template if self.split_styles(split) else self.template


@dataclass(frozen=True, eq=False)
class ConditionSet:
    """Condition id i -> prompts[i], classes[i] (-1: none) and, for text-to-image, row i of `features`."""

    prompts: tuple[str, ...]
    classes: torch.Tensor  # [P] long
    features: PromptFeatures | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "classes", torch.as_tensor(self.classes, dtype=torch.long).flatten())
        if not self.prompts:
            raise ValueError("a condition set needs at least one condition")
        if len(self.classes) != len(self.prompts):
            raise ValueError(f"{len(self.classes)} classes for {len(self.prompts)} conditions")
        if int(self.classes.min()) < -1:
            raise ValueError(f"classes must be class labels or -1 (none), got {int(self.classes.min())}")
        if self.features is not None and self.features.prompts != self.prompts:
            raise ValueError("the features were computed for other prompts than this condition set's")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labelled(self) -> bool:
        """Whether every condition has a class (class-conditional ids, labelled prompts)."""
        return bool((self.classes >= 0).all())

    def require_classes(self, what: str) -> torch.Tensor:
        """classes [P], or a ValueError naming `what` needs them when some condition has none."""
        if not self.labelled:
            missing = int((self.classes < 0).sum())
            raise ValueError(f"{what} needs the class of every condition, but {missing} of {len(self)} prompts carry "
                             "none (give prompt files as .jsonl with a \"label\" on every line)")
        return self.classes


def class_condition_set(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                        styles: Sequence[str] = ()) -> ConditionSet:
    """Ids over the classes (identity), or over (class, style) pairs, class-major, when `styles` are given."""
    if not class_names:
        raise ValueError("class_names must not be empty")
    if "{name}" not in template:
        raise ValueError(f"prompt template must contain '{{name}}', got {template!r}")
    if bool(styles) != ("{style}" in template):
        raise ValueError(f"a template has '{{style}}' exactly when styles are given; got {template!r} with "
                         f"{len(styles)} styles")
    prompts, classes = [], []
    for label, name in enumerate(class_names):
        for style in styles or [None]:
            prompts.append(template.format(name=name, style=style))  # a template without {style} ignores it
            classes.append(label)
    return ConditionSet(tuple(prompts), torch.tensor(classes))


def prompt_condition_set(prompt_set: PromptSet, features: PromptFeatures) -> ConditionSet:
    """Ids over the prompts of `prompt_set`, with their features and labels (-1 where the set has none)."""
    classes = prompt_set.label_tensor() if prompt_set.labels is not None else torch.full((len(prompt_set),), -1)
    return ConditionSet(prompt_set.prompts, classes, features)


def load_split_prompts(cfg: PromptsConfig, split: str) -> PromptSet:
    """The prompt set of a text-to-image split: the digit prompts of that split, or the named file."""
    source = getattr(cfg, split)
    if source == CLASS_PROMPTS:
        raise ValueError(f"prompts.{split} is 'classes': a class-conditional split has no prompt set")
    return digit_prompts(split) if source == DIGIT_PROMPTS else load_prompts(source)


def class_condition_sets(cfg: PromptsConfig, class_names: Sequence[str]) -> dict[str, ConditionSet]:
    """Both splits of a class-conditional task: the classes, with each split's styles."""
    return {split: class_condition_set(class_names, cfg.split_template(split), cfg.split_styles(split))
            for split in SPLITS}


def text_condition_sets(cfg: PromptsConfig, max_length: int, t5_dir: str = "",
                        device: str | torch.device = "cpu") -> dict[str, ConditionSet]:
    """Both splits of a text-to-image task, their caption features made once by one text encoder:
    the stand-in (a fixed random small T5 over the vocabulary of both splits) or the T5 in `t5_dir`."""
    sets = {split: load_split_prompts(cfg, split) for split in SPLITS}
    if cfg.encoder == "stand_in":
        every = [prompt for split in SPLITS for prompt in sets[split].prompts]
        encoder = stand_in_text_encoder(every, max_length=max_length, device=device)
    else:
        encoder = TextEncoder.from_dir(t5_dir, device=device, max_length=max_length)
    return {split: prompt_condition_set(prompts, compute_prompt_features(encoder, prompts.prompts, None,
                                                                        cfg.feature_dtype, cfg.batch_size))
            for split, prompts in sets.items()}


def save_condition_set(path: str | Path, conditions: ConditionSet, dtype: str = "float16") -> None:
    """Write a condition set as an .npz (see the module docstring), atomically."""
    path = Path(path)
    if conditions.features is not None:
        save_prompt_features(path, conditions.features, dtype)
        with np.load(path, allow_pickle=False) as data:
            arrays = dict(data)
    else:
        arrays = {"prompts": np.array(conditions.prompts, dtype=str)}
    arrays["labels"] = conditions.classes.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_condition_set(path: str | Path) -> ConditionSet:
    """The condition set the prompts stage wrote (features included for text-to-image)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"condition set not found: {path} (run the prompts stage first)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("prompts", "labels") if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; expected a condition set (prompts, labels)")
        prompts = tuple(str(p) for p in data["prompts"])
        classes = torch.from_numpy(data["labels"].astype(np.int64))
        features = None
        if "features" in data.files:
            features = PromptFeatures(torch.from_numpy(data["features"]), torch.from_numpy(data["mask"]).bool(),
                                      prompts)
    return ConditionSet(prompts, classes, features)
