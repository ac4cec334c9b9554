"""VAR's multi-scale VQVAE: the released tokenizer's exact size and key layout, and the residual
quantiser's encode / decode / teacher-forcing maths recomputed by hand on a tiny one."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from argrpo.checkpoints import CheckpointError
from argrpo.config import ConfigError
from argrpo.gpt import count_parameters
from argrpo.msvq import MSVQVAE, msvq_config
from argrpo.var import load_msvq, save_state_dict

# the key/shape listing of the published checkpoints (VAR-d16..d30 and vae_ch160v4096z32.pth)
SHAPES = json.loads((Path(__file__).parent / "data" / "var_state_shapes.json").read_text())


def tiny_vqvae(seed: int = 0) -> MSVQVAE:
    """8 px images, 2x downsampling, scales 1, 2, 3, 4 (30 tokens), 64 codes of 8 channels."""
    torch.manual_seed(seed)
    model = MSVQVAE(msvq_config("tiny"))
    with torch.no_grad():  # phi convs with visible weight, so a wrong phi or a skipped one shows
        for phi in model.quantize.quant_resi.qresi_ls:
            phi.weight.normal_(0.0, 0.3)
            phi.bias.normal_(0.0, 0.3)
    return model.eval()


def images(n: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hand_contribution(model: MSVQVAE, k: int, codes: torch.Tensor) -> torch.Tensor:
    """phi_k(bicubic-upsample(code map)), written out: phi(h) = 0.5 h + 0.5 conv3x3(h)."""
    c = model.config
    pn = c.patch_nums[k]
    h = model.quantize.embedding.weight[codes].transpose(1, 2).reshape(-1, c.cvae, pn, pn)
    if k < c.num_scales - 1:
        h = F.interpolate(h, size=(c.grid, c.grid), mode="bicubic", align_corners=False)
    phi = model.quantize.quant_resi.qresi_ls[k]  # 4 scales on 4 ticks: scale k uses phi k
    return 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)


def test_released_vqvae_size_and_every_key_and_shape():
    with torch.device("meta"):
        model = MSVQVAE(msvq_config("VAR-VQVAE"))
    assert count_parameters(model) == SHAPES["VQVAE"]["params"] == 108_948_355
    listing = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert listing == list(SHAPES["VQVAE"]["state"].items())  # same keys, shapes and order
    # the one buffer is the persistent usage EMA; nothing else hides outside the state dict
    assert [name for name, _ in model.named_buffers()] == ["quantize.ema_vocab_hit_SV"]
    assert model.config.image_size == 256 and model.config.num_tokens == 680


def test_phi_conv_per_scale_follows_the_ticks():
    phi = MSVQVAE(msvq_config("tiny")).quantize.quant_resi
    torch.testing.assert_close(torch.as_tensor(phi.ticks), torch.tensor([1 / 12, 13 / 36, 23 / 36, 11 / 12],
                                                                         dtype=torch.float64))
    # 10 scales: k/9 against the ticks; k = 2 and k = 7 sit halfway between two ticks, and float
    # rounding of VAR's own arithmetic sends them to the later tick
    assert [phi.index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi.index(k, 4) for k in range(4)] == [0, 1, 2, 3]


def test_encoding_is_nearest_code_of_the_residual_and_f_hat_sums_the_contributions():
    model = tiny_vqvae()
    x = images()
    with torch.no_grad():
        f = model.latent(x)  # [3, 8, 4, 4]
        codes, f_hats = model.quantize.quantize(f)
        rest, f_hat = f.clone(), torch.zeros_like(f)
        for k, pn in enumerate(model.config.patch_nums):
            z = F.adaptive_avg_pool2d(rest, pn)  # area downsampling; the last scale is the grid itself
            z = z.permute(0, 2, 3, 1).reshape(-1, model.config.cvae)
            nearest = torch.cdist(z, model.quantize.embedding.weight).argmin(1).view(3, pn * pn)
            assert torch.equal(codes[k], nearest), f"scale {k}"
            h = hand_contribution(model, k, nearest)
            f_hat, rest = f_hat + h, rest - h
            torch.testing.assert_close(f_hats[k], f_hat, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.quantize.fhat_from_codes(codes), f_hat, atol=1e-5, rtol=0)
    tokens = model.encode(x)
    assert tokens.shape == (3, 30) and tokens.dtype == torch.long
    assert torch.equal(tokens, torch.cat(codes, 1))
    assert [len(set(c.flatten().tolist())) > 1 for c in codes[1:]] == [True] * 3  # not one code everywhere


def test_image_tokens_image_round_trip():
    model = tiny_vqvae()
    x = images()
    tokens = model.encode(x)
    with torch.no_grad():
        expected = model.fhat_to_image(model.quantize.quantize(model.latent(x))[1][-1])
    decoded = model.decode_tokens(tokens)
    assert decoded.shape == (3, 3, 8, 8) and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    # each scale matters: replacing the codes of the first scale changes the image
    other = tokens.clone()
    other[:, 0] = (other[:, 0] + 1) % model.config.vocab_size
    assert not torch.allclose(model.decode_tokens(other), decoded, atol=1e-4)
    with pytest.raises(ValueError, match="30 tokens"):
        model.decode_tokens(tokens[:, :-1])
    with pytest.raises(ValueError, match="8 px"):
        model.encode(images(size=16))


def test_teacher_forcing_input_is_the_downsampled_partial_f_hat():
    model = tiny_vqvae()
    tokens = model.encode(images())
    codes = model.split_scales(tokens)
    with torch.no_grad():
        inputs = model.var_input(tokens)
        assert inputs.shape == (3, 30 - 1, 8)
        f_hat, expected, stepped = torch.zeros(3, 8, 4, 4), [], torch.zeros(3, 8, 4, 4)
        for k in range(3):
            f_hat = f_hat + hand_contribution(model, k, codes[k])
            pn = model.config.patch_nums[k + 1]
            expected.append(F.adaptive_avg_pool2d(f_hat, pn).flatten(2).transpose(1, 2))
            # the sampler's step function hands the transformer the same input
            stepped, next_input = model.quantize.accumulate(stepped, k, codes[k])
            torch.testing.assert_close(next_input, expected[-1], atol=1e-5, rtol=0)
        stepped, last = model.quantize.accumulate(stepped, 3, codes[3])
    assert last is None
    torch.testing.assert_close(inputs, torch.cat(expected, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped, model.quantize.fhat_from_codes(codes), atol=1e-5, rtol=0)


def test_training_forward_losses_straight_through_and_usage_ema():
    model = tiny_vqvae().train()
    x = images(4)
    recon, codebook_loss, commit_loss = model(x)
    assert recon.shape == x.shape
    with torch.no_grad():
        f = model.latent(x)
        f_hats = model.quantize.quantize(f)[1]
        expected_codebook = sum(F.mse_loss(fh, f) for fh in f_hats) / 4
        torch.testing.assert_close(codebook_loss.detach(), expected_codebook, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(commit_loss.detach(), 0.25 * expected_codebook, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(recon, model.decoder(model.post_quant_conv(f_hats[-1])), atol=1e-5, rtol=0)
    (F.mse_loss(recon, x) + codebook_loss + commit_loss).backward()
    groups = ["encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.",
              *(f"quantize.quant_resi.qresi_ls.{i}." for i in range(4))]
    for group in groups:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(group)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), group
    # first training batch: the usage EMA holds that batch's code counts per scale
    hits = model.quantize.ema_vocab_hit_SV
    assert hits.sum(1).tolist() == [4 * p * p for p in model.config.patch_nums]
    before = hits.clone()
    model.eval()(x)
    assert torch.equal(model.quantize.ema_vocab_hit_SV, before)  # evaluation leaves it alone


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    model = tiny_vqvae()
    path = tmp_path / "vae.pth"
    save_state_dict(path, model.state_dict())
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(model.state_dict())  # the bare state dict, VAR's own layout
    loaded = load_msvq(path, model.config)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tokens = model.encode(images())
    assert torch.equal(loaded.decode_tokens(tokens), model.decode_tokens(tokens))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_msvq(tmp_path / "absent.pth", model.config)
    with pytest.raises(CheckpointError, match=r"shape mismatch for quantize\.(ema_vocab_hit_SV|embedding\.weight)"):
        load_msvq(path, msvq_config("tiny", vocab_size=32))
    sd = dict(model.state_dict())
    sd.pop("quantize.ema_vocab_hit_SV")
    save_state_dict(tmp_path / "partial.pth", sd)
    with pytest.raises(CheckpointError, match="quantize.ema_vocab_hit_SV"):
        load_msvq(tmp_path / "partial.pth", model.config)


def test_config_errors():
    with pytest.raises(ConfigError, match="patch_nums"):
        msvq_config("tiny", patch_nums=(1, 3, 2))
    with pytest.raises(ConfigError, match="unknown multi-scale VQVAE preset"):
        msvq_config("VQ-16")
    assert msvq_config("small").image_size == 16 and msvq_config("small").num_tokens == 30
