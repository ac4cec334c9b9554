"""The run state of a GRPO fine-tuning: what a checkpoint holds and a resume restores, exactly.

A resumed run continues bit for bit where the saved one stopped: the policy, the KL reference, the
optimizer, the entropy controller, the LOO-FID moments, every random stream (the condition draws, each
process's sampler, torch's global stream) and the metric history all come back.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from argrpo.config import ConfigError
from argrpo.distributed import (
    Dist,
    all_gather_cat,
    full_state,
    load_full_optimizer_state,
    load_full_state,
)
from argrpo.entropy import EntropyController
from argrpo.policy import Policy
from argrpo.rewards.loo_fid import LooFidReward


@dataclass
class GRPORun:
    """The mutable state of a run."""

    policy: Policy
    reference: Policy  # the KL anchor: a frozen copy, moved towards the policy when it is an EMA
    optimizer: torch.optim.Optimizer
    entropy: EntropyController
    condition_rng: torch.Generator  # CPU: draws the condition ids of the global batch, the same on every process
    sample_rng: torch.Generator  # on the policy's device: drives this process's sampler
    step: int = 0  # iterations completed
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics row per iteration
    skipped_in_row: int = 0  # consecutive iterations whose update was skipped for a non-finite value
    dist: Dist = field(default_factory=Dist)
    trainer: torch.nn.Module | None = None  # the update's forward/backward: the policy or its DDP wrapper
    # the last rollout's images on this process (its first group members), for logging; not checkpointed
    last_images: torch.Tensor | None = None  # [n, 3, H, W] in [-1, 1], CPU

    @property
    def train_module(self) -> torch.nn.Module:
        return self.trainer if self.trainer is not None else self.policy


def save_run(path: Path, run: GRPORun, loo_fid: LooFidReward | None) -> None:
    """Write the run state atomically; only tensors, dicts, lists and numbers, so weights_only loads it.

    Every process calls it (it gathers each one's sampler state and, under FSDP, the shards); rank 0
    writes the file, in the single-process format whatever the parallelism.
    """
    sample_rngs = all_gather_cat(run.sample_rng.get_state()[None])  # [world, S] uint8
    models = full_state({"policy": run.policy.net.state_dict(), "reference": run.reference.net.state_dict(),
                         "optimizer": run.optimizer.state_dict()})
    if not run.dist.is_main:
        return
    state = {
        "step": run.step,
        **models,
        "entropy": run.entropy.state_dict(),
        "loo_fid": loo_fid.state_dict() if loo_fid is not None else {},
        "label_rng": run.condition_rng.get_state(),
        "sample_rng": run.sample_rng.get_state(),
        # one per process, rank order; copies, since a generator reads a view's storage from its start
        "sample_rngs": [rng.clone() for rng in sample_rngs],
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "skipped_in_row": run.skipped_in_row,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_run(path: Path, run: GRPORun, loo_fid: LooFidReward | None) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_full_state(run.policy.net, state["policy"])
    load_full_state(run.reference.net, state["reference"])
    load_full_optimizer_state(run.optimizer, state["optimizer"])
    run.entropy.load_state_dict(state["entropy"])
    if loo_fid is not None:
        loo_fid.load_state_dict(state["loo_fid"])
    run.condition_rng.set_state(state["label_rng"])
    sample_rngs = state.get("sample_rngs", [state["sample_rng"]])
    if len(sample_rngs) != run.dist.world_size:
        raise ConfigError(f"{path} holds the sampler streams of {len(sample_rngs)} process(es); resume it with "
                          f"as many, got {run.dist.world_size}")
    run.sample_rng.set_state(sample_rngs[run.dist.rank])
    torch.set_rng_state(state["torch_rng"])
    run.step, run.history = int(state["step"]), list(state["history"])
    run.skipped_in_row = int(state.get("skipped_in_row", 0))


def write_curves(path: Path, history: list[dict[str, float]]) -> None:
    """One row per iteration, one column per metric; written atomically."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)
