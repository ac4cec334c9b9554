"""InceptionFeatures over a TorchScript stand-in with the real file's interface, checked against clean-fid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from argrpo.data import to_tensor
from argrpo.features import FeatureExtractor
from argrpo.inception import DEVICE_RESIZE_ATOL, InceptionFeatures, load_adm_reference, resize_on_device
from argrpo.metrics import feature_moments, frechet_distance, inception_score, precision_recall

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


class NormalisedInput(nn.Module):
    """First stage of `layers`: the real network sees 299x299 inputs scaled to [-1, 1] here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("layers expect 299x299 inputs")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("layers expect inputs scaled to [-1, 1]")
        return x


class StandInInception(nn.Module):
    """The interface of StyleGAN2-ADA's `inception-2015-12-05.pt`: a `layers` trunk ending in pool3,
    an `output` layer, and forward(img in [0, 255], return_features, use_fp16, no_output_bias)
    returning pool3 features or softmax probabilities. Unlike the real file it refuses to resize."""

    def __init__(self, feature_dim: int = 2048, num_classes: int = 1008):
        super().__init__()
        self.feature_dim = feature_dim
        self.layers = nn.Sequential(
            NormalisedInput(),
            nn.Conv2d(3, 8, 5, stride=4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(128, feature_dim),
        )
        self.output = nn.Linear(feature_dim, num_classes)

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        if img.shape[2] != 299 or img.shape[3] != 299:
            raise RuntimeError("the stand-in expects 299x299 inputs")
        if bool(img.min() < 0.0) or bool(img.max() > 255.0):
            raise RuntimeError("expects pixel values in [0, 255]")
        x = img.to(torch.float32)
        features = self.layers((x - 128) / 128).reshape(x.shape[0], self.feature_dim)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


def save_standin(directory, feature_dim: int, num_classes: int) -> str:
    torch.manual_seed(0)
    module = StandInInception(feature_dim, num_classes).eval()
    path = directory / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.fixture(scope="module")
def full_path(tmp_path_factory) -> str:
    """Stand-in with the real output sizes (2048-d pool3, 1008 classes)."""
    return save_standin(tmp_path_factory.mktemp("full"), 2048, 1008)


@pytest.fixture(scope="module")
def small_path(tmp_path_factory) -> str:
    """Stand-in with 16-d features: full-covariance FID on 2048 dims takes minutes on CPU."""
    return save_standin(tmp_path_factory.mktemp("small"), 16, 10)


def smooth_pixels(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3] images with structure at several scales."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, size, size))).float()
    smooth = F.avg_pool2d(noise, 5, 1, 2) * 0.7 + noise * 0.3
    return smooth.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def direct_outputs(path: str, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and bias-free probabilities from the stand-in called as clean-fid and
    StyleGAN2-ADA call it, on clean-resized uint8 images."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    x = torch.from_numpy(np.stack([resize(p) for p in pixels])).permute(0, 3, 1, 2)
    model = torch.jit.load(path)
    with torch.no_grad():
        return model(x, return_features=True), model(x, no_output_bias=True)


def test_features_and_probs_follow_the_clean_fid_path(full_path):
    pixels = smooth_pixels(6, 48, seed=0)
    extractor = InceptionFeatures(full_path, batch_size=4)
    assert isinstance(extractor, FeatureExtractor)
    features, probs = extractor.features(to_tensor(pixels)), extractor.class_probs(to_tensor(pixels))
    assert features.shape == (6, 2048) and probs.shape == (6, 1008)
    assert features.dtype == probs.dtype == torch.float32
    expected_features, expected_probs = direct_outputs(full_path, pixels)
    torch.testing.assert_close(features, expected_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, expected_probs, atol=1e-6, rtol=1e-5)
    both = extractor.features_and_probs(to_tensor(pixels))
    torch.testing.assert_close(both[0], features)
    torch.testing.assert_close(both[1], probs)
    # a bilinear tensor resize, the usual shortcut, gives different features: the check has teeth
    x = F.interpolate(torch.from_numpy(pixels).permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear")
    with torch.no_grad():
        bilinear = torch.jit.load(full_path)(x, return_features=True)
    assert (bilinear - expected_features).abs().max() > 1e-3


def test_features_equal_clean_fid_folder_features(full_path, tmp_path):
    """clean-fid itself, with the same file as its InceptionV3W, reading the images from PNGs."""
    from pathlib import Path

    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    pixels = smooth_pixels(5, 40, seed=1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    clean_fid_model = InceptionV3W(str(Path(full_path).parent), download=False)
    reference = get_folder_features(
        str(folder), clean_fid_model, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean",
        verbose=False,
    )
    ours = InceptionFeatures(full_path).features(to_tensor(pixels)).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)


def test_metrics_through_the_extractor_match_the_direct_calls(small_path):
    real, fake = smooth_pixels(20, 32, seed=2), smooth_pixels(20, 32, seed=3)
    extractor = InceptionFeatures(small_path, batch_size=8)
    real_features = extractor.features(to_tensor(real)).numpy()
    fake_features, fake_probs = (t.numpy() for t in extractor.features_and_probs(to_tensor(fake)))
    direct_real, _ = direct_outputs(small_path, real)
    direct_fake, direct_probs = direct_outputs(small_path, fake)

    fid = frechet_distance(*feature_moments(fake_features), *feature_moments(real_features))
    direct_fid = frechet_distance(*feature_moments(direct_fake.numpy()), *feature_moments(direct_real.numpy()))
    assert fid > 0
    assert fid == pytest.approx(direct_fid, rel=1e-5, abs=1e-8)
    assert inception_score(fake_probs, splits=2) == pytest.approx(inception_score(direct_probs.numpy(), splits=2),
                                                                  rel=1e-5)
    assert precision_recall(real_features, fake_features, k=3) == pytest.approx(
        precision_recall(direct_real.numpy(), direct_fake.numpy(), k=3)
    )


def clean_fid_resized(pixels: np.ndarray) -> torch.Tensor:
    """clean-fid's "clean" resize of uint8 [n, H, W, 3] on the host -> [n, 3, 299, 299] float32."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    return torch.from_numpy(np.stack([resize(p) for p in pixels])).permute(0, 3, 1, 2)


def check_device_resize(pixels: np.ndarray, device: str) -> None:
    reference = clean_fid_resized(pixels)
    ours = resize_on_device(to_tensor(pixels).to(device)).cpu()
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert (ours - reference).abs().max() <= DEVICE_RESIZE_ATOL
    # the check has teeth: torch's plain bicubic (a = -0.75, no antialiasing), the usual shortcut, is far off
    plain = F.interpolate(torch.from_numpy(pixels).permute(0, 3, 1, 2).float(), size=(299, 299), mode="bicubic")
    assert (plain.clamp(0, 255) - reference).abs().max() > 100 * DEVICE_RESIZE_ATOL


def full_contrast_noise(size: int, seed: int) -> np.ndarray:
    """uint8 [1, size, size, 3] of 0 and 255 at random: the largest sums the filter can meet."""
    return (np.random.default_rng(seed).integers(0, 2, size=(1, size, size, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("size", [16, 48, 256, 384])
def test_device_resize_equals_clean_fid_within_tolerance(size):
    """Upsampling (16, 48, 256 px) and antialiased shrinking (384 px) to 299."""
    check_device_resize(np.concatenate([smooth_pixels(2, size, seed=size), full_contrast_noise(size, size)]), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_resize_on_the_gpu_equals_clean_fid_within_tolerance():
    check_device_resize(np.concatenate([smooth_pixels(3, 256, seed=7), full_contrast_noise(384, 7)[:, :256, :256]]),
                        "cuda")


def test_resize_modes_of_the_extractor(full_path):
    pixels = smooth_pixels(3, 40, seed=8)
    host = InceptionFeatures(full_path).features(to_tensor(pixels))  # "auto" on a CPU: clean-fid's own resize
    expected, _ = direct_outputs(full_path, pixels)
    torch.testing.assert_close(host, expected, atol=1e-5, rtol=1e-5)
    device = InceptionFeatures(full_path, resize="device").features(to_tensor(pixels))
    torch.testing.assert_close(device, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="resize must be one of auto, pil, device, got 'bilinear'"):
        InceptionFeatures(full_path, resize="bilinear")


def test_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        InceptionFeatures(str(tmp_path / "absent.pt"))
    path = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="layers"):
        InceptionFeatures(str(path))


@pytest.mark.parametrize("compressed", [False, True])
def test_load_adm_reference(small_path, tmp_path, compressed):
    rng = np.random.default_rng(4)
    mu = rng.normal(size=16)
    sigma = np.cov(rng.normal(size=(40, 16)), rowvar=False)
    arr_0 = smooth_pixels(10, 32, seed=5)
    path = tmp_path / "VIRTUAL_imagenet_fake.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=arr_0, mu=mu, sigma=sigma)

    moments = load_adm_reference(str(path))
    assert set(moments) == {"mu", "sigma"}
    np.testing.assert_array_equal(moments["mu"], mu)
    np.testing.assert_array_equal(moments["sigma"], sigma)

    extractor = InceptionFeatures(small_path)
    # blocks of 4 rows: the images are streamed from the archive in three reads
    reference = load_adm_reference(str(path), extractor, batch_size=4)
    assert reference["features"].shape == (10, 16) and reference["features"].dtype == np.float32
    np.testing.assert_allclose(reference["features"], extractor.features(to_tensor(arr_0)).numpy(), atol=1e-6)


def test_load_adm_reference_rejects_incomplete_files(small_path, tmp_path):
    path = tmp_path / "no_sigma.npz"
    np.savez(path, mu=np.zeros(4))
    with pytest.raises(KeyError, match="sigma"):
        load_adm_reference(str(path))
    path = tmp_path / "no_images.npz"
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(KeyError, match="arr_0"):
        load_adm_reference(str(path), InceptionFeatures(small_path))
    with pytest.raises(FileNotFoundError):
        load_adm_reference(str(tmp_path / "absent.npz"))
