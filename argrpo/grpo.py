"""GRPO fine-tuning of the class-conditional GPT: group advantages, the clipped policy loss, the loop.

One iteration (SPEC §5): draw B class labels, sample G token sequences for each in one batched call,
decode and score them, normalise the rewards within each group of G (separately for the composite
instance reward and for LOO-FID), then take K optimizer steps on the clipped surrogate with a KL
penalty to a reference policy and an entropy bonus. The policy is the *conditional* model: log-probs
come from conditional logits, whatever guidance shaped the rollouts.

Under torchrun every process draws the same B labels and rolls out its contiguous share of them (whole
groups, so advantages stay local); the LOO-FID sums and the entropy feedback are all-reduced, and the
gradient is averaged over processes by DDP, or by FSDP when the model is sharded.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from argrpo.checkpoints import save_checkpoint
from argrpo.config import ConfigError, load_section, require
from argrpo.distributed import (
    Dist,
    all_gather_cat,
    all_reduce_sum,
    barrier,
    broadcast_module,
    full_parameters,
    full_state,
    is_distributed,
    load_full_optimizer_state,
    load_full_state,
    mean_metrics,
    mean_over_ranks,
    rank_seed,
    shard_indices,
    shard_model,
)
from argrpo.entropy import EntropyConfig, EntropyController
from argrpo.gpt import GPT
from argrpo.rewards import REWARDS, Reward
from argrpo.rewards.loo_fid import FeatureSums, LooFidConfig, LooFidReward, feature_sums
from argrpo.sampling import Sample, SamplingConfig, sample_tokens, token_logprobs
from argrpo.vq import VQModel

RATIO_LEVELS = ("sequence", "token")
REFERENCES = ("ema", "frozen")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
# LOO-FID scores the batch as a whole: it is configured by `loo_fid` and `fid_advantage_weight`
INSTANCE_REWARDS = tuple(sorted(name for name in REWARDS if name != "loo_fid"))


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 600
    batch_classes: int = 8  # B: class labels per iteration
    group_size: int = 12  # G: samples per label; advantages are normalised within each group
    inner_epochs: int = 2  # K: optimizer steps on the same rollouts
    micro_batch: int = 0  # sequences per forward/backward in the update; 0: all B*G at once
    clip_eps: float = 0.2
    kl_beta: float = 3.0
    reference: str = "ema"  # "ema": EMA of the policy; "frozen": the starting policy
    ref_ema_decay: float = 0.999  # applied once per iteration
    ratio_level: str = "sequence"  # "sequence" (LOO-FID paper) or "token" (AR-GRPO)
    rewards: Mapping[str, float] = field(default_factory=lambda: {"classifier": 1.0})  # instance rewards
    fid_advantage_weight: float = 2.0  # advantage = A_instance + this * A_loo_fid
    loo_fid: LooFidConfig = field(default_factory=LooFidConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=1.5))  # rollouts
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs float32
    decode_batch: int = 64  # images decoded per VQ call
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0
    # several processes: "ddp" replicates the policy; "fsdp" shards parameters, gradients and optimizer
    # state (GPT-XXL, GPT-3B), gathering the whole policy for each rollout
    parallel: str = "ddp"

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
        if self.reference == "ema":
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
        require(self.parallel in PARALLEL, "parallel", f"must be one of {', '.join(PARALLEL)}", self.parallel)


def grpo_config_from_params(section: Mapping[str, Any] | None) -> GRPOConfig:
    """The `grpo` section of params.yaml -> GRPOConfig; errors read `grpo.<key>` / `grpo.loo_fid.<key>`."""
    values = dict(section or {})
    nested = {"loo_fid": LooFidConfig, "entropy": EntropyConfig, "sampling": SamplingConfig}
    for key, cls in nested.items():
        if key in values:
            values[key] = load_section(cls, values[key], f"grpo.{key}")
    return load_section(GRPOConfig, values, "grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards [B*G] or [B, G] (groups contiguous) -> [B*G].

    The std is the unbiased (n - 1) one, as torch's `.std()` in the reference implementation.
    A group whose rewards are all equal gets exactly zero advantages.
    """
    r = rewards.reshape(-1, group_size).double()  # [B, G]; float64: LOO-FID differences can be tiny
    centred = r - r.mean(dim=1, keepdim=True)
    advantages = centred / (r.std(dim=1, keepdim=True) + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # rounding in the mean must not leak a signal
    return torch.where(same, torch.zeros_like(advantages), advantages).reshape(-1).to(rewards.dtype)


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    logp_ref: torch.Tensor,
    entropy: torch.Tensor,
    *,
    clip_eps: float,
    kl_beta: float,
    entropy_coef: float,
    level: str = "sequence",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + kl_beta * KL(k3) - entropy_coef * mean token entropy.

    logp_new, logp_old, logp_ref, entropy: [N, T]; advantages: [N]. "sequence": one ratio per sample,
    exp(mean_t logp_new - mean_t logp_old), and a sequence-level KL; "token": a ratio and a KL per token,
    averaged over tokens then samples (every sample has the same T, so that is the mean over [N, T]).
    """
    require(level in RATIO_LEVELS, "ratio_level", f"must be one of {', '.join(RATIO_LEVELS)}", level)
    if level == "sequence":
        log_ratio = logp_new.mean(1) - logp_old.mean(1)  # [N]
        d = logp_ref.mean(1) - logp_new.mean(1)  # [N]
        adv = advantages
    else:
        log_ratio = logp_new - logp_old  # [N, T]
        d = logp_ref - logp_new  # [N, T]
        adv = advantages[:, None]
    ratio = log_ratio.exp()
    surrogate = torch.max(-ratio * adv, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv).mean()
    kl = (d.exp() - d - 1).mean()  # k3: unbiased for KL(new || ref), always >= 0
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


@dataclass
class GRPORun:
    """The mutable state of a run: what a checkpoint saves and a resume restores."""

    policy: GPT
    reference: GPT
    optimizer: torch.optim.Optimizer
    entropy: EntropyController
    label_rng: torch.Generator  # CPU: draws the class labels of the global batch, the same on every process
    sample_rng: torch.Generator  # on the policy's device: drives this process's sampler
    step: int = 0  # iterations completed
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics row per iteration
    dist: Dist = field(default_factory=Dist)
    trainer: torch.nn.Module | None = None  # the update's forward/backward: the policy or its DDP wrapper

    @property
    def train_module(self) -> torch.nn.Module:
        return self.trainer if self.trainer is not None else self.policy


def start_run(policy: GPT, cfg: GRPOConfig, dist: Dist | None = None) -> GRPORun:
    """Fresh run state; with several processes, each rolls out batch_classes / world_size labels."""
    dist = dist or Dist()
    # equal shards: DDP averages the per-process mean losses, which is the global mean only then
    require(cfg.batch_classes % dist.world_size == 0, "grpo.batch_classes",
            f"must be divisible by the number of processes ({dist.world_size})", cfg.batch_classes)
    device = next(policy.parameters()).device
    trainer, sharded = None, dist.world_size > 1 and cfg.parallel == "fsdp"
    if dist.world_size > 1 and cfg.parallel == "ddp":
        # the wrapper broadcasts rank 0's weights, so the reference below starts the same on every process
        trainer = DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None)
    elif sharded:
        broadcast_module(policy)  # each process keeps its slice of its own copy: make the copies rank 0's
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    if sharded:  # the reference is sharded alike, so the EMA update runs slice by slice
        shard_model(policy)
        shard_model(reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    entropy = EntropyController.from_config(cfg.entropy, cfg.steps, policy.config.vocab_size)
    label_rng = torch.Generator().manual_seed(cfg.seed)
    sample_rng = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed + 1, dist.rank))
    return GRPORun(policy, reference, optimizer, entropy, label_rng, sample_rng, dist=dist, trainer=trainer)


def save_run(path: Path, run: GRPORun, loo_fid: LooFidReward | None) -> None:
    """Write the run state atomically; only tensors, dicts, lists and numbers, so weights_only loads it.

    Every process calls it (it gathers each one's sampler state and, under FSDP, the shards); rank 0
    writes the file, in the single-process format whatever the parallelism.
    """
    sample_rngs = all_gather_cat(run.sample_rng.get_state()[None])  # [world, S] uint8
    models = full_state({"policy": run.policy.state_dict(), "reference": run.reference.state_dict(),
                         "optimizer": run.optimizer.state_dict()})
    if not run.dist.is_main:
        return
    state = {
        "step": run.step,
        **models,
        "entropy": run.entropy.state_dict(),
        "loo_fid": loo_fid.state_dict() if loo_fid is not None else {},
        "label_rng": run.label_rng.get_state(),
        "sample_rng": run.sample_rng.get_state(),
        # one per process, rank order; copies, since a generator reads a view's storage from its start
        "sample_rngs": [rng.clone() for rng in sample_rngs],
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_run(path: Path, run: GRPORun, loo_fid: LooFidReward | None) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_full_state(run.policy, state["policy"])
    load_full_state(run.reference, state["reference"])
    load_full_optimizer_state(run.optimizer, state["optimizer"])
    run.entropy.load_state_dict(state["entropy"])
    if loo_fid is not None:
        loo_fid.load_state_dict(state["loo_fid"])
    run.label_rng.set_state(state["label_rng"])
    sample_rngs = state.get("sample_rngs", [state["sample_rng"]])
    if len(sample_rngs) != run.dist.world_size:
        raise ConfigError(f"{path} holds the sampler streams of {len(sample_rngs)} process(es); resume it with "
                          f"as many, got {run.dist.world_size}")
    run.sample_rng.set_state(sample_rngs[run.dist.rank])
    torch.set_rng_state(state["torch_rng"])
    run.step, run.history = int(state["step"]), list(state["history"])


def write_curves(path: Path, history: list[dict[str, float]]) -> None:
    """One row per iteration, one column per metric; written atomically."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


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


@torch.no_grad()
def decode_images(vq: VQModel, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """tokens [N, T] -> images [N, 3, H, W] in [-1, 1], `batch` at a time."""
    return torch.cat([vq.decode_tokens(tokens[i : i + batch]) for i in range(0, tokens.shape[0], batch)])


def score_rewards(rewards: Mapping[str, tuple[Reward, float]], images: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the instance rewards [N] and their stats; a non-finite score counts as 0."""
    composite = torch.zeros(images.shape[0], device=labels.device)
    stats: dict[str, float] = {}
    for name, (reward, weight) in rewards.items():
        scores = reward(images, labels).float().to(labels.device)  # [N]
        finite = torch.isfinite(scores)
        scores = torch.where(finite, scores, torch.zeros_like(scores))
        kept = scores[finite]
        stats[f"reward/{name}_mean"] = kept.mean().item() if kept.numel() else math.nan
        stats[f"reward/{name}_std"] = kept.std().item() if kept.numel() > 1 else 0.0
        stats[f"reward/{name}_nonfinite"] = float((~finite).sum())
        composite += weight * scores
    stats["reward/composite_mean"] = composite.mean().item()
    stats["reward/composite_std"] = composite.std().item()
    return composite, stats


def micro_batches(n: int, size: int) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def grad_sync(trainer: torch.nn.Module, last: bool) -> AbstractContextManager:
    """DDP all-reduces gradients on the last micro-batch's backward only; the earlier ones accumulate locally.

    (FSDP reduce-scatters every micro-batch's gradients into the shards, which adds up to the same.)
    """
    if isinstance(trainer, DistributedDataParallel) and not last:
        return trainer.no_sync()
    return nullcontext()


def policy_update(run: GRPORun, labels: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                  cfg: GRPOConfig) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """K optimizer steps on the rollouts; returns stats and the rollout's old log-probs and entropies [N, T].

    With several processes each holds its share of the rollouts; the gradient is averaged over them.
    """
    policy, trainer, device = run.policy, run.train_module, labels.device
    chunks, n = micro_batches(labels.shape[0], cfg.micro_batch), labels.shape[0]
    temperature = cfg.sampling.temperature
    with torch.no_grad(), autocast(device, cfg.precision):
        # recomputed rather than taken from the sampler: the same forward as the update, so the first
        # epoch's ratio is exactly 1 and clipping measures the policy's own movement
        old = [token_logprobs(policy, labels[c], tokens[c], temperature) for c in chunks]
        logp_ref = torch.cat([token_logprobs(run.reference, labels[c], tokens[c], temperature)[0] for c in chunks])
    logp_old, entropy_old = torch.cat([o[0] for o in old]), torch.cat([o[1] for o in old])  # [N, T]
    # the controller sees the global batch's entropy, so that it moves the same way on every process
    coef = run.entropy.update(run.step, mean_over_ranks(entropy_old.mean()).item())
    epochs = []
    for _ in range(cfg.inner_epochs):
        run.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i, c in enumerate(chunks):
            with grad_sync(trainer, last=i == len(chunks) - 1):
                with autocast(device, cfg.precision):
                    logp_new, entropy = token_logprobs(trainer, labels[c], tokens[c], temperature)
                loss, stats = policy_loss(logp_new, logp_old[c], advantages[c], logp_ref[c], entropy,
                                          clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta, entropy_coef=coef,
                                          level=cfg.ratio_level)
                share = (c.stop - c.start) / n  # micro-batch losses add up to the full-batch mean
                (loss * share).backward()
            for key, value in {"loss": loss.item(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + share * value
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item()
        run.optimizer.step()
        epochs.append(totals)
    if cfg.reference == "ema":
        with torch.no_grad():
            for ref, p in zip(run.reference.parameters(), policy.parameters(), strict=True):
                ref.lerp_(p, 1.0 - cfg.ref_ema_decay)
    # the last epoch is the most off-policy one, where clipping and KL matter; the first is a sanity check
    stats = {f"policy/{key}": value for key, value in epochs[-1].items() if key != "grad_norm"}
    stats["policy/ratio_mean_epoch0"] = epochs[0]["ratio_mean"]
    stats["policy/clip_frac_epoch0"] = epochs[0]["clip_frac_low"] + epochs[0]["clip_frac_high"]
    stats["optim/grad_norm"] = sum(e["grad_norm"] for e in epochs) / len(epochs)
    stats["optim/lr"] = run.optimizer.param_groups[0]["lr"]
    stats["entropy/coef"] = coef
    return stats, logp_old, entropy_old


def grpo_step(run: GRPORun, vq: VQModel, rewards: Mapping[str, tuple[Reward, float]],
              loo_fid: LooFidReward | None, cfg: GRPOConfig, num_classes: int) -> dict[str, float]:
    """One GRPO iteration: rollout, decode, score, advantages, K updates. Returns the step's metrics."""
    device = next(run.policy.parameters()).device
    B, G, dist = cfg.batch_classes, cfg.group_size, run.dist
    timer = PhaseTimer(device)
    # every process draws the global batch's labels and keeps its share: whole groups, so advantages stay local
    share = shard_indices(B, dist.rank, dist.world_size)
    labels = torch.randint(num_classes, (B,), generator=run.label_rng)[share.start : share.stop]
    labels = labels.repeat_interleave(G).to(device)  # [b*G], b = B / world_size
    sample = rollout(run, labels, cfg)  # tokens: [b*G, T]
    timer.lap("rollout")
    images = decode_images(vq, sample.tokens, cfg.decode_batch)  # [b*G, 3, H, W]
    timer.lap("decode")

    composite, metrics = score_rewards(rewards, images, labels)
    adv_fid = torch.zeros_like(composite)
    if loo_fid is not None:
        features = loo_fid.features(images)  # [b*G, F] float64
        fid_rewards = loo_fid.score(features, global_sums(feature_sums(features))).to(device)
        adv_fid = group_advantages(fid_rewards, G)
        metrics.update({"reward/loo_fid_mean": fid_rewards.mean().item(),
                        "reward/loo_fid_std": fid_rewards.std().item(),
                        "fid/batch": loo_fid.last_stats["batch_fid"], "fid/ema": loo_fid.last_stats["ema_fid"]})
    timer.lap("reward")

    adv_inst = group_advantages(composite, G)
    advantages = adv_inst + cfg.fid_advantage_weight * adv_fid  # [b*G]
    update, logp_old, entropy_old = policy_update(run, labels, sample.tokens, advantages, cfg)
    timer.lap("update")

    tokens = sample.tokens.numel()
    step_seconds = sum(timer.seconds.values())
    metrics.update(update)
    metrics.update({
        "advantage/mean": advantages.mean().item(),
        "advantage/std": advantages.std().item(),
        "advantage/instance_abs_mean": adv_inst.abs().mean().item(),
        "advantage/fid_abs_mean": adv_fid.abs().mean().item(),
        # how far the sampler's log-probs drift from the teacher-forced ones (KV cache, precision)
        "policy/sampler_logp_gap": (sample.logprobs - logp_old).abs().mean().item(),
        "entropy/token": entropy_old.mean().item(),
        "entropy/normalised": run.entropy.normalised(entropy_old.mean().item()),
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


def rollout(run: GRPORun, labels: torch.Tensor, cfg: GRPOConfig) -> Sample:
    """Sample tokens for `labels` [n] from the policy with this process's sampler stream."""
    with full_parameters(run.policy), autocast(labels.device, cfg.precision):
        return sample_tokens(run.policy, labels, cfg.sampling, generator=run.sample_rng)


def global_sums(sums: FeatureSums) -> FeatureSums:
    """S1, S2, N of the whole batch, summed over processes in one collective (float64 counts are exact)."""
    if not is_distributed():
        return sums
    packed = all_reduce_sum(torch.cat([sums.s1, sums.s2, sums.s1.new_tensor([sums.n])]))  # [2F + 1]
    F = sums.s1.shape[0]
    return FeatureSums(packed[:F], packed[F : 2 * F], int(packed[-1]))


def bootstrap_loo_fid(run: GRPORun, vq: VQModel, loo_fid: LooFidReward, cfg: GRPOConfig, num_classes: int) -> None:
    """Start the LOO-FID EMA from the starting policy's own samples at the rollout settings."""
    device = next(run.policy.parameters()).device
    n, dist = cfg.batch_classes * cfg.group_size, run.dist
    share = shard_indices(n, dist.rank, dist.world_size)
    features = []
    for _ in range(cfg.loo_fid.bootstrap_batches):
        labels = torch.randint(num_classes, (n,), generator=run.label_rng)[share.start : share.stop]
        tokens = rollout(run, labels.to(device), cfg).tokens
        features.append(loo_fid.features(decode_images(vq, tokens, cfg.decode_batch)))
    features = torch.cat(features)
    loo_fid.bootstrap(features, global_sums(feature_sums(features)))


def train_grpo(
    policy: GPT,
    vq: VQModel,
    rewards: Mapping[str, tuple[Reward, float]],
    loo_fid: LooFidReward | None,
    cfg: GRPOConfig,
    out_dir: str | Path,
    *,
    num_classes: int,
    log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> GPT:
    """Fine-tune `policy` in place with GRPO; resumes from out_dir/state.pt when it exists.

    `rewards`: name -> (instance reward, weight), typically built from `cfg.rewards`; `loo_fid`: the
    distribution-level reward (None: off). Writes out_dir/state.pt every `checkpoint_every` steps,
    out_dir/curves.csv (one row of metrics per step) and, at the end, out_dir/policy.pt in LlamaGen
    format. `log(step, metrics)` receives every `log_every`-th step's metrics.

    Under torchrun every process calls this with the same arguments and its `dist`: each rolls out
    batch_classes / world_size labels, the gradient is averaged over processes, and only rank 0 logs,
    shows progress and writes files; every process returns after the files are written. With
    `cfg.parallel == "fsdp"` the returned policy is sharded: read the weights from policy.pt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, curves_path = out_dir / "state.pt", out_dir / "curves.csv"
    # eval mode throughout: class dropout would condition the ratio's two log-prob passes differently
    policy.eval()
    vq.eval()
    run = start_run(policy, cfg, dist)
    main = run.dist.is_main
    if state_path.exists():
        load_run(state_path, run, loo_fid)
    elif loo_fid is not None and cfg.loo_fid.bootstrap:
        bootstrap_loo_fid(run, vq, loo_fid, cfg, num_classes)

    bar = tqdm(total=cfg.steps, initial=run.step, desc="grpo", disable=not (progress and main))
    while run.step < cfg.steps:
        metrics = {"step": run.step, **grpo_step(run, vq, rewards, loo_fid, cfg, num_classes)}
        run.history.append(metrics)
        if main and log is not None and run.step % cfg.log_every == 0:
            log(run.step, metrics)
        run.step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/composite_mean']:.3f}",
                        fid=f"{metrics.get('fid/ema', math.nan):.3f}")
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            save_run(state_path, run, loo_fid)
            if main:
                write_curves(curves_path, run.history)
    bar.close()
    weights = full_state(policy.state_dict())
    if main:
        write_curves(curves_path, run.history)
        save_checkpoint(out_dir / "policy.pt", weights)
    barrier()
    return policy
