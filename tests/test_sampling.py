"""The KV-cache sampler: its log-probs are the teacher-forced conditional policy's, its tokens equal the
prefix-recomputing reference, guidance follows LlamaGen's formula, and bad settings fail with their value."""

import pytest
import torch
from tiny_models import random_gpt as tiny_gpt

from argrpo.config import ConfigError
from argrpo.gpt import GPT
from argrpo.sampling import (
    SamplingConfig,
    draw,
    filter_logits,
    sample_tokens,
    sample_tokens_nocache,
    token_logprobs,
)

V, C, T = 32, 10, 16  # vocab, classes (null id 10), image tokens (4 x 4)


def random_gpt(seed: int = 0) -> GPT:
    return tiny_gpt(seed, vocab_size=V, num_classes=C, block_size=T)


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_gpt()


LABELS = torch.tensor([0, 3, 3, 9, 5, 1])

SETTINGS = {
    "plain": SamplingConfig(),
    "cfg": SamplingConfig(cfg_scale=3.0),
    "cfg_topk_topp_temp": SamplingConfig(cfg_scale=2.0, temperature=0.7, top_k=8, top_p=0.8),
    "topk_temp": SamplingConfig(temperature=1.5, top_k=4),
    "cfg_interval": SamplingConfig(cfg_scale=4.0, cfg_interval=5, top_p=0.9),
}


def manual_logits(model: GPT, labels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional teacher-forced logits [N, T, V] from two plain forward passes."""
    with torch.no_grad():
        cond = model(tokens[:, :-1], labels)
        uncond = model(tokens[:, :-1], torch.full_like(labels, C))
    return cond, uncond


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_logprobs_equal_teacher_forced_logprobs(model, name):
    cfg = SETTINGS[name]
    sample = sample_tokens(model, LABELS, cfg, torch.Generator().manual_seed(0))
    assert sample.tokens.shape == (6, T) and sample.tokens.dtype == torch.long
    assert sample.logprobs.shape == (6, T) and sample.logprobs.dtype == torch.float32
    logp, entropy = token_logprobs(model, LABELS, sample.tokens, temperature=cfg.temperature)
    assert (logp - sample.logprobs).abs().max() < 1e-4
    # an independent computation of the same quantities from the conditional logits
    cond, uncond = manual_logits(model, LABELS, sample.tokens)
    reference = (cond / cfg.temperature).log_softmax(-1).gather(-1, sample.tokens[..., None])[..., 0]
    assert (reference - sample.logprobs).abs().max() < 1e-4
    reference_entropy = torch.distributions.Categorical(logits=cond / cfg.temperature).entropy()
    torch.testing.assert_close(entropy.detach(), reference_entropy, rtol=1e-4, atol=1e-4)
    # the distributions are far from uniform, so agreement says something
    assert (sample.logprobs + torch.log(torch.tensor(float(V)))).abs().max() > 0.5
    if cfg.guided:  # the guided log-probs are a different quantity: the sampler must not return them
        guided = uncond + (cond - uncond) * cfg.cfg_scale
        guided_logp = (guided / cfg.temperature).log_softmax(-1).gather(-1, sample.tokens[..., None])[..., 0]
        assert (guided_logp - sample.logprobs).abs().max() > 0.1


def test_token_logprobs_carry_gradients(model):
    tokens = torch.randint(0, V, (2, T))
    logp, entropy = token_logprobs(model, LABELS[:2], tokens)
    (logp.sum() + entropy.sum()).backward()
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_with_cache_equals_greedy_recomputing_the_prefix(model, cfg_scale):
    cfg = SamplingConfig(cfg_scale=cfg_scale, top_k=1)
    cached = sample_tokens(model, LABELS, cfg)
    recomputed = sample_tokens_nocache(model, LABELS, cfg)
    assert torch.equal(cached.tokens, recomputed.tokens)
    torch.testing.assert_close(cached.logprobs, recomputed.logprobs, rtol=1e-5, atol=1e-5)
    assert len({tuple(row) for row in cached.tokens.tolist()}) > 3  # not one degenerate sequence


def greedy_by_hand(model: GPT, labels: torch.Tensor, cfg_scale: float, guided_tokens: int) -> torch.Tensor:
    """Argmax decoding with two plain forward passes per step; guidance on tokens < guided_tokens only."""
    tokens = torch.empty(labels.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            cond = model(tokens, labels)[:, -1]
            logits = cond
            if t < guided_tokens:
                uncond = model(tokens, torch.full_like(labels, C))[:, -1]
                logits = uncond + (cond - uncond) * cfg_scale
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens


def test_guided_greedy_sampling_matches_hand_computation(model):
    guided = sample_tokens(model, LABELS, SamplingConfig(cfg_scale=4.0, top_k=1)).tokens
    assert torch.equal(guided, greedy_by_hand(model, LABELS, 4.0, guided_tokens=T))
    plain = sample_tokens(model, LABELS, SamplingConfig(top_k=1)).tokens
    assert not torch.equal(guided, plain)  # guidance at this scale changes the argmax


@pytest.mark.parametrize("interval", [0, 6])
def test_tokens_after_cfg_interval_follow_conditional_logits(model, interval):
    tokens = sample_tokens(model, LABELS, SamplingConfig(cfg_scale=4.0, cfg_interval=interval, top_k=1)).tokens
    # cfg_interval = i guides tokens 0..i + 1, as LlamaGen's generate does (its first token comes from the
    # prefill, then decode step j, which draws token j + 1, is guided while j <= i)
    assert torch.equal(tokens, greedy_by_hand(model, LABELS, 4.0, guided_tokens=interval + 2))
    assert not torch.equal(tokens, greedy_by_hand(model, LABELS, 4.0, guided_tokens=interval + 1))
    fully_guided = greedy_by_hand(model, LABELS, 4.0, guided_tokens=T)
    assert not torch.equal(tokens, fully_guided)


@pytest.mark.parametrize("cfg_scale,batch", [(0.0, 6), (0.5, 6), (1.0, 6), (1.5, 12), (3.0, 12)])
def test_cache_batch_is_doubled_only_when_guided(model, monkeypatch, cfg_scale, batch):
    sizes, prefill_batches = [], []
    new_cache, prefill = model.new_cache, model.prefill
    monkeypatch.setattr(model, "new_cache", lambda b: sizes.append(b) or new_cache(b))
    monkeypatch.setattr(model, "prefill",
                        lambda cond, cache: prefill_batches.append(cond.shape[0]) or prefill(cond, cache))
    sample_tokens(model, LABELS, SamplingConfig(cfg_scale=cfg_scale), torch.Generator().manual_seed(0))
    assert sizes == [batch] and prefill_batches == [batch]


def test_cfg_scale_at_most_one_samples_the_conditional_policy(model):
    ref = sample_tokens(model, LABELS, SamplingConfig(), torch.Generator().manual_seed(3))
    for scale in (0.0, 0.5, 1.0):
        other = sample_tokens(model, LABELS, SamplingConfig(cfg_scale=scale), torch.Generator().manual_seed(3))
        assert torch.equal(other.tokens, ref.tokens)


def test_seeded_sampling_with_cache_equals_the_reference_draw_for_draw(model):
    cfg = SamplingConfig(cfg_scale=2.0, top_p=0.9)
    cached = sample_tokens(model, LABELS, cfg, torch.Generator().manual_seed(7))
    recomputed = sample_tokens_nocache(model, LABELS, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(cached.tokens, recomputed.tokens)


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    cfg = SamplingConfig(cfg_scale=1.5)
    a = sample_tokens(model, LABELS, cfg, torch.Generator().manual_seed(11))
    b = sample_tokens(model, LABELS, cfg, torch.Generator().manual_seed(11))
    c = sample_tokens(model, LABELS, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert sample_tokens(model, LABELS, cfg).tokens.shape == (6, T)  # the global generator works too


def test_draw_follows_the_given_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.0, 0.7]).expand(40000, 4)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=4).float() / 40000
    # binomial standard error <= 0.0025: a 0.01 tolerance is 4 sigma
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.2, 0.0, 0.7]), rtol=0, atol=0.01)
    assert counts[2] == 0


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    inf = float("-inf")
    assert filter_logits(logits, 2, 1.0).isinf().tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 covers it, so the nucleus is the first two
    assert filter_logits(logits, 0, 0.7).isinf().tolist() == [[False, False, True, True]]
    assert filter_logits(logits, 0, 0.45).isinf().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, 0, 0.9).isinf().tolist() == [[False, False, False, True]]
    # the highest token always survives, and kept logits are untouched
    kept = filter_logits(logits, 3, 0.01)
    assert kept[0, 0] == logits[0, 0] and kept[0, 1:].tolist() == [inf, inf, inf]
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)


def test_top_k_one_token_per_step_is_the_argmax(model):
    sample = sample_tokens(model, LABELS, SamplingConfig(top_k=1, temperature=0.3), torch.Generator().manual_seed(0))
    cond, _ = manual_logits(model, LABELS, sample.tokens)
    assert torch.equal(sample.tokens, cond.argmax(-1))


@pytest.mark.parametrize("top_p", [0.0, 1.5, -0.1])
def test_top_p_outside_unit_interval_raises_with_value(top_p):
    with pytest.raises(ConfigError, match=f"top_p must be in \\(0, 1\\], got {top_p}"):
        SamplingConfig(top_p=top_p)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises_with_value(temperature):
    with pytest.raises(ConfigError, match=f"temperature must be > 0, got {temperature}"):
        SamplingConfig(temperature=temperature)


def test_negative_top_k_and_cfg_scale_raise():
    with pytest.raises(ConfigError, match="top_k must be >= 0.*got -1"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ConfigError, match="cfg_scale must be >= 0.*got -2.0"):
        SamplingConfig(cfg_scale=-2.0)


@pytest.mark.parametrize("bad", [10, 12, -1])
def test_class_id_out_of_range_raises_with_value(model, bad):
    labels = torch.tensor([1, bad, 2])
    with pytest.raises(ValueError, match=f"class id {bad} out of range \\[0, 9\\]"):
        sample_tokens(model, labels, SamplingConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match=f"class id {bad} out of range"):
        sample_tokens_nocache(model, labels)
