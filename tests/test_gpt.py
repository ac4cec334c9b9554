"""The LlamaGen GPT: exact parameter counts and state-dict layout, and its maths against hand computations
and an independent from-the-spec reference forward."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny_models import random_gpt

import argrpo.gpt as gpt_module
from argrpo.config import ConfigError
from argrpo.gpt import GPT, RMSNorm, apply_rotary, count_parameters, gpt_config, rope_2d

# LlamaGen c2i models: 1001 class rows and vocab 16384 (parameter counts of the released checkpoints)
PARAMETERS = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-3B": 3_096_659_200,
}


def meta_gpt(preset: str, **overrides) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(gpt_config(preset, **overrides))




@pytest.mark.parametrize("preset", list(PARAMETERS))
def test_parameter_count_matches_spec(preset):
    assert count_parameters(meta_gpt(preset)) == PARAMETERS[preset]


def test_gpt_b_state_dict_names_and_shapes():
    sd = meta_gpt("GPT-B").state_dict()
    expected = {
        "cls_embedding.embedding_table.weight": (1001, 768),
        "tok_embeddings.weight": (16384, 768),
        "norm.weight": (768,),
        "output.weight": (16384, 768),
    }
    for i in range(12):
        expected |= {
            f"layers.{i}.attention.wqkv.weight": (2304, 768),
            f"layers.{i}.attention.wo.weight": (768, 768),
            f"layers.{i}.feed_forward.w1.weight": (2048, 768),
            f"layers.{i}.feed_forward.w3.weight": (2048, 768),
            f"layers.{i}.feed_forward.w2.weight": (768, 2048),
            f"layers.{i}.attention_norm.weight": (768,),
            f"layers.{i}.ffn_norm.weight": (768,),
        }
    assert set(sd) == set(expected)  # in particular no freqs_cis, no bias, no cache buffer
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_256_and_576_token_models_share_every_weight_shape():
    shapes = [{k: v.shape for k, v in meta_gpt("GPT-B", block_size=n).state_dict().items()} for n in (256, 576)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("dim,hidden", [(768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (3200, 8704),
                                        (32, 256), (128, 512)])
def test_ffn_hidden_size_rule(dim, hidden):
    # round int(8 * dim / 3) up to a multiple of 256; checked on the built module, not just the property
    config = gpt_config("tiny", dim=dim, n_head=1)
    assert config.ffn_hidden == hidden
    with torch.device("meta"):
        ffn = gpt_module.FeedForward(config)
    assert ffn.w1.weight.shape == (hidden, dim) and ffn.w2.weight.shape == (dim, hidden)


def test_head_dim_of_3b_is_100():
    assert gpt_config("GPT-3B").head_dim == 100 and gpt_config("GPT-B").head_dim == 64


def test_initialisation_output_zero_others_normal():
    torch.manual_seed(0)
    model = GPT(gpt_config("small", vocab_size=4096))
    assert torch.count_nonzero(model.output.weight) == 0
    normal = (model.tok_embeddings.weight, model.cls_embedding.embedding_table.weight,
              model.layers[0].attention.wqkv.weight, model.layers[1].feed_forward.w2.weight)
    for w in normal:
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, RMSNorm))
    assert not any(isinstance(m, nn.Linear) and m.bias is not None for m in model.modules())


def test_rmsnorm_is_computed_in_float32():
    torch.manual_seed(0)
    norm = RMSNorm(768, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(64, 768) * 30 + 5).to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    # the same maths in bfloat16 rounds differently, so this test tells the two apart
    native = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert not torch.equal(out, native)


def test_rope_2d_by_hand_on_a_2x2_grid():
    # head_dim 8: half = 4 slots, frequencies base^(-[0, 2] / 4) = [1, 0.01]; pairs 0-1 follow the row, 2-3 the column
    freqs = rope_2d(grid_size=2, head_dim=8, base=10000.0, cls_token_num=1)
    assert freqs.shape == (5, 4, 2)
    expected = torch.zeros(5, 4, 2)
    for pos, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
        angles = [row * 1.0, row * 0.01, col * 1.0, col * 0.01]
        expected[pos] = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    torch.testing.assert_close(freqs, expected, rtol=0, atol=1e-7)


def test_rope_2d_head_dim_64_has_16_frequencies_per_axis():
    freqs = rope_2d(grid_size=16, head_dim=64, base=10000.0, cls_token_num=1)
    assert freqs.shape == (1 + 256, 32, 2)
    theta = 10000.0 ** (-torch.arange(0, 32, 2).double() / 32)  # 16 frequencies
    row, col = 3, 5
    angle = torch.atan2(freqs[1 + row * 16 + col, :, 1], freqs[1 + row * 16 + col, :, 0]).double()
    expected = torch.cat([row * theta, col * theta])
    wrapped = torch.remainder(expected + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(angle, wrapped, rtol=0, atol=1e-5)


def test_apply_rotary_rotates_adjacent_pairs_like_complex_multiplication():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)  # [B, L, H, D]
    freqs = rope_2d(grid_size=2, head_dim=8, base=10000.0, cls_token_num=1)  # [5, 4, 2]
    rot = torch.complex(freqs[..., 0], freqs[..., 1])  # cos + i sin
    reference = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * rot[None, :, None]).flatten(3)
    torch.testing.assert_close(apply_rotary(x, freqs), reference)


def test_class_position_query_and_key_are_zero_in_every_layer(monkeypatch):
    model = random_gpt()
    assert torch.count_nonzero(model.freqs_cis[: model.config.cls_token_num]) == 0
    rotated = []
    monkeypatch.setattr(gpt_module, "apply_rotary", lambda x, f: rotated.append(apply_rotary(x, f)) or rotated[-1])
    model(torch.randint(0, 32, (2, 6)), torch.tensor([1, 2]))
    assert len(rotated) == 2 * model.config.n_layer  # q and k of each layer
    for qk in rotated:  # [B, L, H, D]
        assert torch.count_nonzero(qk[:, 0]) == 0
        assert torch.all(qk[:, 1:].abs().sum(-1) > 0)


def reference_logits(model: GPT, idx: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """LlamaGen's GPT written out independently: complex-number RoPE, explicit masked softmax attention."""
    c, sd = model.config, model.state_dict()
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][cond][:, None], sd["tok_embeddings.weight"][idx]], 1)
    B, L, _ = x.shape
    half = c.head_dim // 2
    theta = 1.0 / c.rope_base ** (torch.arange(0, half, 2).float() / half)
    g = c.grid_size
    rows, cols = torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)
    angle = torch.cat([rows[:, None] * theta, cols[:, None] * theta], dim=1)  # [T, half]
    rot = torch.polar(torch.ones_like(angle), angle)
    rot = torch.cat([torch.zeros(c.cls_token_num, half, dtype=rot.dtype), rot])[:L, None]  # [L, 1, half]

    def rms(h, w):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def rope(t):  # [B, L, H, D]
        return torch.view_as_real(torch.view_as_complex(t.reshape(B, L, c.n_head, half, 2)) * rot).flatten(3)

    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for i in range(c.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (t.reshape(B, L, c.n_head, c.head_dim) for t in (h @ sd[p + "attention.wqkv.weight"].T).chunk(3, -1))
        scores = torch.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) / math.sqrt(c.head_dim)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, -1) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_forward_matches_independent_reference():
    model = random_gpt(n_layer=3, dim=48, n_head=3)  # head_dim 16: 4 row and 4 column pairs
    idx, cond = torch.randint(0, 32, (3, 15)), torch.tensor([0, 4, 10])  # 10 is the null class
    with torch.no_grad():
        logits = model(idx, cond)
    assert logits.shape == (3, 16, 32) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(model, idx, cond), rtol=1e-4, atol=1e-4)


def test_forward_is_causal():
    model = random_gpt()
    idx, cond = torch.randint(0, 32, (2, 15)), torch.tensor([3, 7])
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 32
    with torch.no_grad():
        a, b = model(idx, cond), model(changed, cond)
    # logits position j predicts token j from the class and tokens < j: token 8 first shows at position 9
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_cached_prefill_and_decode_equal_the_full_forward():
    model = random_gpt()
    idx, cond = torch.randint(0, 32, (2, 12)), torch.tensor([3, 7])
    with torch.no_grad():
        full = model(idx, cond)  # [2, 13, V]
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cond, cache)]  # class token and 5 image tokens in one chunk
        steps += [model.decode_one(idx[:, t], cache)[:, None] for t in range(5, 12)]
        # a multi-token chunk after a prefix (the masked branch of the cached attention)
        cache2 = model.new_cache(2)
        head = model(idx[:, :3], cond, cache2)
        tail = model._run(model.tok_embeddings(idx[:, 3:12]), cache2.length, cache2)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 13 and cache2.length == 13


def test_drop_labels_is_explicit():
    model = random_gpt(class_dropout_prob=0.5).train()
    idx, cond = torch.randint(0, 32, (64, 4)), torch.randint(0, 10, (64,))
    with torch.no_grad():
        kept = model(idx, cond)
        null = model(idx, torch.full_like(cond, 10))
        torch.manual_seed(1)
        dropped = model(idx, cond, drop_labels=True)
    assert torch.equal(kept, model.eval()(idx, cond))  # train mode alone never drops a label
    is_null = (dropped - null).abs().amax((1, 2)) == 0
    is_kept = (dropped - kept).abs().amax((1, 2)) == 0
    assert torch.all(is_null ^ is_kept) and 10 < is_null.sum() < 54


def test_with_block_size_runs_the_same_weights_on_a_larger_grid():
    model = random_gpt(block_size=16)  # 4 x 4
    bigger = model.with_block_size(36)  # 6 x 6
    assert bigger.config.block_size == 36 and bigger.freqs_cis.shape[0] == 37
    assert all(torch.equal(v, bigger.state_dict()[k]) for k, v in model.state_dict().items())
    idx, cond = torch.randint(0, 32, (2, 35)), torch.tensor([1, 2])
    with torch.no_grad():
        small_logits, big_logits = model(idx[:, :15], cond), bigger(idx, cond)
    assert big_logits.shape == (2, 36, 32)
    # the first grid row sits at the same (row, column) in both grids; the fifth token does not
    torch.testing.assert_close(big_logits[:, :5], small_logits[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(big_logits[:, 5:16], small_logits[:, 5:16])


def test_256_and_576_token_presets_run_from_one_state_dict():
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", vocab_size=32, num_classes=10, block_size=256))
    other = GPT(gpt_config("tiny", vocab_size=32, num_classes=10, block_size=576))
    other.load_state_dict(model.state_dict())  # strict
    with torch.no_grad():
        assert other(torch.zeros(1, 575, dtype=torch.long), torch.tensor([0])).shape == (1, 576, 32)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="GPT-Q") as err:
        gpt_config("GPT-Q")
    for name in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B", "tiny", "small"):
        assert name in str(err.value)


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="block_size must be a square number of tokens, got 250"):
        gpt_config("tiny", block_size=250)
    with pytest.raises(ConfigError, match="dim must be divisible by n_head"):
        gpt_config("tiny", dim=30, n_head=4)


def test_check_labels_names_the_bad_value():
    model = random_gpt()
    with pytest.raises(ValueError, match="class id 11 out of range"):
        model.check_labels(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class id -1 out of range"):
        model.check_labels(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="class id 10 out of range"):
        model.check_labels(torch.tensor([10]))  # the null class is not a label to sample
    model.check_labels(torch.tensor([10]), allow_null=True)
