"""Multi-process runs under torchrun: the process group, each process's share of the work, collectives.

`torchrun --nproc_per_node N script.py` starts N copies of the script with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; `init_distributed` joins them into one
process group (NCCL when the processes run on GPUs, gloo on CPU). A script started plainly gets a
single-process `Dist` and no process group, and every collective here is then the identity, so the
library calls them unconditionally and a single process computes exactly what it did before.

Models too large to replicate (GPT-XXL, GPT-3B with AdamW state) are sharded with FSDP: `shard_model`,
`full_parameters` for code that bypasses `forward`, and whole state dicts in and out.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from argrpo.config import Int, require

# what a torchrun argument may contain: the stage command is a shell line, so no quoting, no expansion
SAFE_ARGUMENT = re.compile(r"[A-Za-z0-9_.:=/,@+-]+")


@dataclass(frozen=True)
class DistributedConfig:
    """The `distributed` section: how grpo, sample and evaluate are launched through torchrun."""

    nproc_per_node: Int = 1  # processes per machine (GPUs)
    torchrun_args: str = "--standalone"  # e.g. --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500

    def __post_init__(self) -> None:
        require(self.nproc_per_node >= 1, "nproc_per_node", "must be >= 1", self.nproc_per_node)
        bad = [arg for arg in self.torchrun_args.split() if not SAFE_ARGUMENT.fullmatch(arg)]
        require(not bad, "torchrun_args", "must be plain torchrun options (letters, digits and . _ : = / , @ + - "
                "only; no shell syntax)", self.torchrun_args)

    @property
    def world_size(self) -> int | None:
        """Processes in all: nproc_per_node x --nnodes; None when --nnodes is an elastic range."""
        args = self.torchrun_args.replace("=", " ").split()
        nodes = args[args.index("--nnodes") + 1] if "--nnodes" in args[:-1] else "1"
        return self.nproc_per_node * int(nodes) if nodes.isdigit() else None


# odd 64-bit constant (2^64 / golden ratio): consecutive streams get seeds far apart
SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank on this machine, which picks the GPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and the logs."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group, or describe a single process when not launched by torchrun.

    `device` as `model.device`: auto | cpu | cuda. On CUDA each process takes GPU `LOCAL_RANK` and
    makes it current, so `torch.device("cuda")` elsewhere in the program means that GPU.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        gpu = torch.device("cuda", local_rank)
        torch.cuda.set_device(gpu)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl", rank=rank, world_size=world, device_id=gpu)
        return Dist(rank, world, local_rank, gpu)
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, torch.device("cpu"))


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    """A process group of more than one process exists."""
    return tdist.is_initialized() and tdist.get_world_size() > 1


def derived_seed(seed: int, stream: int) -> int:
    """The seed of stream `stream` (a process, a chunk of images) of a run seeded `seed`.

    Stream 0 gets `seed` itself, so a single process keeps the seeds it had before the streams.
    """
    return (seed + stream * SEED_STRIDE) % 2**64


def rank_seed(global_seed: int, rank: int) -> int:
    """This process's seed: distinct per rank, rank 0's equal to `global_seed`."""
    return derived_seed(global_seed, rank)


def shard_indices(n: int, rank: int, world: int) -> range:
    """This rank's contiguous share of range(n); the first n % world ranks take one item more.

    The shards of ranks 0..world-1 tile range(n) in order: no overlap, no gap.
    """
    if not (0 <= rank < world):
        raise ValueError(f"rank must be in [0, {world - 1}], got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def wire_device() -> torch.device:
    """The device the backend's collectives take their tensors on: NCCL needs the GPU, gloo the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over all processes, on the input's device (the input is unchanged)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().to(wire_device(), copy=True)
    tdist.all_reduce(out)
    return out.to(tensor.device)


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise mean over processes; with equal shards the mean of per-process means is the global mean."""
    return all_reduce_sum(tensor) / tdist.get_world_size() if is_distributed() else tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` [n_r, ...] concatenated in rank order -> [sum n_r, ...]; the n_r may differ."""
    if not is_distributed():
        return tensor
    wire = wire_device()
    local = tensor.detach().to(wire)
    sizes = [torch.zeros(1, dtype=torch.long, device=wire) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, torch.tensor([local.shape[0]], device=wire))
    longest = max(int(s) for s in sizes)
    # all_gather moves equal shapes only: pad every shard to the longest, then cut the padding off
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=wire)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded)
    return torch.cat([part[: int(s)] for part, s in zip(parts, sizes, strict=True)]).to(tensor.device)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes (one collective); every process must pass the same keys in order."""
    if not is_distributed():
        return metrics
    values = mean_over_ranks(torch.tensor(list(metrics.values()), dtype=torch.float64))
    return dict(zip(metrics, values.tolist(), strict=True))



PARALLEL_MODES = ("ddp", "fsdp")


def parallelize(model: torch.nn.Module, frozen: torch.nn.Module, dist: Dist, mode: str) -> torch.nn.Module:
    """Set a trainable model and its frozen twin up for `dist.world_size` processes; returns the module
    whose forward/backward trains (a DDP wrapper, or the model itself).

    "ddp" replicates both with rank 0's weights and wraps the model, whose gradients are then averaged in
    backward; "fsdp" shards both (parameters, gradients and, through the optimizer built afterwards, its
    state), gathering the whole model inside `full_parameters`. One process: both stay as they are.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if dist.world_size == 1:
        return model
    broadcast_module(frozen)  # copied from each process's model: make every copy rank 0's
    if mode == "ddp":
        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    broadcast_module(model)  # each process keeps its slice of its own copy: make the copies rank 0's
    shard_model(model)
    shard_model(frozen)  # sharded alike, so an EMA update runs slice by slice
    return model


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite every process's parameters and buffers with rank 0's."""
    if is_distributed():
        for tensor in module.state_dict().values():
            wire = tensor.detach().to(wire_device())
            tdist.broadcast(wire, src=0)
            tensor.copy_(wire)


def shard_model(module: torch.nn.Module) -> torch.nn.Module:
    """Shard `module`'s parameters (and so its gradients and optimizer state) over the processes, in place.

    One shard group for the whole model: the KV-cache sampler needs every parameter at once anyway, so
    per-layer groups would not lower the peak. Parameters are resharded after every forward, so what code
    outside forward sees (the EMA update, state dicts) is always the shards.
    """
    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


@contextmanager
def full_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside, a sharded module holds its whole parameters, for calls that bypass forward (the sampler)."""
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_state(state: Any) -> Any:
    """`state` (nested dicts and lists) with every sharded tensor gathered whole, in the single-process format.

    A collective when anything is sharded: every process calls it.
    """
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        whole = copy.copy(state)  # keeps a state dict's type and its `_metadata`
        for key, value in state.items():
            whole[key] = full_state(value)
        return whole
    if isinstance(state, list):
        return [full_state(value) for value in state]
    return state


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole `tensor` cut as the sharded `like` is; every process holds the whole, so nothing is sent."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (single-process) state dict into `module`, sharded or not."""
    own, cut = module.state_dict(), copy.copy(state)
    for key, value in state.items():
        cut[key] = shard_like(value, own[key])
    module.load_state_dict(cut)


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole (single-process) optimizer state dict; per-parameter tensors are cut like their parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        index: {name: shard_like(value, params[index])
                if isinstance(value, torch.Tensor) and value.shape == params[index].shape else value
                for name, value in entry.items()}
        for index, entry in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": per_param})
