"""Pre-flight checks of local weight files: clear messages, shape validation, hashes, no loading when absent."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from argrpo.checkpoints import save_checkpoint
from argrpo.config import ConfigError, load_section
from argrpo.gpt import GPT, gpt_config
from argrpo.vq import VQModel, vq_config
from argrpo.weights import (
    KINDS,
    WEIGHT_SOURCES,
    WeightsConfig,
    check_file,
    check_weights,
    require_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _offline(offline):
    """Every test of this module runs with the network refused (see conftest.py)."""


def test_every_file_parameter_has_a_source_and_a_kind():
    assert set(WEIGHT_SOURCES) == set(KINDS)
    assert "c2i_B_256.pt" in WEIGHT_SOURCES["gpt_checkpoint"].file
    assert WEIGHT_SOURCES["vq_checkpoint"].file == "vq_ds16_c2i.pt"
    assert "HPS_v2.1_compressed.pt" in WEIGHT_SOURCES["hpsv2_weights"].file
    assert WEIGHT_SOURCES["inception"].file == "inception-2015-12-05.pt"
    assert WEIGHT_SOURCES["ref_stats"].file == "VIRTUAL_imagenet256_labeled.npz"


def test_missing_file_message_names_param_file_and_source(tmp_path):
    path = str(tmp_path / "c2i_B_256.pt")
    check = check_file("gpt_checkpoint", path, "torch")
    source = WEIGHT_SOURCES["gpt_checkpoint"]
    assert not check.ok and check.missing and check.sha256 is None
    assert check.message == (
        f"weights.gpt_checkpoint: file not found: {path}. Set weights.gpt_checkpoint in params.yaml to a "
        f"local copy of {source.file}; it is published at {source.source}."
    )
    unset = check_file("inception", "", "torchscript")
    assert not unset.ok and unset.missing
    assert unset.message.startswith("weights.inception is not set.")
    assert "inception-2015-12-05.pt" in unset.message and "StyleGAN2-ADA" in unset.message


def test_good_torch_file_passes_with_its_sha256(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict()}, path)
    check = check_file("hpsv2_weights", str(path), "torch")
    assert check.ok, check.message
    assert check.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_torch_file_fails_clearly(tmp_path):
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": nn.Linear(3, 2).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:200])  # a truncated download
    check = check_file("vq_checkpoint", str(path), "torch")
    assert not check.ok and not check.missing and check.sha256 is None
    assert check.message.startswith(f"weights.vq_checkpoint: {path} fails the torch check")
    assert "torch.load(weights_only=True) cannot read it" in check.message
    assert "vq_ds16_c2i.pt" in check.message  # where to get a good copy
    with pytest.raises(ValueError, match="weights.vq_checkpoint"):
        require_weights(WeightsConfig(vq_checkpoint=str(path)), ["vq_checkpoint"])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(3, 2), path)  # a whole pickled module needs weights_only=False
    check = check_file("maniqa_weights", str(path), "torch")
    assert not check.ok and "cannot read it" in check.message


def test_torchscript_archive_is_not_a_state_dict(tmp_path):
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), str(path))
    check = check_file("clip_weights", str(path), "torch")
    assert not check.ok and "TorchScript archive" in check.message
    assert check_file("inception", str(path), "torchscript").ok
    other = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, other)
    bad = check_file("inception", str(other), "torchscript")
    assert not bad.ok and bad.message.startswith(f"weights.inception: {other} fails the torchscript check")


def test_gpt_checkpoint_is_checked_against_its_preset(tmp_path):
    path = tmp_path / "gpt.pt"
    state = GPT(gpt_config("tiny")).state_dict()
    # the buffers older LlamaGen files carry are tolerated
    save_checkpoint(path, {**state, "freqs_cis": torch.zeros(3), "layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    [ok] = check_weights(WeightsConfig(gpt_checkpoint=str(path), gpt_preset="tiny"), ["gpt_checkpoint"])
    assert ok.ok, ok.message
    [wrong] = check_weights(WeightsConfig(gpt_checkpoint=str(path), gpt_preset="small"), ["gpt_checkpoint"])
    assert not wrong.ok and "missing keys (14): layers.2." in wrong.message
    assert "cls_embedding.embedding_table.weight (1001, 32) (expected (1001, 128))" in wrong.message
    save_checkpoint(path, {**state, "lm_head.weight": torch.zeros(2)})
    [extra] = check_weights(WeightsConfig(gpt_checkpoint=str(path), gpt_preset="tiny"), ["gpt_checkpoint"])
    assert not extra.ok and "unexpected keys (1): lm_head.weight" in extra.message


def test_vq_checkpoint_and_explicit_expected_shapes(tmp_path):
    path = tmp_path / "vq.pt"
    model = VQModel(vq_config("tiny"))
    save_checkpoint(path, model.state_dict())
    cfg = WeightsConfig(vq_checkpoint=str(path), vq_preset="tiny")
    assert check_weights(cfg, ["vq_checkpoint"])[0].ok
    state = dict(model.state_dict())
    state.pop("quantize.embedding.weight")
    save_checkpoint(path, state)
    [missing_key] = check_weights(cfg, ["vq_checkpoint"])
    assert not missing_key.ok and "missing keys (1): quantize.embedding.weight" in missing_key.message
    # an explicit map replaces the preset's
    [custom] = check_weights(cfg, ["vq_checkpoint"], expected={"vq_checkpoint": {"x": (1,)}})
    assert "missing keys (1): x" in custom.message


def test_safetensors_are_checked_from_their_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(path))
    assert check_file("clip_weights", str(path), "torch", {"w": (2, 3)}).ok
    assert not check_file("clip_weights", str(path), "torch", {"w": (3, 2)}).ok


def test_npz_reference_statistics(tmp_path):
    good = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert check_file("ref_stats", str(good), "npz").ok
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(4))
    check = check_file("ref_stats", str(no_sigma), "npz")
    assert not check.ok and "sigma" in check.message
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(wrong_shape, mu=np.zeros(4), sigma=np.eye(3))
    assert not check_file("ref_stats", str(wrong_shape), "npz").ok


def test_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "train"
    for name in ("n01440764", "n01443537"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / name / "a.JPEG")
    check = check_file("ref_images", str(root), "folder")
    assert check.ok and "2 class folders" in check.message and check.sha256 is None
    (root / "n99999999").mkdir()
    (root / "n99999999" / "notes.txt").write_text("no images here")
    empty = check_file("ref_images", str(root), "folder")
    assert not empty.ok and "n99999999" in empty.message
    flat = tmp_path / "flat"
    flat.mkdir()
    assert "no class sub-folders" in check_file("ref_images", str(flat), "folder").message
    absent = check_file("ref_images", str(tmp_path / "absent"), "folder")
    assert absent.missing and "folder not found" in absent.message


def test_require_weights_lists_every_failure_without_loading_anything(monkeypatch, tmp_path):
    def no_loading(*args, **kwargs):
        raise AssertionError("a reader ran although the file is absent")

    monkeypatch.setattr(torch, "load", no_loading)
    monkeypatch.setattr(torch.jit, "load", no_loading)
    monkeypatch.setattr(np, "load", no_loading)
    cfg = WeightsConfig(gpt_checkpoint=str(tmp_path / "c2i_B_256.pt"), gpt_preset="GPT-B",
                        inception=str(tmp_path / "inception-2015-12-05.pt"))
    with pytest.raises(FileNotFoundError) as err:
        require_weights(cfg, ["gpt_checkpoint", "inception", "ref_stats"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("weights.gpt_checkpoint: file not found")
    assert lines[1].startswith("weights.inception: file not found")
    assert lines[2].startswith("weights.ref_stats is not set")


def test_require_weights_returns_the_checks_when_all_pass(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    [check] = require_weights(WeightsConfig(inception=str(path)), ["inception"])
    assert check.ok and check.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unknown weights parameter"):
        check_weights(WeightsConfig(), ["gpt_preset"])
    with pytest.raises(ValueError, match="unknown check kind"):
        check_file("inception", str(path), "onnx")


def test_weights_config_validation():
    cfg = load_section(WeightsConfig, {"gpt_preset": "GPT-B", "inception": "/x.pt"}, "weights")
    assert cfg.clip_model == "ViT-L-14" and cfg.hpsv2_weights == ""
    with pytest.raises(ConfigError, match="weights.gpt_preset must be one of"):
        load_section(WeightsConfig, {"gpt_preset": "GPT-Q"}, "weights")
    with pytest.raises(ConfigError, match="weights.inception must be a string, got None"):
        load_section(WeightsConfig, {"inception": None}, "weights")
    with pytest.raises(ConfigError, match="weights.inception_path is not a known parameter"):
        load_section(WeightsConfig, {"inception_path": "x"}, "weights")


def model_dir(path, model_type: str = "t5", weights: bool = True, tokenizer: bool = True):
    """A directory laid out as transformers saves a model (file contents are not read by the check)."""
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "d_model": 2048}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return str(path)


def test_model_directories_of_t5_and_the_judge(tmp_path):
    ok = check_file("t5_dir", model_dir(tmp_path / "flan-t5-xl"), "model_dir")
    assert ok.ok and ok.sha256 is None and "t5 model (width 2048), 1 weight file(s)" in ok.message
    missing = check_file("t5_dir", str(tmp_path / "nowhere"), "model_dir")
    assert missing.missing and "weights.t5_dir: folder not found" in missing.message
    assert "google/flan-t5-xl" in missing.message and "Hugging Face" in missing.message
    unset = check_file("qwen_vl_dir", "", "model_dir")
    assert unset.message.startswith("weights.qwen_vl_dir is not set.") and "Qwen2.5-VL-3B-Instruct" in unset.message
    wrong = check_file("qwen_vl_dir", model_dir(tmp_path / "t5-as-judge"), "model_dir")
    assert not wrong.ok and "model_type 't5', expected qwen2_5_vl" in wrong.message
    empty = check_file("t5_dir", model_dir(tmp_path / "no-weights", weights=False), "model_dir")
    assert not empty.ok and "has no weight files" in empty.message
    bare = check_file("t5_dir", model_dir(tmp_path / "no-tokenizer", tokenizer=False), "model_dir")
    assert not bare.ok and "has no tokenizer files" in bare.message
    (tmp_path / "loose").mkdir()
    assert "has no config.json" in check_file("t5_dir", str(tmp_path / "loose"), "model_dir").message


def test_the_hint_names_the_file_of_the_configured_family(tmp_path):
    var = check_file("gpt_checkpoint", str(tmp_path / "var_d16.pth"), "torch", family="var")
    assert "var_d16.pth" in var.message and "FoundationVision/var" in var.message
    assert "vae_ch160v4096z32.pth" in check_file("vq_checkpoint", "", "torch", family="var").message
    t2i = check_file("gpt_checkpoint", "", "torch", family="llamagen_t2i")
    assert "t2i_XL_stage1_256.pt" in t2i.message
    assert "vq_ds16_t2i.pt" in check_file("vq_checkpoint", "", "torch", family="llamagen_t2i").message
    assert "c2i_B_256.pt" in check_file("gpt_checkpoint", "", "torch").message


def test_needed_weights_follow_the_rewards_the_text_encoder_and_the_scores():
    from argrpo.weights import needed_weights

    ar_grpo = ["clip", "clip_quantized", "hpsv2", "hpsv2_quantized", "maniqa", "vlm_faithfulness", "vlm_fake",
               "vlm_weird"]
    assert needed_weights("weights", ar_grpo, "inception", "", text_encoder="t5", scores=["clip", "hpsv2"]) == [
        "gpt_checkpoint", "vq_checkpoint", "t5_dir", "clip_weights", "hpsv2_weights", "maniqa_weights",
        "qwen_vl_dir", "inception"]
    assert needed_weights("embedded", ["aesthetic"], "classifier", "") == ["aesthetic_weights", "clip_weights"]
    assert needed_weights("embedded", ["classifier"], "classifier", "", text_encoder="stand_in") == []


def test_a_var_checkpoint_is_checked_against_vars_shapes(tmp_path):
    from argrpo.generator import ModelConfig
    from argrpo.var import VAR, save_state_dict
    from argrpo.weights import model_shapes

    model = ModelConfig(family="var", gpt_preset="tiny", vq_preset="tiny", image_size=8, num_classes=3)
    expected = model_shapes(model.network(), model.tokenizer())
    path = tmp_path / "var_tiny.pth"
    save_state_dict(path, VAR(model.var()).state_dict())
    assert check_weights(WeightsConfig(gpt_checkpoint=str(path)), ["gpt_checkpoint"], expected, "var")[0].ok
    save_checkpoint(tmp_path / "gpt.pt", GPT(gpt_config("tiny", vocab_size=64, block_size=16)).state_dict())
    [wrong] = check_weights(WeightsConfig(gpt_checkpoint=str(tmp_path / "gpt.pt")), ["gpt_checkpoint"], expected,
                            "var")
    assert not wrong.ok and "does not fit the configured architecture" in wrong.message
    assert "missing keys" in wrong.message and "var_d16.pth" in wrong.message
