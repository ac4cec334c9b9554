"""The VAR transformer and VARPolicy: exact sizes and key layouts of d16-d30, the block-causal mask,
sampled log-probs against teacher forcing, the KV cache against recomputation, the guidance ramp,
checkpoints, and one GRPO step."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import random_gpt

from argrpo.checkpoints import CheckpointError, save_checkpoint
from argrpo.config import ConfigError
from argrpo.gpt import count_parameters
from argrpo.grpo import group_advantages, policy_loss
from argrpo.msvq import MSVQVAE, msvq_config
from argrpo.sampling import SamplingConfig
from argrpo.var import (
    VAR,
    VARPolicy,
    guidance_ramp,
    guided_logits,
    load_var,
    next_scale_loss,
    sample_scales,
    sample_scales_nocache,
    save_state_dict,
    var_config,
)

# the key/shape listing of the published checkpoints (VAR-d16..d30 and vae_ch160v4096z32.pth)
SHAPES = json.loads((Path(__file__).parent / "data" / "var_state_shapes.json").read_text())
CLASSES = 10
LABELS = torch.tensor([0, 3, 7, 9])
BUFFERS = {"lvl_1L", "attn_bias_for_masking"}


def tiny_vqvae(seed: int = 0) -> MSVQVAE:
    torch.manual_seed(seed)
    return MSVQVAE(msvq_config("tiny")).eval()  # 8 px, scales 1, 2, 3, 4: 30 tokens, 64 codes


def random_var(seed: int = 0, **overrides) -> VAR:
    """A tiny VAR whose weights are all non-trivial (VAR's init has near-zero gammas and head)."""
    torch.manual_seed(seed)
    model = VAR(var_config("tiny", msvq_config("tiny"), num_classes=CLASSES, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_mul_1H11"):
                p.uniform_(0.5, 2.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def policy(seed: int = 0, **kwargs) -> VARPolicy:
    return VARPolicy(random_var(seed), tiny_vqvae(seed), **kwargs)


@pytest.mark.parametrize("preset", ["VAR-d16", "VAR-d20", "VAR-d24", "VAR-d30"])
def test_released_sizes_and_every_key_and_shape(preset):
    with torch.device("meta"):
        model = VAR(var_config(preset, num_classes=1000))
    assert count_parameters(model) == SHAPES[preset]["params"]
    listing = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert listing == list(SHAPES[preset]["state"].items())  # same keys, shapes and order
    # every buffer is persistent, as in the listing: the mask, the scale ids and the zero k biases
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == BUFFERS | {f"blocks.{i}.attn.zero_k_bias" for i in range(model.config.depth)}
    assert buffers <= set(model.state_dict())


def test_released_parameter_counts():
    counts = {}
    for preset in ("VAR-d16", "VAR-d20", "VAR-d24", "VAR-d30"):
        with torch.device("meta"):
            counts[preset] = count_parameters(VAR(var_config(preset)))
    assert counts == {"VAR-d16": 310_283_520, "VAR-d20": 600_917_136, "VAR-d24": 1_033_399_360,
                      "VAR-d30": 2_010_020_356}


def fill(module: torch.nn.Module, seed: int, std: float) -> None:
    """Every floating-point weight, in state-dict order, from one seeded normal stream (buffers kept)."""
    g = torch.Generator().manual_seed(seed)
    fixed = ("attn_bias_for_masking", "ema_vocab_hit_SV", "zero_k_bias")
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not key.endswith(fixed):
                value.copy_(torch.randn(value.shape, generator=g) * std)


def test_matches_values_computed_by_vars_own_code():
    """Tokens, decoded pixels, teacher-forcing input, logits and a guided greedy sample of a small model in
    VAR's real architecture (the VQVAE at ch 32, 128 px, scales 1..8; a 2-block transformer) agree with the
    values FoundationVision/VAR's own modules compute on the same weights (tests/data, with its commit)."""
    ref = json.loads((Path(__file__).parent / "data" / "var_reference_values.json").read_text())
    cfg = msvq_config("VAR-VQVAE", vocab_size=256, cvae=16, ch=32, patch_nums=tuple(ref["patch_nums"]))
    vae = MSVQVAE(cfg).eval()
    fill(vae, 0, 0.1)
    net = VAR(var_config("tiny", cfg, depth=2, dim=64, n_head=2, num_classes=10)).eval()
    fill(net, 1, 0.3)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.tensor([1, 7])
    tokens = vae.encode(images)
    assert tokens.tolist() == ref["tokens"]
    with torch.no_grad():
        decoded = vae.decode_tokens(tokens)
        torch.testing.assert_close(decoded[:, :, ::16, ::16], torch.tensor(ref["decoded_subsampled"]),
                                   atol=1e-5, rtol=0)
        inputs = vae.var_input(tokens)
        assert abs(inputs.double().sum().item() - ref["var_input_sum"]) < 1e-3
        assert abs(inputs.double().abs().sum().item() - ref["var_input_abs_sum"]) < 1e-3
        logits = net(labels, inputs)
        torch.testing.assert_close(logits[:, ref["logits_positions"], :6], torch.tensor(ref["logits"]),
                                   atol=1e-4, rtol=1e-5)
        assert abs(logits.double().abs().mean().item() - ref["logits_abs_mean"]) < 1e-5
    # VAR's cfg 1.5 is cfg_scale 2.5 here
    sample = sample_scales(net, vae.quantize, labels, SamplingConfig(cfg_scale=2.5, top_k=1), None)
    guided = vae.fhat_to_image(sample.f_hat)
    torch.testing.assert_close(guided[:, :, ::16, ::16], torch.tensor(ref["guided_subsampled"]), atol=1e-5, rtol=0)


def test_scale_ids_mask_and_init():
    model = VAR(var_config("tiny", msvq_config("tiny"), num_classes=CLASSES))
    scales = [0] + [1] * 4 + [2] * 9 + [3] * 16
    assert model.lvl_1L.tolist() == [scales]
    mask = model.attn_bias_for_masking[0, 0]
    for i in range(30):
        for j in range(30):
            # VAR's -inf, as the most negative finite float32: the same softmax, and a finite state dict
            assert mask[i, j].item() == (0.0 if scales[j] <= scales[i] else torch.finfo(torch.float32).min)
    for block in model.blocks:
        torch.testing.assert_close(block.attn.scale_mul_1H11.exp(), torch.full((1, 2, 1, 1), 4.0))
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any() and not block.attn.zero_k_bias.any()
        # gammas start at 1e-5 of the rest: every block starts near the identity
        w = block.ada_lin[1].weight
        assert w[:64].abs().max() < 1e-3 * w[64:].abs().max()
    assert model.class_emb.weight.shape == (CLASSES + 1, 32)


def test_teacher_forcing_is_block_causal_by_scale():
    """Changing a token of scale k changes the logits of later scales only."""
    pol = policy()
    tokens = pol.rollout(LABELS, SamplingConfig(), torch.Generator().manual_seed(0)).tokens
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 64  # a token of scale 2 (positions 5..13)
    with torch.no_grad():
        inputs = [pol.tokenizer.var_input(t) for t in (tokens, changed)]
        a, b = (pol.net(LABELS, x) for x in inputs)
    torch.testing.assert_close(a[:, :14], b[:, :14], atol=1e-6, rtol=0)
    assert (a[:, 14:] - b[:, 14:]).abs().amax(-1).min() > 1e-4  # every later position moved
    # the network sees the label: another class changes scale 0's logits
    assert not torch.allclose(pol.net(LABELS + 1, inputs[0])[:, 0], a[:, 0])


SAMPLINGS = {
    "plain": SamplingConfig(),
    "guided": SamplingConfig(cfg_scale=2.5),
    "guided_filtered_tempered": SamplingConfig(cfg_scale=3.0, top_k=8, top_p=0.9, temperature=0.7),
    "filtered": SamplingConfig(top_k=5, temperature=1.3),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_sampled_logprobs_equal_teacher_forced(name):
    sampling = SAMPLINGS[name]
    pol = policy()
    rollout = pol.rollout(LABELS, sampling, torch.Generator().manual_seed(3))
    assert rollout.tokens.shape == rollout.logprobs.shape == (4, 30)
    assert rollout.logprobs.dtype == torch.float32 and (rollout.logprobs <= 0).all()
    logprobs, entropies = pol(LABELS, rollout.tokens, sampling.temperature)
    assert (logprobs - rollout.logprobs).abs().max() < 1e-4
    assert entropies.shape == (4, 30) and (entropies > 0).all()
    assert (entropies <= torch.log(torch.tensor(64.0)) + 1e-5).all()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_sampler_equals_recomputing_every_scale(cfg_scale):
    net, vq = random_var(), tiny_vqvae()
    sampling = SamplingConfig(cfg_scale=cfg_scale, top_k=1)
    cached = sample_scales(net, vq.quantize, LABELS, sampling, torch.Generator().manual_seed(0))
    reference = sample_scales_nocache(net, vq.quantize, LABELS, sampling, torch.Generator().manual_seed(0))
    assert torch.equal(cached.tokens, reference.tokens)
    torch.testing.assert_close(cached.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.f_hat, reference.f_hat, atol=1e-5, rtol=0)
    # seeded multinomial draws agree as well
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    a = sample_scales(net, vq.quantize, LABELS, sampling, torch.Generator().manual_seed(5))
    b = sample_scales_nocache(net, vq.quantize, LABELS, sampling, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)


def test_guidance_ramp_on_hand_made_logits():
    assert [guidance_ramp(1.5, k, 10) for k in (0, 3, 9)] == [0.0, 0.5, 1.5]
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 1.0])
    assert guided_logits(cond, uncond, 0.0).tolist() == [1.0, 2.0, 3.0]
    assert guided_logits(cond, uncond, 1.5).tolist() == [2.5, 3.5, 6.0]  # 2.5 cond - 1.5 uncond


def test_guided_sampler_follows_the_ramp():
    """Greedy guided tokens are the argmax of (1 + t_k) cond - t_k uncond, t_k = (cfg_scale - 1) k / (K - 1),
    with cond and uncond logits recomputed by teacher forcing on the sampled tokens."""
    net, vq = random_var(), tiny_vqvae()
    sampling = SamplingConfig(cfg_scale=4.0, top_k=1)
    tokens = sample_scales(net, vq.quantize, LABELS, sampling, None).tokens
    with torch.no_grad():
        inputs = vq.var_input(tokens)
        cond = net(LABELS, inputs)
        uncond = net(torch.full_like(LABELS, CLASSES), inputs)
    expected = []
    for k, span in enumerate(net.config.scale_slices):
        t = 3.0 * k / 3
        expected.append(((1 + t) * cond[:, span] - t * uncond[:, span]).argmax(-1))
    assert torch.equal(tokens, torch.cat(expected, 1))
    assert torch.equal(tokens[:, 0], cond[:, 0].argmax(-1))  # t = 0 at the first scale
    plain = sample_scales(net, vq.quantize, LABELS, SamplingConfig(top_k=1), None).tokens
    assert not torch.equal(plain, tokens)  # guidance changed the draw, so the check above has teeth


def test_sampler_feeds_the_teacher_forcing_inputs():
    """The VQVAE features the sampler feeds word_embed at each scale are the teacher-forcing input of
    the tokens it drew, and its f_hat is the one those tokens decode from."""
    pol = policy()
    seen = []
    hook = pol.net.word_embed.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    try:
        sample = sample_scales(pol.net, pol.tokenizer.quantize, LABELS, SamplingConfig(cfg_scale=2.0),
                               torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert [x.shape[1] for x in seen] == [4, 9, 16]
    torch.testing.assert_close(torch.cat(seen, 1), pol.tokenizer.var_input(sample.tokens), atol=1e-6, rtol=0)
    codes = pol.tokenizer.split_scales(sample.tokens)
    torch.testing.assert_close(sample.f_hat, pol.tokenizer.quantize.fhat_from_codes(codes), atol=1e-6, rtol=0)
    images = pol.decode(sample.tokens)
    assert images.shape == (4, 3, 8, 8) and images.abs().max() <= 1
    torch.testing.assert_close(images, pol.tokenizer.fhat_to_image(sample.f_hat), atol=1e-5, rtol=0)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    net = random_var()
    path = tmp_path / "var_tiny.pth"
    save_state_dict(path, net.state_dict())
    assert list(torch.load(path, weights_only=True)) == list(net.state_dict())  # bare, VAR's layout
    loaded = load_var(path, net.config)
    inputs = tiny_vqvae().var_input(torch.randint(0, 64, (4, 30), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(loaded(LABELS, inputs), net(LABELS, inputs))
        assert not torch.equal(random_var(seed=1)(LABELS, inputs), net(LABELS, inputs))
    state = net.state_dict()  # VAR's own files hold -inf where a token may not look: it loads as MASKED
    state["attn_bias_for_masking"] = state["attn_bias_for_masking"].masked_fill(state["attn_bias_for_masking"] < 0,
                                                                                float("-inf"))
    save_state_dict(tmp_path / "var_inf.pth", state)
    from_var = load_var(tmp_path / "var_inf.pth", net.config)
    assert torch.isfinite(from_var.attn_bias_for_masking).all()
    with torch.no_grad():
        assert torch.equal(from_var(LABELS, inputs), net(LABELS, inputs))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_var(tmp_path / "nowhere.pth", net.config)
    with pytest.raises(CheckpointError, match="shape mismatch for class_emb.weight"):
        load_var(path, var_config("tiny", msvq_config("tiny"), num_classes=5))
    save_checkpoint(tmp_path / "llamagen.pt", random_gpt().state_dict())  # a LlamaGen GPT is no VAR
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys") as err:
        load_var(tmp_path / "llamagen.pt", net.config)
    assert "attn_bias_for_masking" in str(err.value) and "tok_embeddings.weight" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_var(tmp_path / "junk.pth", net.config)


def test_condition_table_maps_ids_to_classes():
    # four (class, style) pairs: ids 0, 1 -> class 2; ids 2, 3 -> class 5
    styled = policy(condition_classes=[2, 2, 5, 5])
    plain = policy()
    assert styled.num_conditions == 4 and plain.num_conditions == CLASSES
    assert styled.num_tokens == 30 and styled.vocab_size == 64
    tokens = plain.rollout(torch.tensor([2, 5]), SamplingConfig(), torch.Generator().manual_seed(0)).tokens
    with torch.no_grad():
        torch.testing.assert_close(styled(torch.tensor([1, 3]), tokens)[0], plain(torch.tensor([2, 5]), tokens)[0])
    a = styled.rollout(torch.tensor([0, 2]), SamplingConfig(), torch.Generator().manual_seed(4))
    b = plain.rollout(torch.tensor([2, 5]), SamplingConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="condition id 4"):
        styled.rollout(torch.tensor([4]), SamplingConfig())
    with pytest.raises(ValueError, match="condition_classes"):
        policy(condition_classes=[0, CLASSES])
    assert "condition_classes" not in styled.state_dict()  # the table is no weight


def test_forward_passes_count_calls_per_scale():
    pol = policy()
    assert pol.forward_passes(SamplingConfig()) == 4.0
    assert pol.forward_passes(SamplingConfig(cfg_scale=1.5)) == 8.0
    with pytest.raises(ValueError, match="cfg_interval"):
        pol.rollout(LABELS, SamplingConfig(cfg_scale=2.0, cfg_interval=3))


def test_mismatched_pair_and_config_errors():
    with pytest.raises(ValueError, match="does not fit the VQVAE"):
        VARPolicy(random_var(), MSVQVAE(msvq_config("tiny", vocab_size=32)))
    with pytest.raises(ConfigError, match="dim"):
        var_config("tiny", dim=30, n_head=4)
    with pytest.raises(ConfigError, match="unknown VAR preset"):
        var_config("GPT-B")
    with pytest.raises(ValueError, match="scale boundary"):
        random_var()(LABELS, torch.zeros(4, 3, 8))


def test_label_dropout_only_when_asked():
    net = random_var(cond_drop_rate=0.5).train()
    inputs = tiny_vqvae().var_input(torch.randint(0, 64, (64, 30), generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(64) % CLASSES
    with torch.no_grad():
        plain = net(labels, inputs)
        assert torch.equal(net(labels, inputs), plain)  # train mode alone never drops a label
        torch.manual_seed(0)
        dropped = net(labels, inputs, drop_labels=True)
        null = net(torch.full_like(labels, CLASSES), inputs)
    same_as_null = (dropped - null).abs().amax((1, 2)) < 1e-6
    same_as_plain = (dropped - plain).abs().amax((1, 2)) < 1e-6
    assert (same_as_null ^ same_as_plain).all() and 10 < same_as_null.sum() < 54


def test_grpo_step_through_policy_forward_changes_the_network_only():
    pol = policy()
    reference = pol.frozen_copy()
    assert reference.tokenizer is pol.tokenizer
    labels = LABELS.repeat_interleave(3)  # 4 groups of 3
    rollout = pol.rollout(labels, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(0))
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(1))
    advantages = group_advantages(rewards, 3)
    before = {k: v.clone() for k, v in pol.net.state_dict().items()}
    tokenizer_before = {k: v.clone() for k, v in pol.tokenizer.state_dict().items()}
    optimizer = torch.optim.SGD(pol.net.parameters(), lr=0.05)
    logp, entropy = pol(labels, rollout.tokens)
    with torch.no_grad():
        logp_ref = reference(labels, rollout.tokens)[0]
    loss, _ = policy_loss(logp, rollout.logprobs, advantages, logp_ref, entropy, clip_eps=0.2, kl_beta=0.1,
                          entropy_coef=0.0)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in pol.net.state_dict().items() if not torch.equal(v, before[k])]
    assert {"head.weight", "class_emb.weight", "word_embed.weight", "pos_1LC", "blocks.0.attn.scale_mul_1H11"} \
        <= set(changed)
    assert not set(changed) & BUFFERS
    assert all(torch.equal(v, tokenizer_before[k]) for k, v in pol.tokenizer.state_dict().items())
    # the step moved the policy the way the advantages ask: better samples became likelier
    with torch.no_grad():
        gain = (pol(labels, rollout.tokens)[0] - logp).mean(1)
    assert (gain * advantages).sum() > 0


def test_next_scale_loss_trains_the_small_presets():
    vq = MSVQVAE(msvq_config("small")).eval()
    net = VAR(var_config("small", vq.config, num_classes=CLASSES))
    assert net.config.num_tokens == 30 and vq.config.image_size == 16
    tokens = vq.encode(torch.rand(8, 3, 16, 16) * 2 - 1)
    labels = torch.arange(8) % CLASSES
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = next_scale_loss(net, vq, labels, tokens, drop_labels=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(256.0)).item()) < 0.1  # VAR's init: a near-uniform head
    assert losses[-1] < 0.8 * losses[0]
