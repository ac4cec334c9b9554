"""Model families through one registry: each builds its policy from (model config, files, condition set,
device), pretrains on images, and trains through the same GRPO loop; condition sets give ids their classes
and prompts, and the rewards built from params score each id against them."""

import pytest
import torch
from torch import nn

from argrpo.classifier import DigitClassifier, save_classifier
from argrpo.conditions import (
    ConditionSet,
    PromptsConfig,
    class_condition_set,
    class_condition_sets,
    load_condition_set,
    save_condition_set,
    text_condition_sets,
)
from argrpo.families import build_models, build_policy, load_models, pretrain_models, save_network
from argrpo.generator import LlamaGenPolicy, ModelConfig
from argrpo.grpo import INSTANCE_REWARDS, GRPOConfig, train_grpo
from argrpo.pretrain import PretrainConfig, TrainConfig
from argrpo.rewards.clip import ClipReward
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward
from argrpo.rewards.options import JudgeOptions, RewardOptions, ScoreOptions, build_rewards
from argrpo.sampling import SamplingConfig
from argrpo.t2i import LlamaGenT2IPolicy
from argrpo.text import PromptFeatures
from argrpo.var import VARPolicy
from argrpo.weights import WeightsConfig

# 8 px images: the tiny VQ (2x down, 16 tokens) and the tiny multi-scale VQVAE (scales 1, 2, 3, 4: 30 tokens)
TINY = {
    "llamagen": ModelConfig(family="llamagen", gpt_preset="tiny", vq_preset="tiny", image_size=8, num_classes=3),
    "llamagen_t2i": ModelConfig(family="llamagen_t2i", gpt_preset="tiny", vq_preset="tiny", image_size=8,
                                cls_token_num=6, caption_dim=12),
    "var": ModelConfig(family="var", gpt_preset="tiny", vq_preset="tiny", image_size=8, num_classes=3),
}
POLICIES = {"llamagen": LlamaGenPolicy, "llamagen_t2i": LlamaGenT2IPolicy, "var": VARPolicy}
CLASSES = ["cat", "dog", "fox"]
STYLES = ["ink", "oil"]
PROMPTS = ("a thick 3", "a small seven", "the digit 0", "a neat 9", "a 7")
PROMPT_CLASSES = (1, 2, 0, 2, 2)  # what each prompt asks for, among the 3 classes of the tiny models


def perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights everywhere (LlamaGen's zero head would make every logit equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def text_conditions(prompts=PROMPTS, classes=PROMPT_CLASSES) -> ConditionSet:
    """Prompts with left-padded random caption features [P, 6, 12] of 2 to 6 valid tokens."""
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([2 + i % 5 for i in range(len(prompts))])
    mask = torch.arange(6)[None] >= 6 - counts[:, None]  # [P, 6]
    features = torch.randn(len(prompts), 6, 12, generator=g) * mask[..., None]
    return ConditionSet(prompts, torch.tensor(classes), PromptFeatures(features, mask, tuple(prompts)))


def conditions_for(family: str) -> ConditionSet:
    if family == "llamagen_t2i":
        return text_conditions()
    return class_condition_set(CLASSES, "a {name} in the style of {style}", STYLES)


def saved_models(family: str, tmp_path, seed: int = 0):
    """(network file, tokenizer file) of perturbed fresh models, in the family's own format."""
    torch.manual_seed(seed)
    net, tokenizer = build_models(TINY[family])
    paths = tmp_path / f"{family}_net.pt", tmp_path / f"{family}_tokenizer.pt"
    save_network(TINY[family], paths[0], perturbed(net, seed).state_dict())
    save_network(TINY[family], paths[1], perturbed(tokenizer, seed + 1).state_dict())
    return paths


def grpo_config(**overrides) -> GRPOConfig:
    base = dict(steps=2, batch_classes=2, group_size=4, inner_epochs=2, lr=3e-3, kl_beta=0.1, checkpoint_every=1,
                precision="fp32", sampling=SamplingConfig(), fid_advantage_weight=0.0, rewards={})
    return GRPOConfig(**{**base, **overrides})


class Brightness:
    def __call__(self, images, conditions):
        return images.mean(dim=(1, 2, 3))


class PixelFeatures:
    def features(self, images):
        return images.flatten(1)


@pytest.mark.parametrize("family", list(TINY))
def test_the_registry_builds_each_familys_policy_from_its_files(family, tmp_path):
    conditions = conditions_for(family)
    policy = build_policy(TINY[family], *saved_models(family, tmp_path), conditions, "cpu")
    assert type(policy) is POLICIES[family] and not policy.training
    assert policy.num_conditions == len(conditions) == (5 if family == "llamagen_t2i" else 6)
    ids = torch.arange(len(conditions)).repeat(2)
    out = policy.rollout(ids, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(0))
    logp, entropy = policy(ids, out.tokens)  # the conditional policy's teacher-forced log-probs
    torch.testing.assert_close(out.logprobs, logp, atol=1e-4, rtol=1e-4)
    assert entropy.shape == logp.shape == (len(ids), policy.num_tokens) and out.logprobs.std() > 0
    assert policy.decode(out.tokens).shape == (len(ids), 3, 8, 8)
    # the class of every id: the pair's class, or the class each prompt asks for
    assert policy.labels(ids).tolist() == conditions.classes[ids].tolist()
    with pytest.raises(ValueError, match="out of range"):
        policy.rollout(torch.tensor([len(conditions)]), SamplingConfig())


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_a_class_style_pair_conditions_the_network_on_its_class(family, tmp_path):
    files = saved_models(family, tmp_path)
    pairs = build_policy(TINY[family], *files, conditions_for(family), "cpu")
    plain = build_policy(TINY[family], *files, class_condition_set(CLASSES), "cpu")
    pair_ids = torch.tensor([0, 1, 2, 3, 4, 5])  # (cat, ink), (cat, oil), (dog, ink), ...
    tokens = plain.rollout(torch.tensor([0, 0, 1, 1, 2, 2]), SamplingConfig(), torch.Generator().manual_seed(1)).tokens
    torch.testing.assert_close(pairs(pair_ids, tokens)[0], plain(torch.tensor([0, 0, 1, 1, 2, 2]), tokens)[0])
    assert plain.labels(torch.arange(3)).tolist() == [0, 1, 2]


def test_condition_sets_number_pairs_class_major_and_round_trip(tmp_path):
    styled = class_condition_set(CLASSES, "a {name} in the style of {style}", STYLES)
    assert styled.prompts[:3] == ("a cat in the style of ink", "a cat in the style of oil", "a dog in the style of ink")
    assert styled.classes.tolist() == [0, 0, 1, 1, 2, 2] and styled.labelled and styled.features is None
    save_condition_set(tmp_path / "classes.npz", styled)
    back = load_condition_set(tmp_path / "classes.npz")
    assert back.prompts == styled.prompts and torch.equal(back.classes, styled.classes) and back.features is None
    text = text_conditions(classes=(1, -1, 0, 2, 2))
    save_condition_set(tmp_path / "text.npz", text, dtype="float32")
    back = load_condition_set(tmp_path / "text.npz")
    assert back.prompts == PROMPTS and back.classes.tolist() == [1, -1, 0, 2, 2]
    assert torch.equal(back.features.features, text.features.features) and torch.equal(back.features.mask,
                                                                                        text.features.mask)
    with pytest.raises(ValueError, match="the classifier reward needs the class of every condition, but 1 of 5"):
        back.require_classes("the classifier reward")
    with pytest.raises(ValueError, match=r"a template has '\{style\}' exactly when styles are given"):
        class_condition_set(CLASSES, "a photo of a {name}", STYLES)
    with pytest.raises(FileNotFoundError, match="run the prompts stage first"):
        load_condition_set(tmp_path / "nowhere.npz")


def test_split_condition_sets_from_the_prompts_section():
    cfg = PromptsConfig(style_template="a {name} in {style}", styles=("ink",), eval_styles=())
    sets = class_condition_sets(cfg, CLASSES)
    assert sets["train"].prompts == ("a cat in ink", "a dog in ink", "a fox in ink")
    assert sets["eval"].prompts == ("a photo of a cat", "a photo of a dog", "a photo of a fox")  # plain classes
    assert sets["eval"].classes.tolist() == [0, 1, 2]
    digits = text_condition_sets(PromptsConfig(train="digits", eval="digits"), max_length=8)
    assert (len(digits["train"]), len(digits["eval"])) == (480, 160)
    assert digits["train"].features.features.shape == (480, 8, 64)  # the stand-in encoder's width
    assert digits["eval"].classes[:4].tolist() == [0, 0, 1, 1] and digits["eval"].labelled
    # one encoder for both splits: a word shared by both gets the same embedding
    assert set(digits["eval"].prompts).isdisjoint(digits["train"].prompts)


def test_grpo_on_tiny_var_with_loo_fid_over_style_pairs(tmp_path):
    policy = build_policy(TINY["var"], *saved_models("var", tmp_path), conditions_for("var"), "cpu")
    start = {k: v.clone() for k, v in policy.net.state_dict().items()}
    loo_fid = LooFidReward(PixelFeatures(), torch.zeros(192), torch.ones(192), ema_beta=0.5)
    logged = []
    train_grpo(policy, {"brightness": (Brightness(), 1.0)}, loo_fid,
               grpo_config(fid_advantage_weight=2.0, loo_fid=LooFidConfig(ema_beta=0.5)), tmp_path / "run",
               log=lambda step, m: logged.append(m), progress=False)
    moved = [k for k, v in policy.net.state_dict().items() if not torch.equal(v, start[k])]
    assert "head.weight" in moved and any(k.startswith("blocks.") for k in moved)
    assert "lvl_1L" not in moved and "attn_bias_for_masking" not in moved  # buffers stay
    assert logged[0]["policy/ratio_mean_epoch0"] == pytest.approx(1.0) and logged[0]["advantage/fid_abs_mean"] > 0
    assert all(m["health/skipped_update"] == 0.0 for m in logged)
    # the fine-tuned network is VAR's layout and loads back through the registry
    net, _ = load_models(TINY["var"], tmp_path / "run" / "policy.pt", tmp_path / "var_tokenizer.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in policy.net.state_dict().items())


def test_grpo_on_tiny_t2i_with_prompt_rewards(tmp_path, offline):
    from test_prompt_rewards import SMALL

    conditions = text_conditions()
    policy = build_policy(TINY["llamagen_t2i"], *saved_models("llamagen_t2i", tmp_path), conditions, "cpu")
    start = {k: v.clone() for k, v in policy.net.state_dict().items()}
    clip = ClipReward("ViT-H-14", "", prompts=conditions.prompts, model_kwargs=SMALL)  # scores each id's prompt
    classifier = DigitClassifier(num_classes=3).eval()
    save_classifier(tmp_path / "classifier.pt", classifier)
    labelled = build_rewards({"classifier": 1.0}, RewardOptions(), WeightsConfig(), conditions, "cpu",
                             classifier=tmp_path / "classifier.pt")
    rewards = {"clip": (clip.variant(quantize=False, scale=5.0), 1.0), **labelled}
    logged, shown = [], []
    cfg = grpo_config(sampling=SamplingConfig(cfg_scale=2.0), ratio_level="token",
                      rewards={"clip": 1.0, "classifier": 1.0})
    train_grpo(policy, rewards, None, cfg, tmp_path / "run", log=lambda step, m: logged.append(m), progress=False,
               log_images=lambda step, images: shown.append((step, images)))
    # one rollout image per drawn condition at every checkpoint step, in the decoder's range
    assert [step for step, _ in shown] == [0, 1]
    assert all(images.shape == (2, 3, 8, 8) and images.abs().max() <= 1 for _, images in shown), \
        [images.shape for _, images in shown]
    assert all(torch.isfinite(torch.tensor([m["reward/clip_mean"], m["reward/classifier_mean"]])).all()
               for m in logged)
    moved = [k for k, v in policy.net.state_dict().items() if not torch.equal(v, start[k])]
    assert "cls_embedding.cap_proj.fc1.weight" in moved and "output.weight" in moved
    assert "cls_embedding.uncond_embedding" not in moved


def test_the_classifier_reward_scores_the_class_of_each_id(tmp_path):
    torch.manual_seed(0)
    save_classifier(tmp_path / "classifier.pt", DigitClassifier(num_classes=3).eval())
    pairs = conditions_for("var")
    [(reward, weight)] = build_rewards({"classifier": 0.5}, RewardOptions(), WeightsConfig(), pairs, "cpu",
                                       classifier=tmp_path / "classifier.pt").values()
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    by_class = reward.inner(images, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert weight == 0.5 and torch.equal(reward(images, torch.arange(6)), by_class)
    with pytest.raises(ValueError, match="the classifier reward needs the class of every condition"):
        build_rewards({"classifier": 1.0}, RewardOptions(), WeightsConfig(), text_conditions(classes=(0, -1, 1, 2, 2)),
                      "cpu", classifier=tmp_path / "classifier.pt")


def test_clip_forms_share_one_model_and_take_their_options(monkeypatch, offline):
    from test_prompt_rewards import SMALL

    import argrpo.rewards.clip as clip_module

    built = []
    original = clip_module.build_open_clip

    def small_clip(name, weights, kwargs=None):
        built.append(name)
        return original(name, weights, SMALL)

    monkeypatch.setattr(clip_module, "build_open_clip", small_clip)
    conditions = conditions_for("var")
    rewards = build_rewards({"clip": 1.0, "clip_quantized": 1.0}, RewardOptions(clip=ScoreOptions(scale=5.0)),
                            WeightsConfig(clip_model="ViT-H-14"), conditions, "cpu")
    (clip, _), (quantized, _) = rewards["clip"], rewards["clip_quantized"]
    assert built == ["ViT-H-14"] and clip.model is quantized.model  # one CLIP for both forms
    assert clip.prompts == list(conditions.prompts) and (clip.scale, clip.quantize) == (5.0, False)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    ids = torch.tensor([0, 3, 4, 5])
    cosine = clip.variant(quantize=False, scale=1.0)(images, ids)
    torch.testing.assert_close(clip(images, ids), 5 * cosine)
    assert set(quantized(images, ids).tolist()) <= {-1.0, 0.5, 1.0, 1.5}


def test_the_three_judges_share_one_model_and_ask_their_own_questions(monkeypatch, offline):
    from tiny_vlm import tiny_processor, tiny_qwen_vl

    import argrpo.rewards.options as options

    loads = []
    processor = tiny_processor()
    model = tiny_qwen_vl(processor)

    def load(model_dir, dtype):
        loads.append((model_dir, dtype))
        return model, processor

    monkeypatch.setattr(options, "load_judge", load)
    logits = JudgeOptions(mode="logits", dtype="float32")
    rewards = build_rewards({"vlm_faithfulness": 1.0, "vlm_fake": 1.0, "vlm_weird": 1.0},
                            RewardOptions(vlm_faithfulness=logits, vlm_fake=logits, vlm_weird=logits),
                            WeightsConfig(qwen_vl_dir="qwen"), text_conditions(), "cpu")
    assert loads == [("qwen", "float32")]
    judges = {name: reward for name, (reward, _) in rewards.items()}
    assert [judges[n].judge for n in ("vlm_faithfulness", "vlm_fake", "vlm_weird")] == ["faithfulness", "fake", "weird"]
    assert judges["vlm_faithfulness"].questions(torch.tensor([1]))[0].count("a small seven") == 1
    scores = judges["vlm_fake"](torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_every_registered_instance_reward_can_be_built_from_params():
    with pytest.raises(KeyError) as err:
        build_rewards({"nonsense": 1.0}, RewardOptions(), WeightsConfig(), conditions_for("var"), "cpu")
    buildable = str(err.value).split("buildable: ")[1].rstrip("'\"").split(", ")
    assert set(buildable) == set(INSTANCE_REWARDS)


@pytest.mark.parametrize("family", list(TINY))
def test_pretraining_fits_each_family_and_writes_loadable_files(family, tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(24) % 3
    images = (labels.float()[:, None, None, None] / 2 - 0.5).expand(24, 3, 8, 8).clone()  # one grey level per class
    cfg = PretrainConfig(vq=TrainConfig(steps=3, batch_size=8), gpt=TrainConfig(steps=3, batch_size=8))
    net, tokenizer, stats = pretrain_models(TINY[family], cfg, images, labels, conditions_for(family),
                                            torch.Generator().manual_seed(0))
    assert stats["vq_codes_used"] >= 1 and stats["vq_recon_mse"] >= 0
    save_network(TINY[family], tmp_path / "net.pt", net.state_dict())
    save_network(TINY[family], tmp_path / "tok.pt", tokenizer.state_dict())
    policy = build_policy(TINY[family], tmp_path / "net.pt", tmp_path / "tok.pt", conditions_for(family), "cpu")
    assert policy.rollout(torch.tensor([0, 1]), SamplingConfig(cfg_scale=1.5)).tokens.shape == (2, policy.num_tokens)


def test_text_to_image_pretraining_needs_a_prompt_for_every_class():
    images, labels = torch.zeros(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = PretrainConfig(vq=TrainConfig(steps=1, batch_size=2), gpt=TrainConfig(steps=1, batch_size=2))
    no_zero = text_conditions(classes=(1, 2, 1, 2, 2))
    with pytest.raises(ValueError, match="no prompt asks for class 0"):
        pretrain_models(TINY["llamagen_t2i"], cfg, images, labels, no_zero, torch.Generator().manual_seed(0))


def test_sample_grids_label_each_row_with_its_prompt():
    import numpy as np

    from argrpo.report import prompt_grid

    conditions = np.array([0, 1, 2, 0, 1, 2, 4])
    images = np.stack([np.full((4, 4, 3), 30 * i, np.uint8) for i in range(7)])  # image i is grey level 30 i
    grid = np.asarray(prompt_grid(images, conditions, PROMPTS, rows=3, per_row=2, scale=2, text_width=100))
    assert grid.shape == (3 * (8 + 2) + 2, 100 + 2 * (8 + 2) + 2, 3)  # rows: conditions 0, 2 and 4 (spread)
    assert (grid[2:10, :100] < 128).any() and (grid[12:20, :100] < 128).any()  # each row's prompt is written
    assert (grid[2:10, 102:110] == 0).all() and (grid[2:10, 112:120] == 90).all()  # condition 0: images 0, 3
    assert (grid[12:20, 102:110] == 60).all() and (grid[12:20, 112:120] == 150).all()  # condition 2: images 2, 5
    assert (grid[22:30, 102:110] == 180).all() and (grid[22:30, 112:120] == 255).all()  # condition 4: one image
