"""The LOO-FID paper's training step, transcribed from scratch from its public code's description, against
argrpo's update run with the paper's options: the same loss values, gradients and weights.

The transcription follows the paper's loop: per group member g a forward on the B sequences (member g of
every group), the stateless entropy coefficient from that forward's entropy, the `min` (optimistic)
clipped surrogate on the sequence-level ratio, k3 to the frozen starting policy; the instance losses
summed over g and backpropagated, then the FID term (x2) with its own forwards, summed and
backpropagated; gradient clipping and one AdamW step per epoch.
"""

import math

import pytest
import torch
from test_policy import TablePolicy

from argrpo.entropy import EntropyConfig
from argrpo.grpo import GRPOConfig, policy_update, start_run
from argrpo.rewards.loo_fid import LooFidReward
from argrpo.sampling import SamplingConfig

B, G, L, V = 3, 4, 4, 5
ENTROPY = EntropyConfig(mode="adaptive", controller="stateless", target=0.9, warmup_frac=0.05)
PAPER = dict(batch_classes=B, group_size=G, clip_eps=0.2, kl_beta=3.0, reference="frozen", lr=0.05,
             betas=(0.9, 0.95), weight_decay=0.01, grad_clip=1.0, precision="fp32", steps=10,
             fid_advantage_weight=2.0, surrogate="optimistic", fid_term="separate", group_reduction="sum",
             update_chunks="group_member", ratio_level="sequence", entropy=ENTROPY, sampling=SamplingConfig())


def rollouts(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    conditions = torch.arange(B).repeat_interleave(G)  # [B*G], groups contiguous
    tokens = torch.randint(V, (B * G, L), generator=g)
    adv_inst, adv_fid = torch.randn(B * G, generator=g), torch.randn(B * G, generator=g)
    return conditions, tokens, adv_inst, adv_fid


def paper_step(policy: TablePolicy, reference: TablePolicy, conditions, tokens, adv_inst, adv_fid, epochs: int,
               step: int, total_steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The paper's update, written out; returns each epoch's loss and the last epoch's clipped gradients."""
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.01)
    seqs = tokens.view(B, G, L)  # the paper's [B, G, T] layout
    cond = conditions.view(B, G)[:, 0]
    a_inst, a_fid = adv_inst.view(B, G), adv_fid.view(B, G)

    def seq_logp(model, seq):
        logits = model.net.logits[cond]  # [B, T, V]: the table policy's teacher-forced logits
        logp = logits.log_softmax(-1)
        return logp.gather(-1, seq[..., None])[..., 0], logp

    with torch.no_grad():
        old = torch.stack([seq_logp(policy, seqs[:, g])[0].mean(1) for g in range(G)], dim=1)  # [B, G]
    losses = []
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for g in range(G):
            chosen, logp = seq_logp(policy, seqs[:, g])
            entropy = -(logp.exp() * logp).sum(-1).mean()
            progress = step / total_steps
            sched = 2.2e-3 * (progress / 0.05 if progress < 0.05 else 1.0)  # (before the decay)
            err = 0.9 - float(entropy.detach()) / math.log(V)
            if abs(err) > 0.015:
                sched *= math.exp(3.0 * err)
            coef = min(max(sched, 7e-5), 4e-3)
            ratio = (chosen.mean(1) - old[:, g]).exp()
            a = a_inst[:, g]
            loss_g = torch.min(-ratio * a, -ratio.clamp(0.8, 1.2) * a).mean() - coef * entropy
            with torch.no_grad():
                ref = seq_logp(reference, seqs[:, g])[0].mean(1)
            delta = ref - chosen.mean(1)
            loss_g = loss_g + 3.0 * (delta.exp() - delta - 1).mean()
            total = total + loss_g
        total.backward()
        fid_total = torch.zeros(())
        for g in range(G):
            chosen, _ = seq_logp(policy, seqs[:, g])
            ratio = (chosen.mean(1) - old[:, g]).exp()
            a = a_fid[:, g]
            fid_total = fid_total + 2 * torch.min(-ratio * a, -ratio.clamp(0.8, 1.2) * a).mean()
        fid_total.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        losses.append(float((total + fid_total).detach()))
    return losses, {name: p.grad.clone() for name, p in policy.named_parameters()}


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_update_with_the_papers_options_is_the_papers_update(epochs):
    conditions, tokens, adv_inst, adv_fid = rollouts()
    ours, theirs = TablePolicy(seed=0), TablePolicy(seed=0)
    with torch.no_grad():  # a reference away from the policy, so that the k3 term has a gradient
        theirs.net.logits.add_(0.3 * torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(7)))
        ours.net.logits.copy_(theirs.net.logits)
    reference = TablePolicy(seed=0)

    cfg = GRPOConfig(**PAPER, inner_epochs=epochs)
    run = start_run(ours, cfg)
    run.reference.net.logits.data.copy_(reference.net.logits)
    run.step = 4  # inside the warm-up, where the schedule and the clamp both matter
    stats, logp_old, _, skipped = policy_update(run, conditions, tokens, adv_inst, adv_fid, cfg)
    losses, grads = paper_step(theirs, reference, conditions, tokens, adv_inst, adv_fid, epochs, step=4,
                               total_steps=10)
    assert not skipped
    torch.testing.assert_close(ours.net.logits.grad, grads["net.logits"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.net.logits, theirs.net.logits, rtol=1e-5, atol=1e-7)
    assert stats["policy/loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert not torch.equal(ours.net.logits, TablePolicy(seed=0).net.logits)  # the update did move the policy


def test_the_other_choices_give_another_update():
    """Each of the paper's options changes the update on the same data (so the test above can fail)."""
    conditions, tokens, adv_inst, adv_fid = rollouts()
    results = {}
    for name, change in [("paper", {}), ("pessimistic", {"surrogate": "pessimistic"}),
                         ("joint", {"fid_term": "joint"}), ("mean", {"group_reduction": "mean"}),
                         ("accumulating", {"entropy": EntropyConfig(target=0.9)})]:
        policy = TablePolicy(seed=0)
        # a large step and three epochs, so that ratios leave the clip band and the two bounds differ
        cfg = GRPOConfig(**{**PAPER, "lr": 1.0, **change}, inner_epochs=3)
        run = start_run(policy, cfg)
        run.step = 4
        policy_update(run, conditions, tokens, adv_inst, adv_fid, cfg)
        results[name] = policy.net.logits.detach().clone()
    for name in ("pessimistic", "joint", "mean", "accumulating"):
        assert not torch.allclose(results[name], results["paper"], atol=1e-6), name


def test_the_bootstrap_counts_as_one_ema_update():
    """The paper's EMA starts from the base model's statistics as m = (1 - beta) * moments, t = 1; without
    debiasing, its first LOO rewards are then computed from that half-weight EMA."""
    g = torch.Generator().manual_seed(0)
    base, batch = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g,
                                                                                   dtype=torch.float64) + 0.5
    mu_r, std_r = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    beta, eps = 0.5, 1e-12
    reward = LooFidReward(None, mu_r, std_r, mode="ema_loo", ema_beta=beta, debias=False, eps=eps,
                          bootstrap_weight="one_update")
    reward.bootstrap(base)
    ours = reward.score(batch)

    # transcription: EMA buffers m1, m2 after the bootstrap, then the "peek" updates with and without i
    mu, var = base.mean(0), base.var(0, unbiased=False)
    m1, m2 = (1 - beta) * mu, (1 - beta) * (var + mu * mu)
    n, s1, s2 = batch.shape[0], batch.sum(0), (batch * batch).sum(0)

    def fid(a1, a2):
        std = torch.sqrt(torch.clamp(a2 - a1 * a1, min=0.0) + eps)
        return ((mu_r - a1) ** 2).sum(-1) + ((std_r - std) ** 2).sum(-1)

    full = fid(beta * m1 + (1 - beta) * s1 / n, beta * m2 + (1 - beta) * s2 / n)
    loo = fid(beta * m1 + (1 - beta) * (s1 - batch) / (n - 1), beta * m2 + (1 - beta) * (s2 - batch**2) / (n - 1))
    torch.testing.assert_close(ours, (loo - full).float(), rtol=1e-6, atol=1e-9)
    full_weight = LooFidReward(None, mu_r, std_r, mode="ema_loo", ema_beta=beta, debias=False, eps=eps)
    full_weight.bootstrap(base)
    assert not torch.allclose(full_weight.score(batch), ours)  # argrpo's default starts at full weight
