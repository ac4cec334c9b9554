"""Compiled sampling: the static-shape model path equals the eager KV cache, prefill and decode trace to one
graph each without breaks, and the compiled sampler (CPU, inductor) draws the eager sampler's tokens from the
same random stream."""

from dataclasses import replace

import pytest
import torch
from tiny_models import random_gpt
from tiny_t2i import left_padded_captions, random_t2i_gpt

from argrpo import sampling
from argrpo.config import ConfigError
from argrpo.sampling import (
    SamplingConfig,
    _static_caches,
    attended_length,
    decode_and_pick,
    prefill_and_pick,
    race_noise,
    sample_caption_tokens,
    sample_tokens,
    token_logprobs,
)

LABELS = torch.tensor([0, 3, 3, 9, 5])
# guided up to token 4, then conditional: both branches of the step function run in one call
GUIDED = SamplingConfig(cfg_scale=2.5, cfg_interval=4, temperature=0.9, top_k=12, top_p=0.9)
# the compiled log-probs differ from the eager ones by float32 rounding only: attention over the whole
# fixed-size cache sums the masked keys' exact zeros in another order, and inductor fuses the reductions
# (measured: <= 5e-6 on log-probs of magnitude up to 8 with these random weights)
LOGPROB_ATOL = 2e-5


def steps_by_hand(model, cond, tokens, static: bool, mask=None) -> torch.Tensor:
    """Logits [B, L, V] of the prefill and of decoding `tokens` [B, L - 1] one at a time."""
    c = model.config
    cache = model.new_cache(cond.shape[0])
    with torch.no_grad():
        if not static:
            logits = [model.prefill(cond, cache, cond_mask=mask)]
            logits += [model.decode_one(tokens[:, t], cache) for t in range(tokens.shape[1])]
            return torch.stack(logits, 1)
        if mask is not None:
            model.mask_cache(cache, mask)
        logits = [model.prefill_at(cond, torch.arange(c.cls_token_num), cache)]
        for t in range(tokens.shape[1]):
            position = c.cls_token_num + t
            length = position + 1 + t % 3 if t % 4 else None  # the positions up to this one and a few unwritten
            logits.append(model.decode_at(tokens[:, t], torch.tensor([position]), cache, length))
        return torch.stack(logits, 1)


def test_static_shape_path_equals_the_eager_cache():
    model = random_gpt(0)
    tokens = torch.randint(0, 32, (5, 9), generator=torch.Generator().manual_seed(1))
    static, eager = steps_by_hand(model, LABELS, tokens, True), steps_by_hand(model, LABELS, tokens, False)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)
    # with padded captions: the mask over the whole cache hides the padding exactly as the eager one does
    t2i = random_t2i_gpt(0)
    captions, mask = left_padded_captions([6, 3, 1, 4])
    tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(2))
    static = steps_by_hand(t2i, captions, tokens, True, mask)
    torch.testing.assert_close(static, steps_by_hand(t2i, captions, tokens, False, mask), rtol=0, atol=1e-5)
    # the check has teeth: ignoring the mask changes the logits
    assert (static - steps_by_hand(t2i, captions, tokens, True)).abs().max() > 1e-2


def step_arguments(model, cond, cfg: SamplingConfig, N: int, mask=None):
    c = model.config
    cache = model.new_cache(cond.shape[0])
    if mask is not None:
        model.mask_cache(cache, mask)
    noise = race_noise((N, c.vocab_size), torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    return cache, noise


@pytest.mark.parametrize("family", ["c2i", "t2i"])
def test_prefill_and_decode_trace_to_one_graph_without_breaks(family):
    if family == "c2i":
        model, cond, mask, N = random_gpt(0), torch.cat([LABELS, torch.full_like(LABELS, 10)]), None, 5
    else:
        model, N = random_t2i_gpt(0), 4
        captions, mask = left_padded_captions([6, 3, 1, 4])
        cond, mask = torch.cat([captions, model.null_condition(N)]), torch.cat([mask, mask])
    cache, noise = step_arguments(model, cond, GUIDED, N, mask)
    c = model.config
    with torch.no_grad():
        prefill = torch._dynamo.explain(prefill_and_pick)(model, cond, torch.arange(c.cls_token_num), cache, noise,
                                                          N, GUIDED, True)
        token = torch.zeros(N, dtype=torch.long)
        decode = torch._dynamo.explain(decode_and_pick)(model, token, torch.tensor([c.cls_token_num]),
                                                        c.cls_token_num + 4, cache, noise, N, GUIDED, True)
    for explained in (prefill, decode):
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, so that a recompile counted in one is not hidden by another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_attended_length_rounds_up_to_whole_blocks():
    assert [attended_length(p, 257) for p in (0, 30, 31, 32, 63, 64, 223, 224, 255, 256)] == [
        32, 32, 32, 64, 64, 96, 224, 256, 256, 257]
    assert attended_length(5, 17) == 17  # never past the cache


def test_compiled_sampler_draws_the_eager_tokens_from_the_same_stream(monkeypatch):
    # blocks of 4 positions: the step attends to 4, 8, 12, 16 and 17 positions of the 17 in one call
    monkeypatch.setattr(sampling, "KV_BLOCK", 4)
    model = random_gpt(0, n_layer=1)  # one layer: the graph compiles faster, the maths is the same
    compiled_cfg = replace(GUIDED, compile="default")
    for seed, labels in ((5, LABELS), (6, LABELS.flip(0))):
        g_eager, g_compiled = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        eager = sample_tokens(model, labels, GUIDED, g_eager)
        # the second call (new labels, seed and cache) must reuse the first call's graphs
        with torch._dynamo.config.patch(error_on_recompile=seed == 6):
            compiled = sample_tokens(model, labels, compiled_cfg, g_compiled)
        assert torch.equal(compiled.tokens, eager.tokens)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=LOGPROB_ATOL)
        # the same noise was drawn: the generators stand at the same place
        assert torch.equal(g_compiled.get_state(), g_eager.get_state())
    # and they are the conditional policy's teacher-forced log-probs, as the eager sampler's are
    teacher_forced, _ = token_logprobs(model, labels, compiled.tokens, GUIDED.temperature)
    torch.testing.assert_close(compiled.logprobs, teacher_forced.detach(), rtol=0, atol=LOGPROB_ATOL)


def test_reduce_overhead_reuses_one_zeroed_cache_and_keeps_the_eager_tokens():
    """On a CPU "reduce-overhead" compiles without CUDA graphs, but keeps their fixed-address cache."""
    model = random_t2i_gpt(0, n_layer=1)
    cfg = SamplingConfig(cfg_scale=2.0, temperature=1.1)
    first = None
    for seed, counts in ((3, [6, 3, 1, 4]), (4, [2, 2, 5, 6])):
        captions, mask = left_padded_captions(counts, seed=seed)
        eager = sample_caption_tokens(model, captions, mask, cfg, torch.Generator().manual_seed(seed))
        compiled = sample_caption_tokens(model, captions, mask, replace(cfg, compile="reduce-overhead"),
                                         torch.Generator().manual_seed(seed))
        assert torch.equal(compiled.tokens, eager.tokens)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=LOGPROB_ATOL)
        # one cache for the doubled batch of 8, reused (and zeroed) by the second call
        cache = _static_caches[model][8]
        first = first or cache
        assert cache is first and cache.length == model.config.cls_token_num + model.config.block_size - 1


def test_compile_setting_names_the_valid_modes():
    with pytest.raises(ConfigError, match="compile must be one of off, default, reduce-overhead, got 'max'"):
        SamplingConfig(compile="max")
