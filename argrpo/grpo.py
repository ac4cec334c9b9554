"""GRPO fine-tuning of any `Policy`: the configuration, one step (rollout -> score -> advantages ->
update) and the loop with checkpoints and resume (docs/method.md).

One iteration: draw B condition ids, sample G token sequences for each in one batched call, decode and
score them, normalise the rewards within each group of G (separately for the composite instance reward
and for LOO-FID), then take K optimizer steps on the clipped surrogate with a KL penalty to a reference
policy and an entropy bonus. The policy is the *conditional* model: log-probs come from conditional
logits, whatever guidance shaped the rollouts. The loop never asks which model family it trains.

Under torchrun every process draws the same B ids and rolls out its contiguous share of them (whole
groups, so advantages stay local); the LOO-FID sums and the entropy feedback are all-reduced, and the
gradient is averaged over processes by DDP, or by FSDP when the model is sharded (`parallelize`).

No non-finite value reaches the optimizer: a non-finite reward counts as 0 (and is counted), a
non-finite LOO-FID feature or a non-finite loss or gradient skips the iteration's update (counted in
`health/*`), `max_consecutive_skips` skipped updates in a row stop the run with `NonFiniteError`, and
non-finite weights are never written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from argrpo.checkpoints import save_checkpoint
from argrpo.config import Bool, ConfigError, Float, Int, load_section, require
from argrpo.distributed import (
    PARALLEL_MODES,
    Dist,
    all_gather_cat,
    all_reduce_sum,
    barrier,
    full_parameters,
    full_state,
    is_distributed,
    mean_metrics,
    mean_over_ranks,
    parallelize,
    rank_seed,
    shard_indices,
)
from argrpo.entropy import EntropyConfig, EntropyController
from argrpo.loss import RATIO_LEVELS, SURROGATES, group_advantages, policy_loss
from argrpo.policy import Policy, Rollout, decode_images
from argrpo.rewards import REWARDS, Reward
from argrpo.rewards.loo_fid import FeatureSums, LooFidConfig, LooFidReward, feature_sums
from argrpo.runstate import GRPORun, load_run, save_run, write_curves
from argrpo.sampling import SamplingConfig

REFERENCES = ("ema", "frozen")
PRECISIONS = ("fp32", "bf16", "bf16_params")
# LOO-FID scores the batch as a whole: it is configured by `loo_fid` and `fid_advantage_weight`
INSTANCE_REWARDS = tuple(sorted(name for name in REWARDS if name != "loo_fid"))


class NonFiniteError(RuntimeError):
    """Several consecutive iterations met non-finite values; the run stops rather than train on them."""


@dataclass(frozen=True)
class GRPOConfig:
    steps: Int = 600
    batch_classes: Int = 8  # B: condition ids per iteration (class labels, prompts)
    group_size: Int = 12  # G: samples per condition; advantages are normalised within each group
    inner_epochs: Int = 2  # K: optimizer steps on the same rollouts
    micro_batch: Int = 0  # sequences per forward/backward in the update; 0: all B*G at once
    clip_eps: Float = 0.2
    kl_beta: Float = 3.0
    reference: str = "ema"  # "ema": EMA of the policy; "frozen": the starting policy
    ref_ema_decay: Float = 0.999  # applied once per iteration
    ratio_level: str = "sequence"  # "sequence" (LOO-FID paper) or "token" (AR-GRPO)
    rewards: Mapping[str, Float] = field(default_factory=lambda: {"classifier": 1.0})  # instance rewards
    fid_advantage_weight: Float = 2.0  # advantage = A_instance + this * A_loo_fid
    loo_fid: LooFidConfig = field(default_factory=LooFidConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=1.5))  # rollouts
    lr: Float = 1e-5
    betas: tuple[Float, Float] = (0.9, 0.95)
    weight_decay: Float = 0.01
    grad_clip: Float = 1.0
    # fp32; bf16: autocast on CUDA over float32 weights (CPU runs float32); bf16_params: the network's weights
    # themselves in bfloat16 with no float32 master copy, on any device (the LOO-FID paper's code)
    precision: str = "bf16"
    decode_batch: Int = 64  # images decoded per tokenizer call
    checkpoint_every: Int = 50
    log_every: Int = 1
    max_consecutive_skips: Int = 3  # updates skipped in a row for non-finite values before the run stops
    seed: Int = 0
    # several processes: "ddp" replicates the policy; "fsdp" shards parameters, gradients and optimizer
    # state (GPT-XXL, GPT-3B), gathering the whole policy for each rollout
    parallel: str = "ddp"
    # where argrpo's defaults and the LOO-FID paper's code differ (docs/method.md, "Paper and defaults")
    surrogate: str = "pessimistic"  # pessimistic: PPO's max(-rA, -clip(r)A); optimistic: the paper's min
    fid_term: str = "joint"  # joint: one surrogate on A_inst + w A_fid; separate: the FID term clipped on its own
    group_reduction: str = "mean"  # mean over the batch; sum: the paper's sum over the G members of a group
    ratio_dropout: Bool = False  # condition dropout in the ratio passes (the paper's train-mode forwards)
    update_chunks: str = "micro_batch"  # micro_batch | group_member (the paper's per-member forwards)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rewards", dict(self.rewards))
        object.__setattr__(self, "betas", tuple(self.betas))
        require(self.steps >= 1, "steps", "must be >= 1", self.steps)
        require(self.batch_classes >= 1, "batch_classes", "must be >= 1", self.batch_classes)
        require(self.group_size >= 2, "group_size", "must be >= 2", self.group_size)
        require(self.inner_epochs >= 1, "inner_epochs", "must be >= 1", self.inner_epochs)
        require(self.micro_batch >= 0, "micro_batch", "must be >= 0 (0: the whole batch)", self.micro_batch)
        require(self.clip_eps > 0, "clip_eps", "must be > 0", self.clip_eps)
        require(self.kl_beta >= 0, "kl_beta", "must be >= 0", self.kl_beta)
        require(self.reference in REFERENCES, "reference", f"must be one of {', '.join(REFERENCES)}",
                self.reference)
        require(0 <= self.ref_ema_decay < 1, "ref_ema_decay", "must be in [0, 1)", self.ref_ema_decay)
        require(self.ratio_level in RATIO_LEVELS, "ratio_level", f"must be one of {', '.join(RATIO_LEVELS)}",
                self.ratio_level)
        for name, weight in self.rewards.items():
            if name == "loo_fid":
                raise ConfigError("rewards.loo_fid is not an instance reward: weight LOO-FID with "
                                  "fid_advantage_weight and configure it under loo_fid")
            if name not in INSTANCE_REWARDS:
                raise ConfigError(f"rewards.{name} is not a known reward; valid rewards: "
                                  f"{', '.join(INSTANCE_REWARDS)}")
            require(isinstance(weight, (int, float)) and weight >= 0, f"rewards.{name}", "must be >= 0", weight)
        require(self.fid_advantage_weight >= 0, "fid_advantage_weight", "must be >= 0", self.fid_advantage_weight)
        require(bool(self.rewards) or self.fid_advantage_weight > 0, "rewards",
                "must name a reward unless fid_advantage_weight > 0", self.rewards)
        require(isinstance(self.loo_fid, LooFidConfig), "loo_fid", "must be a LooFidConfig", self.loo_fid)
        require(isinstance(self.entropy, EntropyConfig), "entropy", "must be an EntropyConfig", self.entropy)
        require(isinstance(self.sampling, SamplingConfig), "sampling", "must be a SamplingConfig", self.sampling)
        require(self.lr > 0, "lr", "must be > 0", self.lr)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                "must be two numbers in [0, 1)", self.betas)
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        require(self.grad_clip > 0, "grad_clip", "must be > 0", self.grad_clip)
        require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}",
                self.precision)
        require(self.decode_batch >= 1, "decode_batch", "must be >= 1", self.decode_batch)
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1", self.checkpoint_every)
        require(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        require(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1",
                self.max_consecutive_skips)
        require(self.parallel in PARALLEL_MODES, "parallel", f"must be one of {', '.join(PARALLEL_MODES)}",
                self.parallel)
        for key, choices in (("surrogate", SURROGATES), ("fid_term", ("joint", "separate")),
                             ("group_reduction", ("mean", "sum")), ("update_chunks", ("micro_batch", "group_member"))):
            require(getattr(self, key) in choices, key, f"must be one of {', '.join(choices)}", getattr(self, key))


def grpo_config_from_params(section: Mapping | None) -> GRPOConfig:
    """The `grpo` section of params.yaml -> GRPOConfig; errors read `grpo.<key>` / `grpo.loo_fid.<key>`."""
    return load_section(GRPOConfig, section, "grpo")


def start_run(policy: Policy, cfg: GRPOConfig, dist: Dist | None = None) -> GRPORun:
    """Fresh run state; with several processes, each rolls out batch_classes / world_size conditions."""
    dist = dist or Dist()
    # equal shards: DDP averages the per-process mean losses, which is the global mean only then
    require(cfg.batch_classes % dist.world_size == 0, "grpo.batch_classes",
            f"must be divisible by the number of processes ({dist.world_size})", cfg.batch_classes)
    if cfg.precision == "bf16_params":
        policy.net.to(torch.bfloat16)
    reference = policy.frozen_copy()
    trainer = parallelize(policy, reference, dist, cfg.parallel)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    entropy = EntropyController(cfg.entropy, cfg.steps, policy.vocab_size)
    condition_rng = torch.Generator().manual_seed(cfg.seed)
    sample_rng = torch.Generator(device=policy.device).manual_seed(rank_seed(cfg.seed + 1, dist.rank))
    return GRPORun(policy, reference, optimizer, entropy, condition_rng, sample_rng, dist=dist,
                   trainer=trainer if trainer is not policy else None)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class PhaseTimer:
    """Wall-clock seconds per phase; synchronises CUDA so that queued kernels count where they ran."""

    def __init__(self, device: torch.device):
        self.device, self.last, self.seconds = device, time.perf_counter(), {}

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase], self.last = now - self.last, now


def finite_or_zero(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """scores with every non-finite value replaced by 0, and how many there were."""
    finite = torch.isfinite(scores)
    return torch.where(finite, scores, torch.zeros_like(scores)), int((~finite).sum())


def nonfinite_rows(features: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows of features [N, F] that hold a non-finite value or whose squares overflow the moments."""
    return ~torch.isfinite(features.square().sum(1))


def score_rewards(rewards: Mapping[str, tuple[Reward, float]], images: torch.Tensor,
                  conditions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the instance rewards [N] (float64: no weight can overflow it) and their stats.

    A non-finite score counts as 0 and is counted under reward/<name>_nonfinite.
    """
    composite = torch.zeros(images.shape[0], dtype=torch.float64, device=conditions.device)
    stats: dict[str, float] = {}
    for name, (reward, weight) in rewards.items():
        raw = reward(images, conditions).float().to(conditions.device)  # [N]
        scores, nonfinite = finite_or_zero(raw)
        kept = raw[torch.isfinite(raw)]
        stats[f"reward/{name}_mean"] = kept.mean().item() if kept.numel() else math.nan
        stats[f"reward/{name}_std"] = kept.std().item() if kept.numel() > 1 else 0.0
        stats[f"reward/{name}_nonfinite"] = float(nonfinite)
        composite += weight * scores.double()
    stats["reward/composite_mean"] = composite.float().mean().item()
    stats["reward/composite_std"] = composite.float().std().item()
    return composite, stats


# sequences per forward/backward when `micro_batch` is 0: the [n, L, V] logits of one chunk stay within
# this many elements (64 MB in float32), so that large vocabularies never build a whole-batch logits tensor
LOGITS_BUDGET = 1 << 24


def update_chunks(n: int, cfg: GRPOConfig, num_tokens: int, vocab_size: int) -> list[torch.Tensor]:
    """Index sets of the local batch [n] (groups of G contiguous) that each take one forward/backward.

    "micro_batch": contiguous chunks of `micro_batch` sequences (0: as many as LOGITS_BUDGET allows);
    "group_member": chunk g holds member g of every group, B sequences, as the LOO-FID paper's loop does
    (its stateless entropy coefficient is computed per such chunk).
    """
    if cfg.update_chunks == "group_member":
        return [torch.arange(g, n, cfg.group_size) for g in range(cfg.group_size)]
    size = cfg.micro_batch or max(1, LOGITS_BUDGET // (num_tokens * vocab_size))
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def grad_sync(trainer: torch.nn.Module, last: bool) -> AbstractContextManager:
    """DDP all-reduces gradients on the last backward of an epoch only; the earlier ones accumulate locally.

    (FSDP reduce-scatters every backward's gradients into the shards, which adds up to the same.)
    """
    if isinstance(trainer, DistributedDataParallel) and not last:
        return trainer.no_sync()
    return nullcontext()


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any: a skipped step must be skipped everywhere."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def policy_update(run: GRPORun, conditions: torch.Tensor, tokens: torch.Tensor, adv_instance: torch.Tensor,
                  adv_fid: torch.Tensor | None, cfg: GRPOConfig
                  ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, bool]:
    """K optimizer steps on the rollouts (docs/method.md, "The loss"); returns stats, the old log-probs and
    entropies [N, T], and whether the update was skipped for a non-finite loss or gradient (then no weight
    has moved).

    The old log-probs are epoch 0's own forward, detached (its ratio is exactly 1), unless `ratio_dropout`
    makes every pass stochastic: then, as in the LOO-FID paper, a separate no-grad pass draws its own
    condition dropout. With several processes each holds its share of the rollouts; DDP averages the
    gradient over them.
    """
    policy, trainer, device = run.policy, run.train_module, conditions.device
    n, temperature, drop = conditions.shape[0], cfg.sampling.temperature, cfg.ratio_dropout
    chunks = update_chunks(n, cfg, policy.num_tokens, policy.vocab_size)
    separate = adv_fid is not None and cfg.fid_term == "separate"
    advantages = adv_instance if separate or adv_fid is None else adv_instance + cfg.fid_advantage_weight * adv_fid
    # the paper sums its per-member losses over the G members of a group instead of averaging them
    scale = float(cfg.group_size) if cfg.group_reduction == "sum" else 1.0
    with torch.no_grad(), autocast(device, cfg.precision):
        logp_ref = [run.reference(conditions[c], tokens[c], temperature)[0] for c in chunks] if cfg.kl_beta else None
        logp_old = [policy(conditions[c], tokens[c], temperature, drop)[0] for c in chunks] if drop else None
    entropy_old = [None] * len(chunks)
    epochs, skipped = [], False
    for _ in range(cfg.inner_epochs):
        run.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i, c in enumerate(chunks):
            last = i == len(chunks) - 1
            with grad_sync(trainer, last=last and not (separate and drop)), autocast(device, cfg.precision):
                logp_new, entropy = trainer(conditions[c], tokens[c], temperature, drop)  # [n_c, T]
            if logp_old is None:
                logp_old = [None] * len(chunks)
            if logp_old[i] is None:  # epoch 0: the policy has not moved yet
                logp_old[i], entropy_old[i] = logp_new.detach(), entropy.detach()
            coef = run.entropy.coefficient(run.step, entropy.mean().item())
            loss, stats = policy_loss(
                logp_new, logp_old[i], advantages[c], None if logp_ref is None else logp_ref[i], entropy,
                clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta, entropy_coef=coef, level=cfg.ratio_level,
                form=cfg.surrogate, fid_advantages=adv_fid[c] if separate and not drop else None,
                fid_weight=cfg.fid_advantage_weight)
            share = scale * len(c) / n  # chunk losses add up to the batch mean (times G for "sum")
            (loss * share).backward()
            if separate and drop:  # the paper scores its FID term on a second forward with its own dropout
                with grad_sync(trainer, last=last), autocast(device, cfg.precision):
                    fid_logp = trainer(conditions[c], tokens[c], temperature, drop)[0]
                zero = torch.zeros_like(advantages[c])
                fid_loss, fid_stats = policy_loss(
                    fid_logp, logp_old[i], zero, None, entropy.detach(), clip_eps=cfg.clip_eps, kl_beta=0.0,
                    entropy_coef=0.0, level=cfg.ratio_level, form=cfg.surrogate, fid_advantages=adv_fid[c],
                    fid_weight=cfg.fid_advantage_weight)
                (fid_loss * share).backward()
                loss, stats["surrogate"] = loss + fid_loss, stats["surrogate"] + fid_stats["surrogate"]
            for key, value in {"loss": loss.item() * scale, "entropy_coef": coef, **stats}.items():
                totals[key] = totals.get(key, 0.0) + len(c) / n * value
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item()
        # the gradient norm is global (DDP has averaged, FSDP reduces over the shards); the loss is local
        if any_rank(not (math.isfinite(totals["loss"]) and math.isfinite(totals["grad_norm"]))):
            run.optimizer.zero_grad(set_to_none=True)
            skipped = True  # the same rollouts would give the same non-finite value in the next epoch
            break
        run.optimizer.step()
        epochs.append(totals)
    logp_old_all = torch.empty(n, tokens.shape[1], device=device)
    entropy_all = torch.empty(n, tokens.shape[1], device=device)
    for c, lp in zip(chunks, logp_old, strict=True):
        logp_old_all[c] = lp.float()
    for c, ent in zip(chunks, entropy_old, strict=True):
        if ent is not None:
            entropy_all[c] = ent.float()
    # the accumulating controller learns from this iteration's entropy, the global batch's on every process
    run.entropy.observe(mean_over_ranks(entropy_all.mean()).item())
    if cfg.reference == "ema" and not skipped:
        with torch.no_grad():
            for ref, p in zip(run.reference.parameters(), policy.parameters(), strict=True):
                ref.lerp_(p, 1.0 - cfg.ref_ema_decay)
    stats = {}
    if epochs:
        # the last epoch is the most off-policy one, where clipping and KL matter; the first a sanity check
        stats.update({f"policy/{key}": value for key, value in epochs[-1].items()
                      if key not in ("grad_norm", "entropy_coef")})
        stats["policy/ratio_mean_epoch0"] = epochs[0]["ratio_mean"]
        stats["policy/clip_frac_epoch0"] = epochs[0]["clip_frac_low"] + epochs[0]["clip_frac_high"]
        stats["optim/grad_norm"] = sum(e["grad_norm"] for e in epochs) / len(epochs)
        stats["entropy/coef"] = epochs[0]["entropy_coef"]
    stats["optim/lr"] = run.optimizer.param_groups[0]["lr"]
    return stats, logp_old_all, entropy_all, skipped


def rollout(run: GRPORun, conditions: torch.Tensor, cfg: GRPOConfig) -> Rollout:
    """Sample tokens for `conditions` [n] from the policy with this process's sampler stream."""
    with full_parameters(run.policy), autocast(conditions.device, cfg.precision):
        return run.policy.rollout(conditions, cfg.sampling, generator=run.sample_rng)


def global_sums(sums: FeatureSums) -> FeatureSums:
    """S1, S2, N of the whole batch, summed over processes in one collective (float64 counts are exact)."""
    if not is_distributed():
        return sums
    packed = all_reduce_sum(torch.cat([sums.s1, sums.s2, sums.s1.new_tensor([sums.n])]))  # [2F + 1]
    F = sums.s1.shape[0]
    return FeatureSums(packed[:F], packed[F : 2 * F], int(packed[-1]))


def draw_conditions(run: GRPORun, cfg: GRPOConfig) -> torch.Tensor:
    """This process's share of the global batch's condition ids, each repeated G times -> [b*G]."""
    B, G, dist = cfg.batch_classes, cfg.group_size, run.dist
    # every process draws the global batch and keeps its share: whole groups, so advantages stay local
    share = shard_indices(B, dist.rank, dist.world_size)
    ids = torch.randint(run.policy.num_conditions, (B,), generator=run.condition_rng)[share.start : share.stop]
    return ids.repeat_interleave(G).to(run.policy.device)


def grpo_step(run: GRPORun, rewards: Mapping[str, tuple[Reward, float]], loo_fid: LooFidReward | None,
              cfg: GRPOConfig) -> dict[str, float]:
    """One GRPO iteration: rollout, decode, score, advantages, K updates. Returns the step's metrics."""
    device, G, dist = run.policy.device, cfg.group_size, run.dist
    timer = PhaseTimer(device)
    conditions = draw_conditions(run, cfg)  # [b*G], b = B / world_size
    sample = rollout(run, conditions, cfg)  # tokens: [b*G, L]
    timer.lap("rollout")
    images = decode_images(run.policy, sample.tokens, cfg.decode_batch)  # [b*G, 3, H, W]
    run.last_images = images[::G].detach().float().cpu()  # one image per drawn condition: [b, 3, H, W]
    timer.lap("decode")

    composite, metrics = score_rewards(rewards, images, conditions)
    adv_fid = torch.zeros(composite.shape, device=device)
    bad_features = 0
    if loo_fid is not None:
        features = loo_fid.features(images)  # [b*G, F] float64
        bad_features = int(all_reduce_sum(torch.tensor([float(nonfinite_rows(features).sum())])).item())
        metrics["health/nonfinite_features"] = float(bad_features)
        if not bad_features:  # a non-finite feature would poison the batch sums and the EMA for good
            batch = all_gather_cat(features) if loo_fid.covariance == "full" else None  # [N, F]: every process's
            fid_rewards, nonfinite = finite_or_zero(
                loo_fid.score(features, global_sums(feature_sums(features)), batch=batch))
            adv_fid = group_advantages(fid_rewards.to(device), G)
            metrics.update({"reward/loo_fid_mean": fid_rewards.mean().item(),
                            "reward/loo_fid_std": fid_rewards.std().item(),
                            "reward/loo_fid_nonfinite": float(nonfinite),
                            **{f"fid/{key.removesuffix('_fid')}": value for key, value in loo_fid.last_stats.items()}})
    timer.lap("reward")

    adv_inst = group_advantages(composite, G).float()
    advantages = adv_inst + cfg.fid_advantage_weight * adv_fid  # [b*G]
    skipped = bad_features > 0
    if not skipped:
        update, logp_old, entropy_old, skipped = policy_update(
            run, conditions, sample.tokens, adv_inst, adv_fid if loo_fid is not None else None, cfg)
        metrics.update(update)
        metrics.update({
            # how far the sampler's log-probs drift from the teacher-forced ones (KV cache, precision)
            "policy/sampler_logp_gap": (sample.logprobs - logp_old).abs().mean().item(),
            "entropy/token": entropy_old.mean().item(),
            "entropy/normalised": run.entropy.normalised(entropy_old.mean().item()),
        })
    timer.lap("update")
    run.skipped_in_row = run.skipped_in_row + 1 if skipped else 0

    tokens = sample.tokens.numel()
    step_seconds = sum(timer.seconds.values())
    metrics.update({
        "advantage/mean": advantages.mean().item(),
        "advantage/std": advantages.std().item(),
        "advantage/instance_abs_mean": adv_inst.abs().mean().item(),
        "advantage/fid_abs_mean": adv_fid.abs().mean().item(),
        "health/skipped_update": float(skipped),
        **{f"time/{phase}": seconds for phase, seconds in timer.seconds.items()},
        "time/step": step_seconds,
        "throughput/rollout_tokens_per_s": tokens / max(timer.seconds["rollout"], 1e-9),
        "throughput/tokens_per_s": tokens / max(step_seconds, 1e-9),
    })
    # the logged row describes the global batch: per-process means averaged (stds are averaged per-process
    # stds), throughputs summed; the FID values are already global
    metrics = mean_metrics(metrics)
    for key in ("throughput/rollout_tokens_per_s", "throughput/tokens_per_s"):
        metrics[key] *= dist.world_size
    return metrics


def bootstrap_loo_fid(run: GRPORun, loo_fid: LooFidReward, cfg: GRPOConfig) -> None:
    """Start the LOO-FID EMA from the starting policy's own samples at the rollout settings."""
    n, dist = cfg.batch_classes * cfg.group_size, run.dist
    share = shard_indices(n, dist.rank, dist.world_size)
    features = []
    for _ in range(cfg.loo_fid.bootstrap_batches):
        ids = torch.randint(run.policy.num_conditions, (n,), generator=run.condition_rng)[share.start : share.stop]
        tokens = rollout(run, ids.to(run.policy.device), cfg).tokens
        features.append(loo_fid.features(decode_images(run.policy, tokens, cfg.decode_batch)))
    features = torch.cat(features)
    features = features[~nonfinite_rows(features)]  # a non-finite feature never enters the EMA
    loo_fid.bootstrap(features, global_sums(feature_sums(features)))


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str, names: set[str]) -> None:
    """Refuse non-finite values in the parameters `names` of `state` (buffers such as masks may hold -inf)."""
    bad = [key for key in names if state[key].is_floating_point() and not torch.isfinite(state[key]).all()]
    if bad:
        raise NonFiniteError(f"{what} holds non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:5])}); "
                             "not written")


def train_grpo(
    policy: Policy,
    rewards: Mapping[str, tuple[Reward, float]],
    loo_fid: LooFidReward | None,
    cfg: GRPOConfig,
    out_dir: str | Path,
    *,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_images: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> Policy:
    """Fine-tune `policy` in place with GRPO; resumes from out_dir/state.pt when it exists.

    `rewards`: name -> (instance reward, weight), typically built from `cfg.rewards`; `loo_fid`: the
    distribution-level reward (None: off). Writes out_dir/state.pt every `checkpoint_every` steps,
    out_dir/curves.csv (one row of metrics per step) and, at the end, out_dir/policy.pt: the network's
    weights in its family's layout. `log(step, metrics)` receives every `log_every`-th step's metrics,
    `log_images(step, images [b, 3, H, W] in [-1, 1])` one rollout image per condition of every
    `checkpoint_every`-th step (from step 0).

    Under torchrun every process calls this with the same arguments and its `dist`: each rolls out
    batch_classes / world_size conditions, the gradient is averaged over processes, and only rank 0 logs,
    shows progress and writes files; every process returns after the files are written. With
    `cfg.parallel == "fsdp"` the returned policy is sharded: read the weights from policy.pt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, curves_path = out_dir / "state.pt", out_dir / "curves.csv"
    # eval mode throughout: conditioning dropout would make the ratio's two log-prob passes differ
    policy.eval()
    run = start_run(policy, cfg, dist)
    main = run.dist.is_main
    if state_path.exists():
        load_run(state_path, run, loo_fid)
    elif loo_fid is not None and cfg.loo_fid.bootstrap:
        bootstrap_loo_fid(run, loo_fid, cfg)

    bar = tqdm(total=cfg.steps, initial=run.step, desc="grpo", disable=not (progress and main))
    while run.step < cfg.steps:
        metrics = {"step": run.step, **grpo_step(run, rewards, loo_fid, cfg)}
        run.history.append(metrics)
        if main and log is not None and run.step % cfg.log_every == 0:
            log(run.step, metrics)
        if main and log_images is not None and run.step % cfg.checkpoint_every == 0:
            log_images(run.step, run.last_images)
        if run.skipped_in_row >= cfg.max_consecutive_skips:
            if main:
                write_curves(curves_path, run.history)
            raise NonFiniteError(f"{run.skipped_in_row} consecutive GRPO steps (up to step {run.step}) met non-finite "
                                 f"values (features, loss or gradient; see health/* in {curves_path}); stopped "
                                 "without writing the policy")
        run.step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/composite_mean']:.3f}",
                        fid=f"{metrics.get('fid/ema', math.nan):.3f}")
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            save_run(state_path, run, loo_fid)
            if main:
                write_curves(curves_path, run.history)
    bar.close()
    weights = full_state(policy.net.state_dict())
    if main:
        check_finite_weights(weights, "the fine-tuned policy", {name for name, _ in policy.net.named_parameters()})
        write_curves(curves_path, run.history)
        save_checkpoint(out_dir / "policy.pt", weights)
    barrier()
    return policy
