"""The LlamaGen text-to-image GPT: exact parameter counts and checkpoint layout, the caption embedder, and
padded-caption masking in the teacher-forced pass and the KV cache, against an independent reference."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_t2i import DC, LC, V, left_padded_captions, random_t2i_gpt

from argrpo.checkpoints import load_gpt, read_state_dict, save_checkpoint
from argrpo.config import ConfigError
from argrpo.gpt import GPT, count_parameters, gpt_config

# the key -> shape listing of LlamaGen's published GPT-XL text-to-image checkpoint (t2i_XL_stage1_256.pt)
XL_SHAPES = Path(__file__).parent / "data" / "llamagen_t2i_xl_state_shapes.json"

T2I_PARAMETERS = {"GPT-B": 112_282_368, "GPT-L": 345_031_680, "GPT-XL": 777_678_080}


def meta_t2i(preset: str, **overrides) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(gpt_config(preset, model_type="t2i", **overrides))


@pytest.mark.parametrize("preset", list(T2I_PARAMETERS))
def test_t2i_parameter_counts(preset):
    assert count_parameters(meta_t2i(preset)) == T2I_PARAMETERS[preset]


def test_t2i_xl_has_every_key_and_shape_of_the_published_checkpoint():
    published = json.loads(XL_SHAPES.read_text())["GPT-XL-t2i"]
    model = meta_t2i("GPT-XL")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == published["state"]
    assert list(shapes) == list(published["state"])  # the same order, too
    assert count_parameters(model) == published["params"]
    # the null caption is saved (a persistent buffer) but is no parameter
    assert "cls_embedding.uncond_embedding" not in dict(model.named_parameters())


def test_t2i_defaults_and_overrides():
    c = gpt_config("GPT-XL", model_type="t2i")
    assert (c.cls_token_num, c.caption_dim, c.model_type) == (120, 2048, "t2i")
    assert gpt_config("tiny", model_type="t2i", cls_token_num=8).cls_token_num == 8
    assert gpt_config("GPT-XL").cls_token_num == 1  # c2i untouched
    with pytest.raises(ConfigError, match="model_type must be one of c2i, t2i, got 'x2i'"):
        gpt_config("tiny", model_type="x2i")
    with pytest.raises(ConfigError, match="cls_token_num must be 1 for a class-conditional model, got 4"):
        gpt_config("tiny", cls_token_num=4)
    with pytest.raises(ConfigError, match="caption_dim must be > 0"):
        gpt_config("tiny", model_type="t2i", caption_dim=0)


def test_caption_embedder_is_a_bias_free_gelu_tanh_mlp():
    model = random_t2i_gpt()
    sd = model.state_dict()
    captions = torch.randn(2, LC, DC)
    h = captions @ sd["cls_embedding.cap_proj.fc1.weight"].T
    expected = F.gelu(h, approximate="tanh") @ sd["cls_embedding.cap_proj.fc2.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(model.embed_condition(captions), expected)
    assert sd["cls_embedding.uncond_embedding"].shape == (LC, DC)
    assert not any(name.endswith("bias") for name in sd)


def test_uncond_embedding_initialised_like_llamagen():
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", model_type="t2i", cls_token_num=120, caption_dim=2048, vocab_size=32))
    null = model.cls_embedding.uncond_embedding
    assert abs(null.std().item() * math.sqrt(2048) - 1) < 0.01  # N(0, 1) / sqrt(caption_dim)
    assert torch.count_nonzero(model.output.weight) == 0
    assert abs(model.cls_embedding.cap_proj.fc1.weight.std().item() - 0.02) < 0.001


def reference_logits(model: GPT, idx: torch.Tensor, captions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LlamaGen's t2i forward written out independently: explicit attention under the mask its training data
    builds (causal; caption columns multiplied by the caption mask; then the diagonal set to 1)."""
    c, sd = model.config, model.state_dict()
    prefix = F.gelu(captions @ sd["cls_embedding.cap_proj.fc1.weight"].T, approximate="tanh")
    prefix = prefix @ sd["cls_embedding.cap_proj.fc2.weight"].T
    x = torch.cat([prefix, sd["tok_embeddings.weight"][idx]], 1)
    B, L, _ = x.shape
    half = c.head_dim // 2
    theta = 1.0 / c.rope_base ** (torch.arange(0, half, 2).float() / half)
    g = c.grid_size
    rows, cols = torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)
    angle = torch.cat([rows[:, None] * theta, cols[:, None] * theta], dim=1)
    rot = torch.polar(torch.ones_like(angle), angle)
    rot = torch.cat([torch.zeros(c.cls_token_num, half, dtype=rot.dtype), rot])[:L, None]
    allowed = torch.tril(torch.ones(L, L)).repeat(B, 1, 1)
    allowed[:, :, : c.cls_token_num] *= mask[:, None, :].float()
    eye = torch.eye(L)
    allowed = (allowed * (1 - eye) + eye).bool()[:, None]  # [B, 1, L, L]

    def rms(h, w):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def rope(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(B, L, c.n_head, half, 2)) * rot).flatten(3)

    for i in range(c.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (t.reshape(B, L, c.n_head, c.head_dim) for t in (h @ sd[p + "attention.wqkv.weight"].T).chunk(3, -1))
        scores = torch.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) / math.sqrt(c.head_dim)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, -1) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[
            p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_masked_forward_matches_independent_reference():
    model = random_t2i_gpt(n_layer=3, dim=48, n_head=3)
    captions, mask = left_padded_captions([6, 3, 1])
    captions = captions + 3 * ~mask[..., None]  # padded rows non-zero: their own outputs are compared too
    idx = torch.randint(0, V, (3, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx, captions, cond_mask=mask)
    assert logits.shape == (3, LC + 15, V) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(model, idx, captions, mask), rtol=1e-4, atol=1e-4)


def test_padded_caption_positions_change_no_image_logit():
    model = random_t2i_gpt()
    captions, mask = left_padded_captions([4, 2, 1])
    idx = torch.randint(0, V, (3, 15), generator=torch.Generator().manual_seed(2))
    garbage = captions + 50 * torch.randn(captions.shape, generator=torch.Generator().manual_seed(3)) * ~mask[..., None]
    with torch.no_grad():
        clean, noisy = model(idx, captions, cond_mask=mask), model(idx, garbage, cond_mask=mask)
        unmasked = model(idx, garbage)  # the same garbage without the mask is seen
        valid_changed = captions.clone()
        valid_changed[:, -1] += 1.0  # the last caption token is valid in every row
        other = model(idx, valid_changed, cond_mask=mask)
    image = slice(LC - 1, None)  # logits from the last caption position on predict image tokens
    assert torch.equal(clean[:, image], noisy[:, image])
    assert not torch.allclose(unmasked[:, image], clean[:, image])
    assert (other[:, image] - clean[:, image]).abs().amax((1, 2)).min() > 1e-3


def test_caption_positions_have_zero_rotary_rows():
    model = random_t2i_gpt()
    assert model.freqs_cis.shape[0] == LC + 16
    assert torch.count_nonzero(model.freqs_cis[:LC]) == 0
    assert torch.all(model.freqs_cis[LC:].abs().sum((1, 2)) > 0)


def test_cached_prefill_and_decode_with_mask_equal_the_full_forward():
    model = random_t2i_gpt()
    captions, mask = left_padded_captions([5, 2])
    captions = captions + 10 * ~mask[..., None]  # non-zero padding: only the mask keeps it out
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx, captions, cond_mask=mask)  # [2, LC + 12, V]
        cache = model.new_cache(2)
        steps = [model.prefill(captions, cache, cond_mask=mask)[:, None]]
        steps += [model.decode_one(idx[:, t], cache)[:, None] for t in range(12)]
        chunked = model.new_cache(2)  # the caption and 4 tokens in one chunk, then a multi-token chunk
        head = model(idx[:, :4], captions, chunked, cond_mask=mask)
        tail = model._run(model.tok_embeddings(idx[:, 4:12]), chunked.length, chunked)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, LC - 1 :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == LC + 12 and chunked.length == LC + 12
    with pytest.raises(ValueError, match="first chunk"):
        model.prefill(captions, cache, cond_mask=mask)


def test_caption_dropout_is_explicit_and_keeps_the_mask():
    model = random_t2i_gpt(class_dropout_prob=0.5).train()
    captions, mask = left_padded_captions([LC - i % 4 for i in range(64)], seed=5)
    idx = torch.randint(0, V, (64, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        kept = model(idx, captions, cond_mask=mask)
        null = model(idx, model.null_condition(64), cond_mask=mask)
        torch.manual_seed(1)
        dropped = model(idx, captions, drop_labels=True, cond_mask=mask)
        assert torch.equal(kept, model.eval()(idx, captions, cond_mask=mask))  # train mode alone never drops
    is_null = (dropped - null).abs().amax((1, 2)) == 0
    is_kept = (dropped - kept).abs().amax((1, 2)) == 0
    assert torch.all(is_null ^ is_kept) and 10 < is_null.sum() < 54


def test_null_condition_is_the_uncond_buffer():
    model = random_t2i_gpt()
    null = model.null_condition(3)
    assert null.shape == (3, LC, DC)
    assert torch.equal(null[2], model.state_dict()["cls_embedding.uncond_embedding"])


def test_check_captions_names_the_shapes():
    model = random_t2i_gpt()
    captions, mask = left_padded_captions([2, 3])
    model.check_captions(captions, mask)
    with pytest.raises(ValueError, match=rf"captions must be \[B, {LC}, {DC}\], got \(2, 5, {DC}\)"):
        model.check_captions(captions[:, :5], None)
    with pytest.raises(ValueError, match="caption mask must be bool"):
        model.check_captions(captions, mask.long())
    c2i = GPT(gpt_config("tiny", vocab_size=32, num_classes=10, block_size=16))
    with pytest.raises(ValueError, match="class-conditional"):
        c2i.check_captions(captions, mask)


def test_llamagen_t2i_checkpoint_loads_and_saves_back(tmp_path):
    model = random_t2i_gpt()
    config = model.config
    # a file in LlamaGen's layout: weights under "model", with the legacy rotary buffer some files carry
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "t2i_tiny.pt"
    torch.save({"model": {**state, "freqs_cis": model.freqs_cis.clone()}, "steps": 10}, path)
    loaded = load_gpt(path, config)
    captions, mask = left_padded_captions([3, 6])
    idx = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(idx, captions, cond_mask=mask), model(idx, captions, cond_mask=mask))
    assert torch.equal(loaded.cls_embedding.uncond_embedding, state["cls_embedding.uncond_embedding"])
    out = tmp_path / "saved.pt"
    save_checkpoint(out, loaded.state_dict())
    saved = read_state_dict(out)
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    # the null caption is part of the weights: a file without it does not fit
    del state["cls_embedding.uncond_embedding"]
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="uncond_embedding"):
        load_gpt(path, config)
