"""LOO-FID rewards against from-scratch recomputations on the batch without each sample."""

import io

import numpy as np
import pytest
import torch

from argrpo.config import ConfigError, load_section
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward, feature_sums, loo_fid_rewards

EPS = 1e-6
BETA = 0.7


def batches(n_batches: int = 3, n: int = 6, dim: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.5 + 0.3 * k for k in range(n_batches)]


def reference() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5


def fid_of(mu: torch.Tensor, var: torch.Tensor) -> float:
    ref_mu, ref_std = reference()
    return float(((ref_mu - mu) ** 2).sum() + ((ref_std - (var.clamp_min(0) + EPS).sqrt()) ** 2).sum())


def fid_of_samples(x: torch.Tensor) -> float:
    return fid_of(x.mean(0), x.var(0, unbiased=False))


class HandEma:
    """An EMA of E[f] and E[f^2] kept by hand, step by step, with Adam's 1 - beta^t correction."""

    def __init__(self, debias: bool):
        self.m1, self.m2, self.t, self.debias = 0.0, 0.0, 0, debias

    def updated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return BETA * self.m1 + (1 - BETA) * x.mean(0), BETA * self.m2 + (1 - BETA) * (x**2).mean(0), self.t + 1

    def fid(self, m1, m2, t) -> float:
        if self.debias:
            m1, m2 = m1 / (1 - BETA**t), m2 / (1 - BETA**t)
        return fid_of(m1, m2 - m1**2)


def without(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.cat([x[:i], x[i + 1 :]])


def test_loo_batch_matches_recomputation_for_every_sample():
    ref_mu, ref_std = reference()
    for x in batches():
        rewards, _, stats = loo_fid_rewards(x, ref_mu, ref_std, mode="loo_batch", eps=EPS)
        full = fid_of_samples(x)
        for i in range(x.shape[0]):
            assert rewards[i].item() == pytest.approx(fid_of_samples(without(x, i)) - full, rel=1e-9, abs=1e-12)
        assert stats["batch_fid"] == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("debias", [False, True])
def test_ema_loo_matches_recomputation_over_steps(debias):
    ref_mu, ref_std = reference()
    reward = LooFidReward(None, ref_mu, ref_std, mode="ema_loo", ema_beta=BETA, debias=debias, eps=EPS)
    ema = HandEma(debias)
    for x in batches():
        rewards = reward.score(x)
        full = ema.fid(*ema.updated(x))
        for i in range(x.shape[0]):
            # the EMA as it would be after updating with the batch minus sample i
            expected = ema.fid(*ema.updated(without(x, i))) - full
            assert rewards[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert reward.last_stats["ema_fid"] == pytest.approx(full, rel=1e-12)
        assert reward.last_stats["batch_fid"] == pytest.approx(fid_of_samples(x), rel=1e-12)
        ema.m1, ema.m2, ema.t = ema.updated(x)  # the real update comes after the rewards
        state = reward.state_dict()
        torch.testing.assert_close(state["m1"], ema.m1)
        torch.testing.assert_close(state["m2"], ema.m2)
    assert rewards.dtype == torch.float32


def test_ema_scalar_shares_before_minus_after():
    ref_mu, ref_std = reference()
    reward = LooFidReward(None, ref_mu, ref_std, mode="ema_scalar", ema_beta=BETA, eps=EPS)
    ema = HandEma(debias=False)
    for k, x in enumerate(batches()):
        rewards = reward.score(x)
        after = ema.updated(x)
        expected = 0.0 if k == 0 else ema.fid(ema.m1, ema.m2, ema.t) - ema.fid(*after)  # a fresh EMA has no before
        torch.testing.assert_close(rewards, torch.full((x.shape[0],), expected, dtype=torch.float32))
        ema.m1, ema.m2, ema.t = after


def test_debiased_first_step_equals_batch_moments():
    ref_mu, ref_std = reference()
    x = batches(1)[0]
    batch, _, _ = loo_fid_rewards(x, ref_mu, ref_std, mode="loo_batch", eps=EPS)
    ema, state, _ = loo_fid_rewards(x, ref_mu, ref_std, mode="ema_loo", ema_beta=BETA, debias=True, eps=EPS)
    torch.testing.assert_close(ema, batch)
    assert state.weight == pytest.approx(1 - BETA)


def test_update_happens_after_scoring():
    ref_mu, ref_std = reference()
    x0, x1 = batches(2)
    _, state0, _ = loo_fid_rewards(x0, ref_mu, ref_std, mode="ema_loo", ema_beta=BETA, eps=EPS)
    expected, state1, _ = loo_fid_rewards(x1, ref_mu, ref_std, mode="ema_loo", state=state0, ema_beta=BETA, eps=EPS)
    reward = LooFidReward(None, ref_mu, ref_std, ema_beta=BETA, eps=EPS)
    reward.score(x0)
    torch.testing.assert_close(reward.score(x1), expected.float())  # scored against the EMA of x0 only
    torch.testing.assert_close(reward.state.m1, state1.m1)
    torch.testing.assert_close(reward.state.m1, BETA * state0.m1 + (1 - BETA) * x1.mean(0))


@pytest.mark.parametrize("mode", ["loo_batch", "ema_loo", "ema_scalar"])
def test_global_sums_let_each_process_score_its_own_samples(mode):
    """Two 'processes' holding halves of the batch, sums all-reduced, score as the whole batch does."""
    ref_mu, ref_std = reference()
    x0, x = batches(2)
    _, state, _ = loo_fid_rewards(x0, ref_mu, ref_std, mode=mode, ema_beta=BETA, eps=EPS)
    whole, whole_state, _ = loo_fid_rewards(x, ref_mu, ref_std, mode=mode, state=state, ema_beta=BETA, eps=EPS)
    parts = [feature_sums(x[:2]), feature_sums(x[2:])]
    sums = type(parts[0])(parts[0].s1 + parts[1].s1, parts[0].s2 + parts[1].s2, parts[0].n + parts[1].n)
    first, first_state, _ = loo_fid_rewards(x[:2], ref_mu, ref_std, sums=sums, mode=mode, state=state,
                                            ema_beta=BETA, eps=EPS)
    second, _, _ = loo_fid_rewards(x[2:], ref_mu, ref_std, sums=sums, mode=mode, state=state, ema_beta=BETA, eps=EPS)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(first_state.m2, whole_state.m2)


def test_bootstrap_starts_the_ema_at_the_given_moments():
    ref_mu, ref_std = reference()
    base, x = batches(2)
    reward = LooFidReward(None, ref_mu, ref_std, ema_beta=BETA, debias=True, eps=EPS)
    reward.bootstrap(base)
    torch.testing.assert_close(reward.state.m1, base.mean(0))
    torch.testing.assert_close(reward.state.m2, (base**2).mean(0))
    rewards = reward.score(x)
    m1 = BETA * base.mean(0) + (1 - BETA) * x.mean(0)  # weight stays 1: debiasing changes nothing
    m2 = BETA * (base**2).mean(0) + (1 - BETA) * (x**2).mean(0)
    assert reward.last_stats["ema_fid"] == pytest.approx(fid_of(m1, m2 - m1**2), rel=1e-12)
    m1_0 = BETA * base.mean(0) + (1 - BETA) * x[1:].mean(0)
    m2_0 = BETA * (base**2).mean(0) + (1 - BETA) * (x[1:] ** 2).mean(0)
    assert rewards[0].item() == pytest.approx(fid_of(m1_0, m2_0 - m1_0**2) - fid_of(m1, m2 - m1**2), rel=1e-5)


def test_call_uses_the_extractor_and_state_round_trips():
    class Extractor:
        def features(self, images):
            return images.flatten(1)[:, :5].float()

    ref_mu, ref_std = reference()
    images = torch.rand(6, 3, 4, 4) * 2 - 1
    reward = LooFidReward(Extractor(), ref_mu, ref_std, ema_beta=BETA, eps=EPS)
    scores = reward(images, torch.zeros(6, dtype=torch.long))
    assert scores.shape == (6,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    buffer = io.BytesIO()
    torch.save(reward.state_dict(), buffer)
    buffer.seek(0)
    restored = LooFidReward(Extractor(), ref_mu, ref_std, ema_beta=BETA, eps=EPS)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored(images, None), reward(images, None))


@pytest.mark.parametrize("key, value, message", [
    ("ema_beta", 1.0, "grpo.loo_fid.ema_beta must be in [0, 1), got 1.0"),
    ("mode", "fid", "grpo.loo_fid.mode must be one of loo_batch, ema_loo, ema_scalar, got 'fid'"),
])
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_section(LooFidConfig, {key: value}, "grpo.loo_fid")
    assert str(err.value) == message


@pytest.mark.parametrize("n, dim", [(8, 16), (24, 6)])  # fewer samples than dimensions, and more
def test_exact_full_covariance_loo_fid_equals_the_naive_recomputation(n, dim):
    from argrpo.metrics import frechet_distance
    from argrpo.rewards.loo_fid import full_loo_fid_rewards

    g = torch.Generator().manual_seed(n)
    real = torch.randn(300, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g,
                                                                                 dtype=torch.float64)
    mu_r, sigma_r = real.mean(0), torch.cov(real.T)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2 + 0.5
    rewards, full = full_loo_fid_rewards(x, mu_r, sigma_r)

    def naive(rows):  # clean-fid's formula with a D x D matrix square root
        xs = x[rows].numpy()
        return frechet_distance(xs.mean(0), np.cov(xs, rowvar=False), mu_r.numpy(), sigma_r.numpy())

    assert full == pytest.approx(naive(list(range(n))), rel=1e-6)
    loo = np.array([naive([j for j in range(n) if j != i]) for i in range(n)])
    np.testing.assert_allclose(rewards.numpy() + full, loo, rtol=1e-6)
    assert rewards.abs().max() > 1e-3  # the rewards differ from sample to sample: the comparison is real

    reward = LooFidReward(None, mu_r, sigma_r.diagonal().sqrt(), mode="loo_batch", covariance="full",
                          ref_sigma=sigma_r)
    torch.testing.assert_close(reward.score(x), rewards.float())
    assert reward.last_stats["batch_fid"] == pytest.approx(full)
