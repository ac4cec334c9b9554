"""Checkpoint loading: every LlamaGen file layout round-trips exactly; anything that does not fit fails
with a message naming the file, the keys and the shapes."""

import collections
import os

import pytest
import torch

from argrpo.checkpoints import CheckpointError, load_gpt, load_vq, read_state_dict, save_checkpoint
from argrpo.gpt import GPT, gpt_config
from argrpo.vq import VQModel, vq_config

CONFIG = gpt_config("tiny", vocab_size=32, num_classes=10, block_size=16)
IDX, COND = torch.randint(0, 32, (2, 15), generator=torch.Generator().manual_seed(0)), torch.tensor([1, 10])


def random_gpt(config=CONFIG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # the zero head would make every logit equal and hide a bad load
    return model.eval()


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(IDX, COND)


@pytest.fixture
def model() -> GPT:
    return random_gpt()


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "raw"])
def test_every_layout_round_trips_to_identical_logits(tmp_path, model, layout):
    path = tmp_path / f"{layout}.pt"
    sd = model.state_dict()
    if layout == "model":
        save_checkpoint(path, sd)
    else:
        torch.save(sd if layout == "raw" else {layout: sd, "epoch": 3}, path)
    loaded = load_gpt(path, CONFIG)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.equal(logits(loaded), logits(random_gpt(seed=1)))  # a different model tells apart


def test_saved_file_is_a_plain_model_dict(tmp_path, model):
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, model.state_dict(), step=7)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "step"} and obj["step"] == 7
    assert set(obj["model"]) == set(model.state_dict())
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temporary file left behind


def test_legacy_rope_and_cache_buffers_are_ignored(tmp_path, model):
    sd = dict(model.state_dict())
    sd["freqs_cis"] = torch.zeros(17, 16, 2)
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 2, 17, 16)
    sd["layers.1.attention.kv_cache.v_cache"] = torch.zeros(2, 2, 17, 16)
    save_checkpoint(tmp_path / "old.pt", sd)
    assert torch.equal(logits(load_gpt(tmp_path / "old.pt", CONFIG)), logits(model))


@pytest.mark.parametrize("extra", ["layers.0.attention.bias", "freqs_cis_extra", "ema.tok_embeddings.weight",
                                   "layers.0.attention.kv_cache.q_cache"])
def test_any_other_extra_key_fails_naming_it(tmp_path, model, extra):
    sd = dict(model.state_dict())
    sd[extra] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    save_checkpoint(path, sd)
    with pytest.raises(CheckpointError, match="unexpected keys") as err:
        load_gpt(path, CONFIG)
    assert extra in str(err.value) and str(path) in str(err.value)


def test_missing_key_fails_naming_it(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["layers.1.ffn_norm.weight"]
    save_checkpoint(tmp_path / "short.pt", sd)
    with pytest.raises(CheckpointError, match=r"missing keys \['layers.1.ffn_norm.weight'\]"):
        load_gpt(tmp_path / "short.pt", CONFIG)


def test_corrupted_file_names_the_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*broken.pt"):
        load_gpt(path, CONFIG)


def test_truncated_file_names_the_file(tmp_path, model):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, model.state_dict())
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.pt"):
        load_gpt(path, CONFIG)


class Payload:
    """Any pickled object beyond tensors and containers: weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path, model):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*unsafe.pt"):
        load_gpt(path, CONFIG)


def test_non_dict_file_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="tensor.pt holds a Tensor, not a state dict"):
        load_gpt(path, CONFIG)


def test_wrong_preset_lists_the_keys(tmp_path, model):
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model.state_dict())
    deeper = gpt_config("tiny", vocab_size=32, num_classes=10, block_size=16, n_layer=3)
    with pytest.raises(CheckpointError, match="missing keys") as err:
        load_gpt(path, deeper)
    message = str(err.value)
    assert "layers.2.attention.wqkv.weight" in message and "tiny.pt" in message
    wider = gpt_config("small", vocab_size=32, num_classes=10, block_size=16)  # 4 layers, dim 128
    with pytest.raises(CheckpointError, match="tiny.pt") as err:
        load_gpt(path, wider)
    assert "layers.3.feed_forward.w1.weight" in str(err.value)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, model):
    path = tmp_path / "vocab32.pt"
    save_checkpoint(path, model.state_dict())
    other = gpt_config("tiny", vocab_size=64, num_classes=10, block_size=16)
    with pytest.raises(CheckpointError) as err:
        load_gpt(path, other)
    message = str(err.value)
    assert "vocab32.pt" in message and "shape mismatch for" in message
    assert "tok_embeddings.weight: expected (64, 32), found (32, 32)" in message


def test_other_grid_loads_the_same_weights(tmp_path, model):
    save_checkpoint(tmp_path / "ckpt.pt", model.state_dict())
    bigger = load_gpt(tmp_path / "ckpt.pt", gpt_config("tiny", vocab_size=32, num_classes=10, block_size=36))
    assert bigger.config.block_size == 36


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_gpt(tmp_path / "nowhere.pt", CONFIG)
    with pytest.raises(FileNotFoundError, match="nowhere_vq.pt"):
        load_vq(tmp_path / "nowhere_vq.pt", vq_config("tiny"))


def test_read_state_dict_prefers_model_then_module_then_state_dict(tmp_path):
    a, b, c = ({"w": torch.full((1,), float(i))} for i in range(3))
    torch.save({"state_dict": c, "module": b, "model": a}, tmp_path / "all.pt")
    torch.save({"state_dict": c, "module": b}, tmp_path / "two.pt")
    torch.save(collections.OrderedDict(w=torch.ones(1)), tmp_path / "raw.pt")
    assert read_state_dict(tmp_path / "all.pt")["w"].item() == 0
    assert read_state_dict(tmp_path / "two.pt")["w"].item() == 1
    assert read_state_dict(tmp_path / "raw.pt")["w"].item() == 1


@pytest.mark.parametrize("layout", ["model", "raw"])
def test_vq_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    vq = VQModel(vq_config("tiny")).eval()
    with torch.no_grad():
        vq.quantize.codebook_used.uniform_()  # buffers travel too
    path = tmp_path / "vq.pt"
    if layout == "model":
        save_checkpoint(path, vq.state_dict())
    else:
        torch.save(vq.state_dict(), path)
    loaded = load_vq(path, vq_config("tiny"))
    assert not loaded.training
    assert torch.equal(loaded.quantize.codebook_used, vq.quantize.codebook_used)
    tokens = torch.randint(0, 64, (2, 16))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode_tokens(tokens), vq.decode_tokens(tokens))
        assert torch.equal(loaded.encode(images), vq.encode(images))


def test_vq_wrong_preset_names_keys(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq_tiny.pt", VQModel(vq_config("tiny")).state_dict())
    with pytest.raises(CheckpointError, match="vq_tiny.pt") as err:
        load_vq(tmp_path / "vq_tiny.pt", vq_config("small"))
    assert "missing keys ['decoder.conv_blocks.1.upsample.conv.bias'" in str(err.value)
