"""The LlamaGen VQ tokenizer: VQ-16's exact size and key layout, and encode / decode on a tiny one."""

import pytest
import torch
import torch.nn.functional as F

from argrpo.config import ConfigError
from argrpo.gpt import count_parameters
from argrpo.vq import VQModel, vq_config


def meta_vq(preset: str) -> VQModel:
    with torch.device("meta"):
        return VQModel(vq_config(preset))


def tiny_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(vq_config("tiny")).eval()  # 2x downsampling, 64 codes of dimension 4


def test_vq16_size_and_entries():
    model = meta_vq("VQ-16")
    sd = model.state_dict()
    assert count_parameters(model) == 71_883_403
    assert len(sd) == 344  # including the codebook_used buffer


def test_vq16_top_level_keys_and_shapes():
    sd = meta_vq("VQ-16").state_dict()
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith(("encoder.", "decoder."))}
    assert shapes == {
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "quant_conv.bias": (8,),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "post_quant_conv.bias": (256,),
    }
    assert sd["encoder.conv_out.weight"].shape == (256, 512, 3, 3)  # z_channels 256 from ch 128 x 4
    assert sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)


def test_vq16_residual_blocks_and_attention_per_level():
    model = meta_vq("VQ-16")
    assert [len(b.res) for b in model.encoder.conv_blocks] == [2] * 5
    assert [len(b.res) for b in model.decoder.conv_blocks] == [3] * 5
    # attention only at the lowest resolution: the encoder's last level and the decoder's first
    assert [len(b.attn) for b in model.encoder.conv_blocks] == [0, 0, 0, 0, 2]
    assert [len(b.attn) for b in model.decoder.conv_blocks] == [3, 0, 0, 0, 0]
    assert [hasattr(b, "downsample") for b in model.encoder.conv_blocks] == [True] * 4 + [False]
    assert [m.weight.shape[0] for m in (model.encoder.conv_in, model.decoder.conv_out)] == [128, 3]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)


def test_downsampling_factors():
    assert vq_config("VQ-16").downsample == 16 and vq_config("VQ-8").downsample == 8
    assert len(meta_vq("VQ-8").encoder.conv_blocks) == 4


def test_tiny_f16_decodes_24x24_tokens_into_384px_images_like_vq16():
    config = vq_config("tiny-f16")
    assert config.downsample == vq_config("VQ-16").downsample == 16
    model = VQModel(config).eval()
    with torch.no_grad():
        pixels = model.decode_tokens(torch.randint(0, config.codebook_size, (1, 24 * 24)))
    assert pixels.shape == (1, 3, 384, 384)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="VQ-32") as err:
        vq_config("VQ-32")
    for name in ("VQ-16", "VQ-8", "tiny"):
        assert name in str(err.value)


@pytest.mark.parametrize("shape", [(1, 3, 250, 250), (1, 3, 250, 256), (1, 3, 256, 250)])
def test_image_size_not_divisible_by_downsampling_raises_with_the_value(shape):
    model = meta_vq("VQ-16")
    with pytest.raises(ValueError, match="250.*16"):
        model.encode(torch.empty(shape, device="meta"))


def test_encode_decode_shapes_and_range():
    model = tiny_vq()
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 6) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    pixels = model.decode_code(codes, (2, 4, 8, 6))
    assert pixels.shape == (2, 3, 16, 12)
    tokens = torch.randint(0, 64, (2, 64))
    decoded = model.decode_tokens(tokens)
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, model.decode_code(tokens.view(2, 8, 8), (2, 4, 8, 8)))
    recon, codebook_loss, commit_loss = model(images)
    assert recon.shape == images.shape and codebook_loss.ndim == 0 and commit_loss.ndim == 0


def test_decoded_pixels_are_clamped_to_unit_range():
    model = tiny_vq()
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(100)  # push the raw output far outside [-1, 1]
        pixels = model.decode_tokens(torch.randint(0, 64, (2, 16)))
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert (pixels == 1).any() and (pixels == -1).any()


def test_codebook_vectors_used_are_l2_normalised():
    model = tiny_vq()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(torch.rand(64, 1) * 5 + 0.1)  # stored rows of any length
    torch.testing.assert_close(model.quantize.codebook().norm(dim=-1), torch.ones(64))
    z = torch.randn(2, 4, 3, 3)
    zq, _, _, codes = model.quantize(z)
    torch.testing.assert_close(zq.norm(dim=1), torch.ones(2, 3, 3))
    # nearest code by Euclidean distance between unit vectors, computed independently
    unit_z = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    unit_book = model.quantize.embedding.weight / model.quantize.embedding.weight.norm(dim=-1, keepdim=True)
    assert torch.equal(codes.reshape(-1), torch.cdist(unit_z, unit_book).argmin(-1))
    torch.testing.assert_close(zq.permute(0, 2, 3, 1).reshape(-1, 4), unit_book[codes.reshape(-1)])


def test_decode_code_looks_up_normalised_vectors():
    model = tiny_vq()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(3.0)
    codes = torch.randint(0, 64, (1, 4, 4))
    unit = F.normalize(model.quantize.embedding.weight, dim=-1)[codes].permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model.decoder(model.post_quant_conv(unit)).clamp(-1, 1)
        torch.testing.assert_close(model.decode_code(codes, (1, 4, 4, 4)), expected)
