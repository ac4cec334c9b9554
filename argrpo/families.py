"""The model families the pipeline runs, in one registry: how each is built, loaded, saved, pretrained
and wrapped as a `Policy` from the `model` config.

| family | network (`gpt_preset`) | tokenizer (`vq_preset`) | condition id | policy |
|---|---|---|---|---|
| llamagen | LlamaGen GPT, class token | VQ | class, or (class, style) | `LlamaGenPolicy` |
| llamagen_t2i | LlamaGen GPT, caption prefix | VQ | prompt (cached features) | `LlamaGenT2IPolicy` |
| var | VAR, next-scale | multi-scale VQVAE | class, or (class, style) | `VARPolicy` |

The stages call `build_policy`, `build_models`, `load_models`, `save_network` / `save_tokenizer` and
`pretrain_models`; nothing downstream of a policy (GRPO, sampling, evaluation) asks which family it holds.
The network and tokenizer files are `weights.gpt_checkpoint` and `weights.vq_checkpoint` for every family,
each in its family's published format (LlamaGen's `{"model": state_dict}`, VAR's bare state dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from argrpo.checkpoints import load_gpt, load_vq, save_checkpoint
from argrpo.conditions import ConditionSet
from argrpo.generator import LlamaGenPolicy, ModelConfig
from argrpo.gpt import GPT
from argrpo.msvq import MSVQVAE
from argrpo.policy import Policy
from argrpo.pretrain import Logger, PretrainConfig, encode_all, train_caption_gpt, train_gpt, train_var, train_vq
from argrpo.t2i import LlamaGenT2IPolicy
from argrpo.var import VAR, VARPolicy, load_msvq, load_var, save_state_dict
from argrpo.vq import VQModel


def llamagen_policy(net: GPT, tokenizer: VQModel, conditions: ConditionSet) -> Policy:
    return LlamaGenPolicy(net, tokenizer, conditions.require_classes("a class-conditional LlamaGen"))


def llamagen_t2i_policy(net: GPT, tokenizer: VQModel, conditions: ConditionSet) -> Policy:
    if conditions.features is None:
        raise ValueError("a text-to-image policy needs the prompts' caption features (the prompts stage's "
                         "data/prompts_*.npz of a llamagen_t2i configuration)")
    return LlamaGenT2IPolicy(net, tokenizer, conditions.features, conditions.classes)


def var_policy(net: VAR, tokenizer: MSVQVAE, conditions: ConditionSet) -> Policy:
    return VARPolicy(net, tokenizer, conditions.require_classes("VAR"))


def pretrain_llamagen(net: GPT, tokenizer: VQModel, codes: torch.Tensor, labels: torch.Tensor,
                      conditions: ConditionSet, cfg: PretrainConfig, generator: torch.Generator,
                      log: Logger | None) -> nn.Module:
    return train_gpt(net, codes, labels, cfg.gpt, generator, log)


def pretrain_llamagen_t2i(net: GPT, tokenizer: VQModel, codes: torch.Tensor, labels: torch.Tensor,
                          conditions: ConditionSet, cfg: PretrainConfig, generator: torch.Generator,
                          log: Logger | None) -> nn.Module:
    if conditions.features is None:
        raise ValueError("pretraining a text-to-image GPT needs the training prompts' features")
    classes = conditions.require_classes("pretraining a text-to-image GPT on labelled images")
    return train_caption_gpt(net, codes, labels, conditions.features, classes, cfg.gpt, generator, log)


def pretrain_var(net: VAR, tokenizer: MSVQVAE, codes: torch.Tensor, labels: torch.Tensor,
                 conditions: ConditionSet, cfg: PretrainConfig, generator: torch.Generator,
                 log: Logger | None) -> nn.Module:
    return train_var(net, tokenizer, codes, labels, cfg.gpt, generator, log)


@dataclass(frozen=True)
class Family:
    """What the pipeline needs of one model family."""

    network: Callable[..., nn.Module]  # config -> fresh network
    tokenizer: Callable[..., nn.Module]  # config -> fresh tokenizer
    load_network: Callable[[str | Path, object], nn.Module]  # (file, config) -> network, strictly
    load_tokenizer: Callable[[str | Path, object], nn.Module]
    save: Callable[[str | Path, Mapping[str, torch.Tensor]], None]  # the family's published file format
    policy: Callable[[nn.Module, nn.Module, ConditionSet], Policy]
    pretrain: Callable[..., nn.Module]  # the transformer's pretraining on the tokenizer's codes


FAMILY_REGISTRY: dict[str, Family] = {
    "llamagen": Family(GPT, VQModel, load_gpt, load_vq, save_checkpoint, llamagen_policy, pretrain_llamagen),
    "llamagen_t2i": Family(GPT, VQModel, load_gpt, load_vq, save_checkpoint, llamagen_t2i_policy,
                           pretrain_llamagen_t2i),
    "var": Family(VAR, MSVQVAE, load_var, load_msvq, save_state_dict, var_policy, pretrain_var),
}


def family_of(model: ModelConfig) -> Family:
    return FAMILY_REGISTRY[model.family]


def build_models(model: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """A fresh (network, tokenizer) pair of the configured family and presets."""
    family = family_of(model)
    return family.network(model.network()), family.tokenizer(model.tokenizer())


def load_models(model: ModelConfig, network_path: str | Path, tokenizer_path: str | Path
                ) -> tuple[nn.Module, nn.Module]:
    """(network, tokenizer) read strictly from their files, in eval mode; a misfit names the file and keys."""
    family = family_of(model)
    return (family.load_network(network_path, model.network()).eval(),
            family.load_tokenizer(tokenizer_path, model.tokenizer()).eval())


def save_network(model: ModelConfig, path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    family_of(model).save(path, state_dict)


def build_policy(model: ModelConfig, network_path: str | Path, tokenizer_path: str | Path,
                 conditions: ConditionSet, device: torch.device | str | None = None) -> Policy:
    """The family's policy over `conditions`, its weights read from the two files, on `device`, in eval mode."""
    network, tokenizer = load_models(model, network_path, tokenizer_path)
    device = torch.device(device) if device is not None else model.torch_device()
    return family_of(model).policy(network.to(device), tokenizer.to(device), conditions).eval()


def pretrain_models(model: ModelConfig, cfg: PretrainConfig, images: torch.Tensor, labels: torch.Tensor,
                    conditions: ConditionSet, generator: torch.Generator, log: Logger | None = None
                    ) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """The embedded default's pretraining: the tokenizer on images [N, 3, H, W] in [-1, 1], then the
    transformer on its codes with labels [N] (and, for text-to-image, the training prompts of `conditions`).
    Returns (network, tokenizer, stats: codes used, reconstruction MSE)."""
    family = family_of(model)
    network, tokenizer = build_models(model)
    tokenizer = train_vq(tokenizer, images, cfg.vq, generator, log=log)
    codes = encode_all(tokenizer, images)  # [N, L]
    network = family.pretrain(network, tokenizer, codes, labels, conditions, cfg, generator, log)
    with torch.no_grad():
        recon = tokenizer.decode_tokens(codes[:512])
        mse = torch.mean((recon - images[:512]) ** 2).item()
    return network, tokenizer, {"vq_codes_used": float(codes.unique().numel()), "vq_recon_mse": mse}

