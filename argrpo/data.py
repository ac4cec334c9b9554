"""Datasets for the pipeline: scikit-learn's bundled digits (the embedded default) or an image folder.

Both become one `.npz`: `images` uint8 [N, H, W, 3], `labels` int64 [N], `split` int8 [N]
(0 train, 1 held-out) and `class_names`. Library images are float [N, 3, H, W] in [-1, 1].

An image folder has the ImageNet layout: `root/<class>/<image>`, one sub-folder per class, classes
numbered in sorted folder-name order. Images are the files whose suffix is one of IMAGE_SUFFIXES, in
any case (`.JPEG`, `.PNG`); other files are ignored. Hidden sub-folders (`.ipynb_checkpoints`, `.git`)
are not classes. A class folder with no image is an error naming it, as torchvision's ImageFolder
does: skipping it would renumber every later class and silently change what a label id means.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from argrpo.config import Float, Int, require
from argrpo.files import read_npz, savez_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-cased


@dataclass(frozen=True)
class DataConfig:
    kind: str = "digits"  # digits | folder
    root: str = ""  # folder kind: one sub-folder of images per class (ImageNet layout)
    image_size: Int = 16
    holdout_fraction: Float = 0.25
    max_per_class: Int = 0  # 0: every image
    seed: Int = 0

    def __post_init__(self) -> None:
        require(self.kind in ("digits", "folder"), "kind", "must be 'digits' or 'folder'", self.kind)
        require(self.kind != "folder" or bool(self.root), "root", "must name an image folder when kind is 'folder'",
                self.root)
        require(self.image_size >= 8, "image_size", "must be >= 8", self.image_size)
        require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "must be in (0, 1)", self.holdout_fraction)
        require(self.max_per_class >= 0, "max_per_class", "must be >= 0", self.max_per_class)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (one float copy: large batches stream through here)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = images.detach().float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)  # one float copy
    return x.permute(0, 2, 3, 1).cpu().numpy()


def load_digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 1,797 8x8 digits, upscaled (bilinear) to RGB image_size x image_size uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).mul(255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy(), digits.target.astype(np.int64), [str(i) for i in range(10)]


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of root in label order; ValueError naming every one that holds no image."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (set data.root in params.yaml)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    empty = [p.name for p in folders if not has_image(p)]
    if empty:
        raise ValueError(f"image folder {root}: the class folder(s) {', '.join(empty)} hold no image "
                         f"(suffixes {', '.join(IMAGE_SUFFIXES)}, any case); add images or remove the folder(s), "
                         f"since each sub-folder is one class")
    return folders


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def has_image(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.iterdir())  # stops at the first: ImageNet folders hold 1,300


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def read_image(path: Path, image_size: int) -> np.ndarray:
    """One image, centre-cropped to a square and resized (bicubic): uint8 [image_size, image_size, 3]."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes the whole file: a truncated one fails here, not later
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports a truncated file as OSError and some corrupt headers as SyntaxError / ValueError
        raise ValueError(f"cannot read image {path}: {e} (truncated or corrupt: replace or remove it)") from e


def load_folder_images(root: str | Path, image_size: int, max_per_class: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under root/<class>/..., centre-cropped and resized (bicubic) to image_size."""
    folders = class_folders(Path(root))
    images, labels = [], []
    for label, folder in enumerate(folders):
        for path in image_files(folder)[: max_per_class or None]:
            images.append(read_image(path, image_size))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), [p.name for p in folders]


def stratified_split(labels: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """0 (train) / 1 (held-out) per sample, the same fraction held out of every class."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int8)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split[idx[: int(round(len(idx) * holdout_fraction))]] = 1
    return split


def prepare_dataset(cfg: DataConfig, out: str | Path) -> dict[str, int]:
    if cfg.kind == "digits":
        images, labels, names = load_digits_images(cfg.image_size)
        if cfg.max_per_class:
            keep = np.concatenate([np.flatnonzero(labels == c)[: cfg.max_per_class] for c in np.unique(labels)])
            images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    else:
        images, labels, names = load_folder_images(cfg.root, cfg.image_size, cfg.max_per_class)
    split = stratified_split(labels, cfg.holdout_fraction, cfg.seed)
    savez_atomic(out, images=images, labels=labels, split=split, class_names=np.asarray(names))
    return {"images": len(labels), "train": int((split == 0).sum()), "holdout": int((split == 1).sum()),
            "classes": len(names)}


@dataclass
class Dataset:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # int8 [N]
    class_names: list[str]

    def part(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """('train' | 'holdout' | 'all') -> images [n, 3, H, W] in [-1, 1], labels [n]."""
        mask = self.mask(which)
        return to_tensor(self.images[mask]), torch.from_numpy(self.labels[mask])

    def batches(self, which: str, batch_size: int) -> Iterator[torch.Tensor]:
        """`part(which)`'s images in batches of `batch_size`, each made float only when it is needed: memory
        is one batch, not the part (a real-scale reference set as float32 is gigabytes)."""
        index = np.flatnonzero(self.mask(which))
        for start in range(0, len(index), batch_size):
            yield to_tensor(self.images[index[start : start + batch_size]])

    def count(self, which: str) -> int:
        return int(self.mask(which).sum())

    def mask(self, which: str) -> np.ndarray:
        masks = {"train": self.split == 0, "holdout": self.split == 1, "all": np.ones_like(self.split, bool)}
        if which not in masks:
            raise ValueError(f"unknown dataset part {which!r}; valid: {', '.join(masks)}")
        return masks[which]


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path} (run the prepare stage first)")
    z = read_npz(path, ["images", "labels", "split", "class_names"])
    return Dataset(z["images"], z["labels"], z["split"], [str(n) for n in z["class_names"]])
