"""Sample sets on disk (argrpo/samples.py): shards tile the set, stream back in any batch size, and the
metrics computed from a stream equal those computed from the whole set in memory."""

import json

import numpy as np
import pytest
import torch

from argrpo import samples
from argrpo.classifier import DigitClassifier
from argrpo.data import to_tensor
from argrpo.features import ClassifierFeatures, extract


def sample_set(root, sizes, name="base_nocfg", side=16, seed=0):
    """A set of sum(sizes) random images written as shards of `sizes`, with its cost file."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    conditions = np.arange(n) % 10
    labels = np.where(conditions < 8, conditions, -1)
    folder, start = root / name, 0
    for size in sizes:
        samples.write_shard(folder, start, images[start : start + size], conditions[start : start + size],
                            labels[start : start + size])
        start += size
    (root / f"{name}.json").write_text(json.dumps({"num_images": n}))
    return folder, images, conditions, labels


@pytest.mark.parametrize("batch_size", [1, 7, 32, 33, 1000])
def test_batches_recut_the_shards_exactly(tmp_path, batch_size):
    folder, images, conditions, labels = sample_set(tmp_path, [32, 32, 5, 11])
    got = list(samples.batches(folder, batch_size))
    assert [len(b["images"]) for b in got[:-1]] == [batch_size] * (len(got) - 1)
    assert 1 <= len(got[-1]["images"]) <= batch_size
    for key, want in (("images", images), ("conditions", conditions), ("labels", labels)):
        assert np.array_equal(np.concatenate([b[key] for b in got]), want), key
    assert np.array_equal(samples.column(folder, "labels"), labels)
    head = samples.head(folder, 40)
    assert np.array_equal(head["images"], images[:40]) and np.array_equal(head["conditions"], conditions[:40])


def test_shards_must_tile_the_set(tmp_path):
    folder, *_ = sample_set(tmp_path, [4, 4, 4])
    assert len(samples.shards(folder, 12)) == 3
    with pytest.raises(ValueError, match=r"base_nocfg.*expected 13"):
        samples.shards(folder, 13)
    (folder / "shard-00000004-00000008.npz").unlink()  # a process's shard missing: a gap
    with pytest.raises(ValueError, match=r"shard-00000008-00000012.npz does not follow image 3"):
        list(samples.stream(folder))
    samples.write_shard(folder, 2, np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4), np.zeros(4))  # an overlap
    with pytest.raises(ValueError, match="does not follow"):
        samples.shards(folder)
    with pytest.raises(FileNotFoundError, match="rerun the sample stage"):
        samples.shards(tmp_path / "missing")


def test_only_sets_with_a_cost_file_are_complete(tmp_path):
    sample_set(tmp_path, [3], name="base_cfg")
    sample_set(tmp_path, [3], name="base_nocfg")
    (tmp_path / "base_cfg.json").unlink()  # the stage died before marking the set complete
    assert [f.name for f in samples.completed(tmp_path)] == ["base_nocfg"]


def test_a_truncated_shard_is_named(tmp_path):
    folder, *_ = sample_set(tmp_path, [5, 5])
    shard = folder / "shard-00000005-00000010.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00000005-00000010.npz is corrupt or truncated"):
        list(samples.batches(folder, 4))


def test_write_shard_refuses_other_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        samples.write_shard(tmp_path, 0, np.zeros((2, 8, 8, 3), np.float32), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="2 images, 3 conditions"):
        samples.write_shard(tmp_path, 0, np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3), np.zeros(2))


@pytest.mark.parametrize("batch_size", [256, 1000])
def test_streamed_features_equal_the_in_memory_features(tmp_path, batch_size):
    """Features streamed from shards in batches unlike the shards equal those of the whole set in memory."""
    torch.manual_seed(0)
    extractor = ClassifierFeatures(DigitClassifier(num_classes=10, width=8, feat_dim=16), batch_size=256)
    folder, images, *_ = sample_set(tmp_path, [250] * 9 + [37])  # shard boundaries unlike the batches
    whole = extract(extractor, to_tensor(images))
    streamed = extract(extractor, (to_tensor(b["images"]) for b in samples.batches(folder, batch_size)))
    for a, b in zip(whole, streamed, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # other batch shapes may round differently


def test_to_tensor_copies_once_and_keeps_the_values():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    before = images.copy()
    x = to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8) and np.array_equal(images, before)
    assert torch.equal(x, torch.from_numpy(before).permute(0, 3, 1, 2).float() / 127.5 - 1)
