"""Inception-v3 features for FID, IS and precision / recall at real scale, as clean-fid computes them.

The network is the TorchScript `inception-2015-12-05.pt` (the TF FID Inception ported by NVIDIA for
StyleGAN2-ADA, the file clean-fid loads), read from a local path. Features follow clean-fid's
"clean" mode exactly: images are quantised to uint8, resized to 299x299 per channel with PIL's
bicubic filter in float (no re-quantisation), scaled by (x - 128) / 128 and passed through the
network's `layers`, which end in the 2048-d pool3 features. Class probabilities are the softmax of
the 1008-way output layer applied to pool3 without its bias, as the original TF Inception Score and
StyleGAN2-ADA's `no_output_bias=True` compute them.

On a GPU the resize runs on the device (`resize="auto"`): the same uint8 quantisation, then torch's
antialiased bicubic (`F.interpolate(..., mode="bicubic", antialias=True)`: PIL's filter, a = -0.5, its
support widened by the scale factor when shrinking) computed in float64 as PIL accumulates, clipped to
[0, 255] as clean-fid clips, returned in float32. It equals clean-fid's PIL resize within
`DEVICE_RESIZE_ATOL` = 1e-4 on the 0-255 scale (measured: 1.5e-5, one float32 step, for 8 to 512 px
inputs including full-contrast noise; in float32 the sums drift by up to 9e-3), and saves the host's
milliseconds per image and the images' round trip through host memory (reports/bench_grpo.md).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from argrpo.data import to_tensor, to_uint8

INCEPTION_SIZE = 299
RESIZES = ("auto", "pil", "device")
DEVICE_RESIZE_ATOL = 1e-4  # |device resize - clean-fid resize| on the 0-255 scale (tests/test_inception.py)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> the uint8 values `to_uint8` saves, as float32 [N, 3, H, W] in [0, 255]."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()


def resize_on_device(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize where `images` [N, 3, H, W] in [-1, 1] are: [N, 3, size, size] float32 in
    [0, 255], within DEVICE_RESIZE_ATOL of clean-fid's PIL bicubic in float (no re-quantisation)."""
    pixels = quantise(images).double()  # float64, as PIL accumulates: float32 sums drift by up to 1e-2
    resized = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 255).float()


class InceptionFeatures:
    """Feature extractor (argrpo.features.FeatureExtractor) over the TorchScript Inception at `path`.

    features(images) -> pool3 [N, 2048]; class_probs(images) -> softmax [N, 1008]; images
    [N, 3, H, W] in [-1, 1]. Both return float32 on the device of `images`.

    `resize`: "pil" is clean-fid's resize on the host, exactly; "device" is `resize_on_device` on the
    extractor's device; "auto" (default) takes "device" on a GPU and "pil" elsewhere.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64, resize: str = "auto"):
        from cleanfid.resize import make_resizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception TorchScript file not found: {path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.on_device = resize == "device" or (resize == "auto" and self.device.type == "cuda")
        self.model = torch.jit.load(path, map_location=self.device).eval()
        for name in ("layers", "output"):
            if not hasattr(self.model, name):
                raise ValueError(f"{path} is not the StyleGAN2-ADA Inception TorchScript: it has no `{name}` module")
        # clean-fid's "clean" resizer: PIL bicubic on each channel in float32, no quantisation after
        self.resize = make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] -> [n, 3, 299, 299] float32 in [0, 255], clean-resized."""
        if self.on_device:
            return resize_on_device(images.to(self.device))
        pixels = to_uint8(images)  # [n, H, W, 3] uint8, as the images would be saved to disk
        resized = np.stack([self.resize(image) for image in pixels])  # [n, 299, 299, 3] float32
        return torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _pool3(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        # the same normalisation the network applies in its own forward; calling `layers` directly
        # skips the forward's internal resampling, which clean-fid's resize replaces
        return self.model.layers((x - 128) / 128).reshape(x.shape[0], -1).float()  # [n, 2048]

    @torch.no_grad()
    def _probs(self, pool3: torch.Tensor) -> torch.Tensor:
        return F.linear(pool3, self.model.output.weight).softmax(dim=1)  # [n, 1008]

    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pool3 features [N, 2048] and class probabilities [N, 1008] from one network pass."""
        features, probs = [], []
        for start in range(0, images.shape[0], self.batch_size):
            pool3 = self._pool3(self.network_input(images[start : start + self.batch_size]))
            features.append(pool3)
            probs.append(self._probs(pool3))
        return torch.cat(features).to(images.device), torch.cat(probs).to(images.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        chunks = [
            self._pool3(self.network_input(images[start : start + self.batch_size]))
            for start in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(chunks).to(images.device)  # features: [N, 2048]

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[1]  # probs: [N, 1008]


def _npz_rows(path: str, key: str, chunk: int) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks of array `key` in an .npz without loading it whole.

    The ADM reference batch holds 10,000 256px images (about 2 GB); reading the member stream
    block by block keeps memory at one block.
    """
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if fortran_order:
            raise ValueError(f"{path}:{key} is stored in Fortran order; expected C order")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            rows = min(chunk, shape[0] - start)
            buffer = stream.read(rows * row_bytes)
            if len(buffer) != rows * row_bytes:
                raise ValueError(f"{path}:{key} is truncated")
            yield np.frombuffer(buffer, dtype=dtype).reshape((rows, *shape[1:]))


def load_adm_reference(npz_path: str, extractor=None, batch_size: int = 500) -> dict[str, np.ndarray]:
    """The ADM evaluator's reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`).

    Returns `mu` [2048] and `sigma` [2048, 2048] (float64) as stored: the ADM evaluator computed
    them with TF Inception and TF's own resize, so an FID against them differs slightly from one
    against moments of clean-resized features. With a feature `extractor`, also returns `features`
    [N, F] float32 of the reference images `arr_0` (uint8 [N, H, W, 3]), extracted by the same path
    as the samples, for precision / recall (and for clean moments, via `feature_moments`).
    """
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"ADM reference batch not found: {npz_path}")
    with np.load(npz_path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise KeyError(f"{npz_path} lacks {missing} (found {data.files}); expected the ADM reference batch")
        if extractor is not None and "arr_0" not in data.files:
            raise KeyError(f"{npz_path} has no reference images `arr_0` (found {data.files})")
        reference = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64)}
    if extractor is not None:
        chunks = []
        rows = tqdm(_npz_rows(npz_path, "arr_0", batch_size), desc="reference images", unit="batch")
        for pixels in rows:  # pixels: [n, H, W, 3] uint8
            if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
                raise ValueError(f"{npz_path}:arr_0 must be uint8 [N, H, W, 3], got {pixels.dtype} {pixels.shape}")
            chunks.append(extractor.features(to_tensor(pixels.copy())).cpu().numpy().astype(np.float32))
        reference["features"] = np.concatenate(chunks)
    return reference
