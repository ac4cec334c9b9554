"""The digit judge: trains to high accuracy on real digits, deterministically, and serves features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from argrpo.classifier import (
    DigitClassifier,
    _augment,
    accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from argrpo.config import ConfigError
from argrpo.features import ClassifierFeatures, FeatureExtractor, extract


def _digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (values 0..16) as RGB images [N, 3, size, size] in [-1, 1]."""
    data = load_digits()
    images = torch.from_numpy(data.images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 2 - 1).repeat(1, 3, 1, 1), torch.from_numpy(data.target).long()


@pytest.fixture(scope="module")
def digits():
    images, labels = _digits()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1400], order[1400:]
    return images[train], labels[train], images[held_out], labels[held_out]


@pytest.fixture(scope="module")
def judge(digits):
    train_x, train_y, _, _ = digits
    return train_classifier(train_x, train_y, seed=0, epochs=4, batch_size=64, lr=3e-3)


def test_judge_reaches_high_held_out_accuracy(judge, digits):
    _, _, test_x, test_y = digits
    assert test_x.shape[0] == 397
    assert not judge.training
    assert accuracy(judge, test_x, test_y) >= 0.95
    # and stays reliable on slightly shifted, noisy versions, the kind of error generated images have
    noisy = _augment(test_x, torch.Generator().manual_seed(1), max_shift=1, max_noise=0.1)
    assert accuracy(judge, noisy, test_y) >= 0.9


def test_training_is_deterministic_in_the_seed_and_spares_the_global_rng(digits):
    x, y = digits[0][:160], digits[1][:160]
    kwargs = dict(epochs=1, batch_size=32, lr=1e-3, width=8, feat_dim=16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_classifier(x, y, seed=5, **kwargs).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = train_classifier(x, y, seed=5, **kwargs).state_dict()
    c = train_classifier(x, y, seed=6, **kwargs).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        train_classifier(x, y, seed=0, epochs=0, batch_size=32, lr=1e-3)


def test_augment_shifts_within_two_pixels_and_keeps_the_range():
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    shifted = _augment(images, torch.Generator().manual_seed(0), max_shift=2, max_noise=0.0)
    assert shifted.shape == images.shape
    for before, after in zip(images, shifted, strict=True):
        # the centre of every output is the input moved by some (dy, dx) in [-2, 2]^2
        offsets = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(after[:, 2:-2, 2:-2], before[:, 2 + dy : 14 + dy, 2 + dx : 14 + dx])
        ]
        assert len(offsets) == 1
    noisy = _augment(images, torch.Generator().manual_seed(0), max_shift=0, max_noise=0.5)
    assert not torch.equal(noisy, images)
    assert noisy.min() >= -1 and noisy.max() <= 1


@pytest.mark.parametrize("size", [8, 12, 16, 32])
def test_classifier_accepts_square_multiples_of_four(size):
    model = DigitClassifier(num_classes=7, width=4, feat_dim=10).eval()
    images = torch.rand(3, 3, size, size) * 2 - 1
    assert model.features(images).shape == (3, 10)
    assert model(images).shape == (3, 7)


@pytest.mark.parametrize("shape", [(2, 3, 10, 10), (2, 3, 4, 4), (2, 3, 16, 12), (2, 1, 16, 16), (3, 16, 16)])
def test_classifier_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match="multiple of 4"):
        DigitClassifier(width=4, feat_dim=8)(torch.zeros(shape))


def test_save_and_load_round_trip(tmp_path, digits):
    model = train_classifier(
        digits[0][:64], digits[1][:64], seed=1, epochs=1, batch_size=32, lr=1e-3, width=6, feat_dim=12
    )
    path = tmp_path / "judge" / "classifier.pt"
    save_classifier(path, model)
    loaded = load_classifier(path)
    assert loaded.config == {"num_classes": 10, "width": 6, "feat_dim": 12}
    assert not loaded.training
    x = digits[2][:20]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_classifier(tmp_path / "absent.pt")


def test_classifier_features_follow_the_extractor_protocol(judge, digits):
    x = digits[2][:50]
    extractor = ClassifierFeatures(judge, batch_size=7)  # uneven batches exercise the batching
    assert isinstance(extractor, FeatureExtractor)
    feats, probs = extractor.features(x), extractor.class_probs(x)
    with torch.no_grad():
        np.testing.assert_allclose(feats.numpy(), judge.features(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs.numpy(), judge(x).softmax(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert feats.shape == (50, 64) and probs.shape == (50, 10)
    assert feats.dtype == probs.dtype == torch.float32
    assert not feats.requires_grad
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(50))
    one_pass = extractor.features_and_probs(x)  # what extract() uses: one network pass for both
    torch.testing.assert_close(one_pass[0], feats)
    torch.testing.assert_close(one_pass[1], probs)

    np_feats, np_probs = extract(extractor, x, batch_size=16)
    assert np_feats.dtype == np_probs.dtype == np.float32
    np.testing.assert_allclose(np_feats, feats.numpy(), rtol=1e-5, atol=1e-6)
    lazily = extract(extractor, (x[i : i + 20] for i in range(0, 50, 20)))
    np.testing.assert_allclose(lazily[1], np_probs, rtol=1e-5, atol=1e-6)
