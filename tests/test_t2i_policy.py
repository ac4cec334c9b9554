"""Text-to-image sampling and the LlamaGen T2I policy: sampled log-probs are the teacher-forced conditional
policy's, guidance runs against the null caption, padding is invisible, and a prompt reward trains it."""

import pytest
import torch
from tiny_t2i import DC, LC, V, left_padded_captions, random_t2i_gpt

from argrpo.gpt import GPT
from argrpo.prompts import digit_prompts
from argrpo.rewards.clip import ClipReward
from argrpo.sampling import SamplingConfig, caption_token_logprobs, sample_caption_tokens
from argrpo.t2i import LlamaGenT2IPolicy
from argrpo.text import PromptFeatures, StandInT5, compute_prompt_features, stand_in_text_encoder
from argrpo.vq import VQModel, vq_config

T = 16
# a small ViT-H-14-shaped open_clip model (the text vocabulary stays 49408 for the bundled BPE tokenizer)
SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
SETTINGS = {
    "plain": SamplingConfig(),
    "cfg": SamplingConfig(cfg_scale=4.0),
    "cfg_topk_topp_temp": SamplingConfig(cfg_scale=2.0, temperature=0.7, top_k=8, top_p=0.8),
    "cfg_interval": SamplingConfig(cfg_scale=3.0, cfg_interval=5),
}
COUNTS = [6, 3, 1, 4, 2]


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_t2i_gpt()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_logprobs_equal_teacher_forced_logprobs_with_captions(model, name):
    cfg = SETTINGS[name]
    captions, mask = left_padded_captions(COUNTS)
    sample = sample_caption_tokens(model, captions, mask, cfg, torch.Generator().manual_seed(0))
    assert sample.tokens.shape == (5, T) and sample.logprobs.dtype == torch.float32
    logp, entropy = caption_token_logprobs(model, captions, mask, sample.tokens, cfg.temperature)
    assert (logp - sample.logprobs).abs().max() < 1e-4
    assert torch.all(entropy > 0) and torch.all(entropy <= torch.log(torch.tensor(float(V))) + 1e-5)
    # an independent computation from one plain masked forward pass
    with torch.no_grad():
        logits = model(sample.tokens[:, :-1], captions, cond_mask=mask)[:, LC - 1 :] / cfg.temperature
    reference = logits.log_softmax(-1).gather(-1, sample.tokens[..., None])[..., 0]
    assert (reference - sample.logprobs).abs().max() < 1e-4


def test_guided_greedy_sampling_follows_the_null_caption_under_the_caption_mask(model):
    captions, mask = left_padded_captions(COUNTS, seed=1)
    cfg = SamplingConfig(cfg_scale=3.0, top_k=1)
    tokens = sample_caption_tokens(model, captions, mask, cfg).tokens
    with torch.no_grad():
        cond = model(tokens[:, :-1], captions, cond_mask=mask)[:, LC - 1 :]
        uncond = model(tokens[:, :-1], model.null_condition(5), cond_mask=mask)[:, LC - 1 :]
        unmasked_null = model(tokens[:, :-1], model.null_condition(5))[:, LC - 1 :]
    assert torch.equal(tokens, (uncond + 3.0 * (cond - uncond)).argmax(-1))
    # guidance really uses the masked null caption: the unmasked one would pick other tokens
    assert not torch.equal(tokens, (unmasked_null + 3.0 * (cond - unmasked_null)).argmax(-1))
    assert not torch.equal(tokens, cond.argmax(-1))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_padding_never_reaches_the_samples(model, cfg_scale):
    captions, mask = left_padded_captions(COUNTS, seed=2)
    garbage = captions + 20 * torch.randn(captions.shape, generator=torch.Generator().manual_seed(9)) * ~mask[..., None]
    cfg = SamplingConfig(cfg_scale=cfg_scale)
    a = sample_caption_tokens(model, captions, mask, cfg, torch.Generator().manual_seed(3))
    b = sample_caption_tokens(model, garbage, mask, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    c = sample_caption_tokens(model, garbage, None, cfg, torch.Generator().manual_seed(3))  # seen without a mask
    assert not torch.equal(a.logprobs, c.logprobs)


def test_cache_batch_is_doubled_only_when_guided(model, monkeypatch):
    sizes = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda batch: sizes.append(batch) or new_cache(batch))
    captions, mask = left_padded_captions([2, 3, 4])
    sample_caption_tokens(model, captions, mask, SamplingConfig(cfg_scale=1.0))
    sample_caption_tokens(model, captions, mask, SamplingConfig(cfg_scale=2.0))
    assert sizes == [3, 6]


def features_for(prompts, gpt: GPT) -> PromptFeatures:
    """Stand-in text features shaped for `gpt`'s captions."""
    encoder = stand_in_text_encoder(prompts, StandInT5(d_model=DC, d_kv=6, d_ff=24, num_heads=2),
                                    max_length=gpt.config.cls_token_num)
    return compute_prompt_features(encoder, prompts, dtype="float32")


def tiny_policy(prompts) -> LlamaGenT2IPolicy:
    gpt = random_t2i_gpt(vocab_size=64, n_layer=1)  # the tiny VQ's codebook
    torch.manual_seed(0)
    vq = VQModel(vq_config("tiny"))
    return LlamaGenT2IPolicy(gpt, vq, features_for(prompts, gpt))


PROMPTS = digit_prompts("train").prompts[:12]


def test_policy_rolls_out_scores_and_decodes_its_prompts():
    policy = tiny_policy(PROMPTS)
    assert (policy.num_conditions, policy.num_tokens, policy.vocab_size) == (12, 16, 64)
    conditions = torch.tensor([0, 5, 11, 5])
    rollout = policy.rollout(conditions, SamplingConfig(cfg_scale=2.5), torch.Generator().manual_seed(0))
    logp, entropy = policy(conditions, rollout.tokens)
    assert logp.shape == entropy.shape == (4, 16)
    assert (logp - rollout.logprobs).abs().max() < 1e-4
    # condition ids select captions: the same tokens under another prompt have other log-probs
    other, _ = policy(torch.tensor([1, 6, 10, 4]), rollout.tokens)
    assert (other - logp).abs().max() > 1e-3
    images = policy.decode(rollout.tokens)
    assert images.shape == (4, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="condition id 12 out of range"):
        policy.rollout(torch.tensor([12]), SamplingConfig())


def test_policy_keeps_features_out_of_its_weights_and_shares_them():
    policy = tiny_policy(PROMPTS)
    assert all(k.startswith("net.") for k in policy.state_dict())
    assert not any(t is policy.prompt_features.features for t in policy.parameters())
    ref = policy.frozen_copy()
    assert ref.prompt_features is policy.prompt_features and ref.tokenizer is policy.tokenizer
    assert ref.net is not policy.net and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.net.parameters())


def test_forward_passes_count_the_caption_prefill():
    policy = tiny_policy(PROMPTS)
    assert policy.forward_passes(SamplingConfig()) == LC + 16 - 1
    assert policy.forward_passes(SamplingConfig(cfg_scale=4.0)) == 2 * (LC + 16 - 1)
    assert policy.forward_passes(SamplingConfig(cfg_scale=4.0, cfg_interval=3)) == 2 * (LC + 16 - 1)


def test_policy_rejects_features_of_another_shape():
    gpt = random_t2i_gpt(vocab_size=64)
    vq = VQModel(vq_config("tiny"))
    wrong = PromptFeatures(torch.zeros(2, LC + 1, DC), torch.ones(2, LC + 1, dtype=torch.bool), ("a", "b"))
    with pytest.raises(ValueError, match=rf"prompt features are \[P, {LC + 1}, {DC}\]"):
        LlamaGenT2IPolicy(gpt, vq, wrong)
    with pytest.raises(ValueError, match="64 codes"):
        LlamaGenT2IPolicy(random_t2i_gpt(), vq, features_for(["a b"], gpt))


def test_one_gradient_step_with_a_prompt_reward_changes_the_policy(offline):
    policy = tiny_policy(PROMPTS)
    reward = ClipReward("ViT-H-14", "", prompts=PROMPTS, model_kwargs=SMALL_CLIP)
    conditions = torch.arange(12).repeat_interleave(2)
    rollout = policy.rollout(conditions, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(1))
    scores = reward(policy.decode(rollout.tokens), conditions)  # [24]
    assert scores.shape == (24,) and torch.isfinite(scores).all() and scores.std() > 0
    advantages = (scores - scores.mean()) / (scores.std() + 1e-4)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    logp, _ = policy(conditions, rollout.tokens)
    loss = -(advantages[:, None] * logp).mean()
    loss.backward()
    assert policy.net.cls_embedding.cap_proj.fc1.weight.grad.abs().sum() > 0  # the caption path is trained
    optimizer.step()
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert "net.cls_embedding.cap_proj.fc1.weight" in changed and "net.output.weight" in changed
    assert "net.cls_embedding.uncond_embedding" not in changed  # a buffer, never trained
