"""Sample sets on disk, written and read shard by shard so that no stage holds a whole set in memory.

The sample stage writes every configuration (`base_cfg`, `grpo_loofid_s0_nocfg`, ...) as

    samples/<configuration>/shard-<start>-<stop>.npz   images uint8 [n, H, W, 3], conditions [n], labels [n]
                                                       of the image indices start..stop-1 (zero-padded)
    samples/<configuration>.json                        the sampling cost; written last, so a set without
                                                        it is incomplete and never evaluated

Each process writes the shards of its own chunks (one per sampling call), atomically, so a killed stage
leaves whole shards or none. Readers check that the shards tile 0..N-1 exactly and stream them: `batches`
re-cuts the stream into fixed-size batches independent of the shard boundaries, so features computed
from a stream equal those computed from the whole set in memory, batch for batch. Memory is one shard
plus one batch, whatever the number of images. The png stage copies the first images of each set to
samples_png/ for people.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from argrpo.files import read_json, read_npz, savez_atomic

KEYS = ("images", "conditions", "labels")
SHARD = re.compile(r"shard-(\d+)-(\d+)\.npz")


def shard_path(folder: str | Path, start: int, stop: int) -> Path:
    return Path(folder) / f"shard-{start:08d}-{stop:08d}.npz"


def write_shard(folder: str | Path, start: int, images: np.ndarray, conditions: np.ndarray,
                labels: np.ndarray) -> Path:
    """Images start..start+n-1 (uint8 [n, H, W, 3]) with their condition ids and classes [n], atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.dtype} {list(images.shape)}")
    if not len(images) == len(conditions) == len(labels):
        raise ValueError(f"{len(images)} images, {len(conditions)} conditions and {len(labels)} labels")
    path = shard_path(folder, start, start + len(images))
    savez_atomic(path, images=images, conditions=np.asarray(conditions, np.int64),
                 labels=np.asarray(labels, np.int64))
    return path


def shards(folder: str | Path, num_images: int | None = None) -> list[Path]:
    """The shards of a sample set in index order, checked to tile 0..N-1 with no gap or overlap (N =
    `num_images` when given). ValueError naming the folder otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sample set {folder} not found; rerun the sample stage")
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := SHARD.fullmatch(p.name)))
    end = 0
    for start, stop, path in found:
        if start != end or stop <= start:
            raise ValueError(f"{folder}: shard {path.name} does not follow image {end - 1} (a gap or an overlap: "
                             "shards of another run?); rerun the sample stage")
        end = stop
    if not found or (num_images is not None and end != num_images):
        raise ValueError(f"{folder}: shards hold images 0..{end - 1}, expected {num_images}; rerun the sample stage")
    return [path for _, _, path in found]


def cost(folder: str | Path) -> dict:
    """The sampling cost the sample stage wrote beside the set (`<folder>.json`), its completion mark."""
    return read_json(Path(folder).with_suffix(".json"))


def completed(root: str | Path) -> list[Path]:
    """The complete sample sets under `root` (those with a cost file), sorted by name."""
    return [f.with_suffix("") for f in sorted(Path(root).glob("*.json")) if f.with_suffix("").is_dir()]


def stream(folder: str | Path, keys: Sequence[str] = KEYS) -> Iterator[dict[str, np.ndarray]]:
    """The set's shards one at a time, as {key: array}, checked against the cost file's image count."""
    for path in shards(folder, cost(folder)["num_images"]):
        yield read_npz(path, keys)


def batches(folder: str | Path, batch_size: int, keys: Sequence[str] = KEYS) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of exactly `batch_size` images (the last may be smaller), whatever the shards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for shard in stream(folder, keys):
        pending.append(shard)
        held += len(shard[keys[0]])
        while held >= batch_size:
            joined = {k: np.concatenate([s[k] for s in pending]) for k in keys}
            yield {k: v[:batch_size] for k, v in joined.items()}
            pending, held = [{k: v[batch_size:] for k, v in joined.items()}], held - batch_size
    if held:
        yield {k: np.concatenate([s[k] for s in pending]) for k in keys}


def column(folder: str | Path, key: str) -> np.ndarray:
    """One small per-image array of the whole set (`conditions` or `labels`)."""
    return np.concatenate([shard[key] for shard in stream(folder, [key])])


def head(folder: str | Path, n: int) -> dict[str, np.ndarray]:
    """The first `n` images of the set (fewer if it is smaller), with their conditions and labels."""
    taken = next(batches(folder, n), None)
    if taken is None:
        raise ValueError(f"{folder} holds no images")
    return taken
