"""The GRPO objective: group-normalised advantages and the clipped policy loss (docs/method.md).

Nothing here knows the model: both functions take tensors and return tensors, so they can be checked
against hand-computed values.
"""

from __future__ import annotations

import torch

from argrpo.config import require

RATIO_LEVELS = ("sequence", "token")
SURROGATES = ("pessimistic", "optimistic")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards [B*G] or [B, G] (groups contiguous) -> [B*G].

    The std is the unbiased (n - 1) one, as torch's `.std()`. A group whose rewards are all equal gets
    exactly zero advantages (docs/method.md, "Group advantages").
    """
    r = rewards.reshape(-1, group_size).double()  # [B, G]; float64: LOO-FID differences can be tiny
    centred = r - r.mean(dim=1, keepdim=True)
    advantages = centred / (r.std(dim=1, keepdim=True) + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # rounding in the mean must not leak a signal
    return torch.where(same, torch.zeros_like(advantages), advantages).reshape(-1).to(rewards.dtype)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float, form: str) -> torch.Tensor:
    """mean( max(-r A, -clip(r) A) ) (PPO's pessimistic bound) or with `min` (the optimistic form the LOO-FID
    paper's code uses); ratio and adv broadcast to the same shape."""
    unclipped, clipped = -ratio * adv, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    return (torch.max(unclipped, clipped) if form == "pessimistic" else torch.min(unclipped, clipped)).mean()


def ratio_and_advantage(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance ratio [N] (sequence) or [N, T] (token) and the advantage shaped to match it."""
    if level == "sequence":
        return (logp_new.mean(1) - logp_old.mean(1)).exp(), advantages
    return (logp_new - logp_old).exp(), advantages[:, None]


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    logp_ref: torch.Tensor | None,
    entropy: torch.Tensor,
    *,
    clip_eps: float,
    kl_beta: float,
    entropy_coef: float,
    level: str = "sequence",
    form: str = "pessimistic",
    fid_advantages: torch.Tensor | None = None,
    fid_weight: float = 0.0,
    fid_logp_new: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + kl_beta * k3 KL - entropy_coef * mean token entropy (docs/method.md, "The loss").

    logp_new, logp_old, logp_ref, entropy: [N, T]; advantages: [N]. "sequence": one ratio per sample,
    exp(mean_t logp_new - mean_t logp_old), and the k3 term on the mean per-token log-ratio to the
    reference; "token": a ratio and a k3 term per token, averaged over tokens then samples (every sample
    has the same T, so that is the mean over [N, T]). `fid_advantages` adds a second clipped surrogate
    weighted `fid_weight` (the FID term clipped on its own), on `fid_logp_new` when its forward differed.
    """
    require(level in RATIO_LEVELS, "ratio_level", f"must be one of {', '.join(RATIO_LEVELS)}", level)
    require(form in SURROGATES, "surrogate", f"must be one of {', '.join(SURROGATES)}", form)
    ratio, adv = ratio_and_advantage(logp_new, logp_old, advantages, level)
    surrogate = clipped_surrogate(ratio, adv, clip_eps, form)
    if fid_advantages is not None:
        fid_ratio, fid_adv = ratio_and_advantage(
            logp_new if fid_logp_new is None else fid_logp_new, logp_old, fid_advantages, level)
        surrogate = surrogate + fid_weight * clipped_surrogate(fid_ratio, fid_adv, clip_eps, form)
    kl = torch.zeros((), device=logp_new.device)
    if logp_ref is not None:
        d = logp_ref.mean(1) - logp_new.mean(1) if level == "sequence" else logp_ref - logp_new
        # k3 = exp(d) - d - 1 >= 0; unbiased for KL(new || ref) per token, not on the sequence mean of d
        kl = (d.exp() - d - 1).mean()
    mean_entropy = entropy.mean()
    loss = surrogate + kl_beta * kl - entropy_coef * mean_entropy
    with torch.no_grad():  # the clip is active (no gradient) where the ratio left the band in A's direction
        stats = {
            "ratio_mean": ratio.mean().item(),
            "clip_frac_low": ((ratio < 1 - clip_eps) & (adv < 0)).float().mean().item(),
            "clip_frac_high": ((ratio > 1 + clip_eps) & (adv > 0)).float().mean().item(),
            "surrogate": surrogate.item(),
            "kl": kl.item(),
            "entropy": mean_entropy.item(),
        }
    return loss, stats
