"""The LAION aesthetic predictor reward on a shrunken open_clip model built through the real loading path,
offline: the published head layout, scores recomputed by hand, and clear errors for wrong files."""

import pytest
import torch
import torch.nn.functional as F

from argrpo.checkpoints import CheckpointError
from argrpo.rewards import build_reward
from argrpo.rewards.aesthetic import AestheticMLP, AestheticReward
from argrpo.rewards.clip import CLIP_MEAN, CLIP_STD, build_open_clip

# a ViT-L-14-shaped open_clip model small enough for CPU tests (embedding width 32 instead of 768)
SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
MODEL = "ViT-L-14-quickgelu"


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


@pytest.fixture
def files(tmp_path):
    """A random tiny CLIP and a random predictor head for its 32-d embedding, saved as local files."""
    torch.manual_seed(0)
    clip = build_open_clip(MODEL, None, SMALL)
    head = AestheticMLP(32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)  # large enough that scores differ visibly between images
    clip_path, head_path = tmp_path / "clip.pt", tmp_path / "aesthetic.pth"
    torch.save(clip.state_dict(), clip_path)
    torch.save(head.state_dict(), head_path)  # a bare state dict, as the published file
    return clip.eval(), head.eval(), str(clip_path), str(head_path)


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_published_head_layout():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_scores_are_the_head_on_the_normalised_clip_embedding(files):
    clip, head, clip_path, head_path = files
    reward = AestheticReward(head_path, clip_path, MODEL, batch_size=2, model_kwargs=SMALL)
    images = random_images(5)
    scores = reward(images, torch.zeros(5, dtype=torch.long))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embedding = clip.encode_image(((images + 1) / 2 - mean) / std)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        # the head has no activations: five affine maps in a row
        x = embedding
        for i in (0, 2, 4, 6, 7):
            x = x @ head.layers[i].weight.T + head.layers[i].bias
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, x[:, 0], atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # images score differently, so the comparison has teeth
    # the score rates the image alone, whatever condition it was drawn for
    torch.testing.assert_close(reward(images, torch.arange(5)), scores)
    # larger images are resized to the CLIP input inside, deterministically
    big = F.interpolate(images, size=64, mode="nearest")
    assert torch.isfinite(reward(big, torch.zeros(5, dtype=torch.long))).all()


def test_registered_and_clear_errors(files, tmp_path):
    _, _, clip_path, head_path = files
    reward = build_reward("aesthetic", weights=head_path, clip_weights=clip_path, clip_model=MODEL,
                          model_kwargs=SMALL)
    assert isinstance(reward, AestheticReward)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        AestheticReward(str(tmp_path / "absent.pth"), clip_path, MODEL, model_kwargs=SMALL)
    with pytest.raises(FileNotFoundError, match="absent_clip.pt"):
        AestheticReward(head_path, str(tmp_path / "absent_clip.pt"), MODEL, model_kwargs=SMALL)
    # the published 768-d head cannot sit on a 32-d CLIP: the shape error names the layer
    full = tmp_path / "full.pth"
    torch.save(AestheticMLP(768).state_dict(), full)
    with pytest.raises(CheckpointError, match=r"shape mismatch for layers\.0\.weight"):
        AestheticReward(str(full), clip_path, MODEL, model_kwargs=SMALL)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1, 32)}, wrong)
    with pytest.raises(CheckpointError, match="layers.0.weight"):
        AestheticReward(str(wrong), clip_path, MODEL, model_kwargs=SMALL)
    with pytest.raises(ValueError, match="conditions"):
        reward(random_images(2), torch.zeros(3, dtype=torch.long))
