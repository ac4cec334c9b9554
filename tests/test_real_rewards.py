"""CLIP, HPSv2 and MANIQA rewards on shrunken networks built through the real loading paths, offline."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from argrpo.imagenet import class_prompts, imagenet_class_names
from argrpo.rewards import build_reward
from argrpo.rewards.clip import CLIP_MEAN, CLIP_STD, ClipReward, build_open_clip, clip_pixels
from argrpo.rewards.hpsv2 import HpsV2Reward, load_strict

# a ViT-H-14-shaped open_clip model small enough for CPU tests; the text vocabulary must stay
# 49408 because the bundled BPE tokenizer emits ids up to 49407
SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["tench", "goldfish", "great white shark"]


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


def images_from_uint8(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def hand_cosines(model, images: torch.Tensor, prompts: list[str], context_length: int) -> torch.Tensor:
    """[N, C] cosines computed directly from the model, for images already at its input size."""
    import open_clip

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(((images + 1) / 2 - mean) / std)
        txt = model.encode_text(open_clip.get_tokenizer("ViT-H-14", context_length=context_length)(prompts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img @ txt.T


def test_imagenet_class_names_and_prompts():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish"
    assert class_prompts(names[:2]) == ["a photo of a tench", "a photo of a goldfish"]
    assert class_prompts(["cat"], "an image of {name}") == ["an image of cat"]
    with pytest.raises(ValueError, match="name"):
        class_prompts(["cat"], "no placeholder")


def test_clip_pixels_match_open_clip_preprocessing():
    """Tensor preprocessing agrees with open_clip's own PIL pipeline (resize, crop, normalise)."""
    import open_clip

    transform = open_clip.image_transform(32, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    pixels = random_pixels(3, 96, seed=1)
    # smooth the noise so the comparison measures resampling, not aliasing of white noise
    smooth = F.avg_pool2d(torch.from_numpy(pixels).permute(0, 3, 1, 2).float(), 9, 1, 4)
    pixels = smooth.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    ours = clip_pixels(images_from_uint8(pixels), (32, 32))
    reference = torch.stack([transform(Image.fromarray(p)) for p in pixels])
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    # PIL resamples in two passes through uint8, so allow 1.5 grey levels (a bilinear or
    # non-antialiased resize is off by 3 to 15 levels on these images)
    tolerance = 1.5 / 255 / min(CLIP_STD)
    assert (ours - reference).abs().max() < tolerance
    # a non-square image is centre-cropped like open_clip does
    wide = np.concatenate([pixels[0], pixels[1]], axis=1)[None]  # [1, 96, 192, 3]
    ours_wide = clip_pixels(images_from_uint8(wide), (32, 32))
    reference_wide = transform(Image.fromarray(wide[0]))[None]
    assert (ours_wide - reference_wide).abs().max() < tolerance


def test_clip_reward_scores_cosine_of_requested_class(tmp_path):
    source = build_open_clip("ViT-H-14", None, SMALL)
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    reward = ClipReward("ViT-H-14", str(path), CLASSES, model_kwargs=SMALL, batch_size=2)
    images = images_from_uint8(random_pixels(5, 32))
    labels = torch.tensor([0, 2, 1, 1, 0])
    scores = reward(images, labels)
    expected = hand_cosines(source, images, class_prompts(CLASSES), 16)[torch.arange(5), labels]
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # a different class gives a different score: the label really selects the prompt
    assert not torch.allclose(reward(images, (labels + 1) % 3), scores)


def test_clip_reward_caches_text_features(monkeypatch):
    reward = ClipReward("ViT-H-14", "", CLASSES, model_kwargs=SMALL)
    assert reward.text_features.shape == (3, 32)
    torch.testing.assert_close(reward.text_features.norm(dim=-1), torch.ones(3))

    def no_text(*args, **kwargs):
        raise AssertionError("text encoder ran while scoring")

    monkeypatch.setattr(reward.model, "encode_text", no_text)
    images = images_from_uint8(random_pixels(2, 48))  # resized to the model's 32 px inside
    assert torch.isfinite(reward(images, torch.tensor([0, 1]))).all()
    with pytest.raises(ValueError, match="labels"):
        reward(images, torch.tensor([0, 3]))


def test_clip_reward_is_registered_and_rejects_missing_weights(tmp_path):
    reward = build_reward("clip", model_name="ViT-H-14", weights="", class_names=CLASSES, model_kwargs=SMALL)
    assert isinstance(reward, ClipReward)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ClipReward("ViT-H-14", str(tmp_path / "nowhere.pt"), CLASSES, model_kwargs=SMALL)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_hpsv2_reward_loads_checkpoint_and_scores_cosine(tmp_path, prefix):
    source = build_open_clip("ViT-H-14", None, SMALL)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    reward = HpsV2Reward(str(path), CLASSES, model_kwargs=SMALL, batch_size=3)
    for key, value in source.state_dict().items():
        assert torch.equal(reward.model.state_dict()[key], value), key
    images = images_from_uint8(random_pixels(4, 32, seed=2))
    labels = torch.tensor([2, 0, 1, 2])
    expected = hand_cosines(source, images, class_prompts(CLASSES), 16)[torch.arange(4), labels]
    torch.testing.assert_close(reward(images, labels), expected, atol=1e-5, rtol=0)


def test_hpsv2_reward_rejects_a_mismatched_checkpoint(tmp_path):
    state = build_open_clip("ViT-H-14", None, SMALL).state_dict()
    state.pop("text_projection")
    state["visual.extra_head.weight"] = torch.zeros(2)
    state["logit_scale"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError) as err:
        HpsV2Reward(str(path), CLASSES, model_kwargs=SMALL)
    message = str(err.value)
    assert "text_projection" in message and "visual.extra_head.weight" in message and "logit_scale" in message
    with pytest.raises(FileNotFoundError):
        HpsV2Reward(str(tmp_path / "absent.pt"), CLASSES, model_kwargs=SMALL)


def test_load_strict_loads_matching_weights():
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    load_strict(model, other.state_dict(), "test")
    assert torch.equal(model.weight, other.weight)


def test_maniqa_reports_the_missing_extra(monkeypatch):
    from argrpo.rewards.maniqa import ManiqaReward

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[iqa\]"'):
        ManiqaReward(None)


def test_maniqa_state_dict_loader(tmp_path):
    from argrpo.rewards.maniqa import load_maniqa_state_dict

    path = tmp_path / "ckpt_koniq10k.pt"
    torch.save({"params": {"module.fc.weight": torch.ones(2)}}, path)
    assert list(load_maniqa_state_dict(str(path))) == ["fc.weight"]
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_maniqa_state_dict(str(path))


def test_maniqa_reward_builds_offline_and_loads_weights(tmp_path):
    pytest.importorskip("pyiqa")
    import timm

    from argrpo.rewards.maniqa import ManiqaReward

    create_model = timm.create_model
    reward = ManiqaReward(None, crops=1)
    assert timm.create_model is create_model  # the no-download patch is undone
    images = images_from_uint8(random_pixels(2, 224, seed=3))
    scores = reward(images, torch.tensor([0, 1]))
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # weights saved in pyiqa's layout load back strictly, backbone included
    state = reward.net.state_dict()
    path = tmp_path / "ckpt_koniq10k.pt"
    torch.save({"params": state}, path)
    reloaded = ManiqaReward(str(path), crops=1)
    for key, value in reloaded.net.state_dict().items():
        assert torch.equal(value, state[key]), key
