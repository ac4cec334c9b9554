"""The GRPO loss and group advantages against numbers worked out by hand."""

import math

import pytest
import torch

from argrpo.loss import group_advantages, policy_loss

LOG = math.log


def sequence_case():
    """Four samples, two tokens each; sequence ratios 1.5, 0.5, 1.5, 0.5 with advantages 1, -2, -1, 2.

    Token log-ratios differ within a sample (+-0.3) so only the token *mean* gives the ratio.
    """
    logp_old = torch.tensor([[-1.0, -2.0], [-0.5, -1.5], [-3.0, -1.0], [-2.0, -2.0]], dtype=torch.float64)
    log_r = [LOG(1.5), LOG(0.5), LOG(1.5), LOG(0.5)]
    logp_new = logp_old + torch.tensor([[r + 0.3, r - 0.3] for r in log_r], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, -1.0, 2.0], dtype=torch.float64)
    # reference: mean_t(ref - new) = 0.5, -0.5, 0, 1 per sample (again uneven across tokens)
    d = [0.5, -0.5, 0.0, 1.0]
    logp_ref = logp_new + torch.tensor([[x + 0.1, x - 0.1] for x in d], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    return logp_new.requires_grad_(), logp_old, adv, logp_ref, entropy


def test_sequence_level_loss_by_hand():
    logp_new, logp_old, adv, logp_ref, entropy = sequence_case()
    loss, stats = policy_loss(logp_new, logp_old, adv, logp_ref, entropy,
                              clip_eps=0.2, kl_beta=3.0, entropy_coef=0.01, level="sequence")
    # per-sample max(-r A, -clip(r) A):
    #   r=1.5, A=1:  max(-1.5, -1.2) = -1.2  (clipped high)
    #   r=0.5, A=-2: max(1.0, 1.6)   = 1.6   (clipped low)
    #   r=1.5, A=-1: max(1.5, 1.2)   = 1.5   (not clipped: the move is penalised in full)
    #   r=0.5, A=2:  max(-1.0, -1.6) = -1.0  (not clipped)
    surrogate = (-1.2 + 1.6 + 1.5 - 1.0) / 4
    kl = ((math.exp(0.5) - 0.5 - 1) + (math.exp(-0.5) + 0.5 - 1) + 0.0 + (math.exp(1.0) - 1.0 - 1)) / 4
    expected = surrogate + 3.0 * kl - 0.01 * 1.5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["surrogate"] == pytest.approx(0.225)
    assert stats["kl"] == pytest.approx(kl)
    assert stats["entropy"] == pytest.approx(1.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_frac_low"] == pytest.approx(0.25)
    assert stats["clip_frac_high"] == pytest.approx(0.25)


def test_sequence_level_gradient_vanishes_where_clipped():
    logp_new, logp_old, adv, logp_ref, entropy = sequence_case()
    loss, _ = policy_loss(logp_new, logp_old, adv, logp_ref, entropy,
                          clip_eps=0.2, kl_beta=0.0, entropy_coef=0.0, level="sequence")
    loss.backward()
    # d/d logp_new[i, t] of -r_i A_i / N with r_i = exp(mean_t ...): -r_i A_i / (N T)
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.1875, 0.1875], [-0.125, -0.125]], dtype=torch.float64)
    torch.testing.assert_close(logp_new.grad, expected)


def test_token_level_loss_by_hand():
    logp_old = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=torch.float64)
    logp_new = logp_old + torch.tensor([[LOG(1.5), LOG(0.9)], [LOG(0.5), LOG(1.1)]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    d = torch.tensor([[0.2, -0.2], [0.0, 0.4]], dtype=torch.float64)
    logp_ref = logp_new + d
    entropy = torch.tensor([[3.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    loss, stats = policy_loss(logp_new, logp_old, adv, logp_ref, entropy,
                              clip_eps=0.2, kl_beta=0.1, entropy_coef=0.5, level="token")
    # tokens: A=1:  r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped high); r=0.9 -> -0.9
    #         A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped low);   r=1.1 -> 1.1
    surrogate = (-1.2 - 0.9 + 0.8 + 1.1) / 4
    k3 = [math.exp(x) - x - 1 for x in (0.2, -0.2, 0.0, 0.4)]
    kl = sum(k3) / 4
    expected = surrogate + 0.1 * kl - 0.5 * 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5 + 1.1) / 4)
    assert stats["clip_frac_low"] == pytest.approx(0.25)
    assert stats["clip_frac_high"] == pytest.approx(0.25)
    assert stats["kl"] == pytest.approx(kl)


def test_token_and_sequence_levels_differ():
    logp_new, logp_old, adv, logp_ref, entropy = sequence_case()
    kwargs = dict(clip_eps=0.2, kl_beta=1.0, entropy_coef=0.0)
    seq, _ = policy_loss(logp_new, logp_old, adv, logp_ref, entropy, level="sequence", **kwargs)
    tok, _ = policy_loss(logp_new, logp_old, adv, logp_ref, entropy, level="token", **kwargs)
    assert abs(seq.item() - tok.item()) > 1e-3


def test_on_policy_loss_is_minus_mean_advantage_and_kl_zero():
    torch.manual_seed(0)
    logp = -torch.rand(6, 5)
    adv = torch.randn(6)
    loss, stats = policy_loss(logp, logp, adv, logp, torch.zeros(6, 5), clip_eps=0.2, kl_beta=3.0,
                              entropy_coef=1.0, level="sequence")
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["ratio_mean"] == 1.0 and stats["kl"] == 0.0
    assert stats["clip_frac_low"] == 0.0 and stats["clip_frac_high"] == 0.0


def test_positive_advantage_raises_the_sample_log_prob():
    logp_old = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    logits = torch.zeros(2, 2, requires_grad=True)  # logp_new = logp_old + logits
    loss, _ = policy_loss(logp_old + logits, logp_old, torch.tensor([1.0, -1.0]), logp_old, torch.zeros(2, 2),
                          clip_eps=0.2, kl_beta=0.0, entropy_coef=0.0)
    loss.backward()
    assert (logits.grad[0] < 0).all() and (logits.grad[1] > 0).all()  # descent raises sample 0, lowers 1


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 6.0]), group_size=3)
    # group 1: mean 2, unbiased std 1; group 2: mean 6, unbiased std 2
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, 0.0]) / torch.tensor([1.0001] * 3 + [2.0001] * 3)
    torch.testing.assert_close(adv, expected)


def test_group_advantages_zero_mean_and_shapes():
    torch.manual_seed(0)
    rewards = torch.randn(5, 7) * 3 + 10
    adv = group_advantages(rewards, group_size=7)
    assert adv.shape == (35,)
    torch.testing.assert_close(adv.view(5, 7).mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv, group_advantages(rewards.reshape(-1), group_size=7))


def test_equal_rewards_give_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0])  # 0.1 is inexact in binary
    adv = group_advantages(rewards, group_size=3)
    assert torch.equal(adv[:6], torch.zeros(6))
    assert adv[6:].abs().sum() > 0
