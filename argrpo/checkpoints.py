"""Load and save GPT / VQ weights in LlamaGen's checkpoint formats, safely (`weights_only=True`).

LlamaGen files keep the state dict under `model` (DDP), `module` (DeepSpeed) or `state_dict`, or are
the state dict itself (FSDP's raw save). We write `{"model": state_dict}`, which LlamaGen reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from argrpo.gpt import GPT, GPTConfig
from argrpo.vq import VQConfig, VQModel

WRAPPER_KEYS = ("model", "module", "state_dict")
# buffers that older LlamaGen files carry and that hold no learned state
IGNORED_KEYS = re.compile(r"^(freqs_cis|.*\.kv_cache\.[kv]_cache)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message lists the keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights dict of a LlamaGen-format file: `model`, else `module`, else `state_dict`, else itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-type errors all mean the same to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    return dict(obj)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load `state` into `model`; only `freqs_cis` and KV-cache buffers may be extra."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.match(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: expected {tuple(expected[key].shape)}, "
                f"found {tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model


def load_gpt(path: str | Path, config: GPTConfig) -> GPT:
    return load_into(GPT(config), read_state_dict(path), str(path)).eval()


def load_vq(path: str | Path, config: VQConfig) -> VQModel:
    return load_into(VQModel(config), read_state_dict(path), str(path)).eval()


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], **extra) -> None:
    """Write `{"model": state_dict, **extra}` atomically: a killed writer never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}, **extra}, tmp)
    os.replace(tmp, path)
