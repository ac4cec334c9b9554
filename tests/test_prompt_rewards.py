"""CLIP and HPSv2 scored against an explicit prompt per condition id, and AR-GRPO's quantised forms."""

import math

import numpy as np
import pytest
import torch

from argrpo.rewards import REWARDS, build_reward
from argrpo.rewards.clip import CLIP_MEAN, CLIP_STD, ClipReward, QuantizedClipReward, build_open_clip, quantize_scores
from argrpo.rewards.hpsv2 import HpsV2Reward, QuantizedHpsV2Reward

# a small ViT-H-14-shaped open_clip model (the text vocabulary stays 49408 for the bundled BPE tokenizer)
SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a thick 3", "a handwritten seven", "the digit 0, small", "a neat 9"]


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def hand_cosines(model, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    import open_clip

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(((x + 1) / 2 - mean) / std)
        txt = model.encode_text(open_clip.get_tokenizer("ViT-H-14", context_length=16)(prompts))
    return (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T


@pytest.mark.parametrize("score,reward", [
    (-0.2, -1.0), (-1e-9, -1.0), (0.0, 0.5), (0.29, 0.5), (0.3, 1.0), (0.59, 1.0), (0.6, 1.5), (0.99, 1.5),
    (1.0, 1.5),
])
def test_quantized_bins_follow_ar_grpo(score, reward):
    assert quantize_scores(torch.tensor([score])).item() == reward


def test_quantize_keeps_nan_and_checks_its_table():
    out = quantize_scores(torch.tensor([float("nan"), 0.45]))
    assert math.isnan(out[0].item()) and out[1].item() == 1.0
    with pytest.raises(ValueError, match="one value per edge"):
        quantize_scores(torch.zeros(1), (0.0, 1.0), (1.0,))
    with pytest.raises(ValueError, match="increase"):
        quantize_scores(torch.zeros(1), (0.0, 0.0), (1.0, 2.0))


def test_clip_scores_the_prompt_of_each_condition(tmp_path):
    source = build_open_clip("ViT-H-14", None, SMALL)
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    reward = ClipReward("ViT-H-14", str(path), prompts=PROMPTS, model_kwargs=SMALL, batch_size=3)
    assert reward.prompts == PROMPTS
    x, conditions = images(5), torch.tensor([3, 0, 2, 1, 3])
    expected = hand_cosines(source, x, PROMPTS)[torch.arange(5), conditions]
    torch.testing.assert_close(reward(x, conditions), expected, atol=1e-5, rtol=0)
    # AR-GRPO's two output forms, over the same model
    five = reward.variant(quantize=False, scale=5.0)
    binned = reward.variant(quantize=True)
    assert five.model is reward.model and binned.text_features is reward.text_features
    torch.testing.assert_close(five(x, conditions), 5 * expected, atol=5e-5, rtol=0)
    assert torch.equal(binned(x, conditions), quantize_scores(expected))
    assert not reward.quantize and reward.scale == 1.0  # the original is unchanged
    with pytest.raises(ValueError, match="labels must lie in"):
        reward(x[:1], torch.tensor([4]))


def test_exactly_one_prompt_source():
    with pytest.raises(ValueError, match="exactly one of class_names"):
        ClipReward("ViT-H-14", "", model_kwargs=SMALL)
    with pytest.raises(ValueError, match="exactly one of class_names"):
        ClipReward("ViT-H-14", "", ["cat"], prompts=PROMPTS, model_kwargs=SMALL)
    with pytest.raises(ValueError, match="non-empty sequence"):
        ClipReward("ViT-H-14", "", prompts="a thick 3", model_kwargs=SMALL)


def test_quantized_rewards_are_registered():
    assert REWARDS["clip_quantized"].endswith(":QuantizedClipReward")
    assert REWARDS["hpsv2_quantized"].endswith(":QuantizedHpsV2Reward")
    reward = build_reward("clip_quantized", model_name="ViT-H-14", weights="", prompts=PROMPTS, model_kwargs=SMALL)
    assert isinstance(reward, QuantizedClipReward) and reward.quantize
    scores = reward(images(3), torch.tensor([0, 1, 2]))
    assert set(scores.tolist()) <= {-1.0, 0.5, 1.0, 1.5}


def test_hpsv2_scores_prompts_plain_and_quantized(tmp_path):
    source = build_open_clip("ViT-H-14", None, SMALL)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    x, conditions = images(4, seed=3), torch.tensor([1, 1, 0, 3])
    expected = hand_cosines(source, x, PROMPTS)[torch.arange(4), conditions]
    plain = HpsV2Reward(str(path), prompts=PROMPTS, model_kwargs=SMALL)
    torch.testing.assert_close(plain(x, conditions), expected, atol=1e-5, rtol=0)
    binned = QuantizedHpsV2Reward(str(path), prompts=PROMPTS, model_kwargs=SMALL)
    assert torch.equal(binned(x, conditions), quantize_scores(expected))


def test_prompt_label_reward_scores_the_label_each_prompt_asks_for():
    from argrpo.prompts import digit_prompts
    from argrpo.rewards.prompt_label import PromptLabelReward

    prompts = digit_prompts("train")
    seen = []
    reward = PromptLabelReward(lambda x, labels: seen.append(labels) or labels.float() * 10, prompts.labels)
    conditions = torch.tensor([0, 1, 7, 479])  # "a handwritten zero", "... 0", "a handwritten 3", "a neat number 9"
    scores = reward(images(4), conditions)
    assert seen[0].tolist() == [0, 0, 3, 9] and scores.tolist() == [0.0, 0.0, 30.0, 90.0]
    with pytest.raises(ValueError, match=r"condition ids must lie in \[0, 480\)"):
        reward(images(1), torch.tensor([480]))
