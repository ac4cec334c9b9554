"""MANIQA reward: a no-reference image-quality score (higher is better, roughly in [0, 1]).

MANIQA is scored through pyiqa, an optional extra (`pip install -e ".[iqa]"`; pyiqa is licensed for
non-commercial use), imported only when this reward is built. pyiqa's MANIQA asks timm to download
ImageNet weights for its ViT-B/8 backbone and loads its own checkpoint with pickling enabled; both
are avoided here: the architecture is built with no pretrained weights at all and the local MANIQA
checkpoint, which holds every weight of the network, backbone included, is loaded strictly with
`weights_only=True`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from argrpo.rewards.hpsv2 import load_strict


@contextlib.contextmanager
def _timm_without_pretrained() -> Iterator[None]:
    """While active, timm.create_model builds architectures only, never fetching weights.

    MANIQA's constructor hard-codes `pretrained=True` for its backbone; the checkpoint loaded
    afterwards overwrites those weights anyway, so the fetch would only break offline runs.
    """
    import timm

    create_model = timm.create_model

    def create_without_weights(*args, **kwargs):
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    timm.create_model = create_without_weights
    try:
        yield
    finally:
        timm.create_model = create_model


def load_maniqa_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The network weights of a pyiqa MANIQA checkpoint (under `params`, or the file itself)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MANIQA checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("params", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"MANIQA checkpoint {path} holds {type(checkpoint).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


class ManiqaReward:
    """reward(images [N, 3, H, W] in [-1, 1], labels [N]) -> MANIQA quality [N]; labels are unused.

    `metric` picks pyiqa's variant ("maniqa" is the KonIQ-10k model, `ckpt_koniq10k.pt`); `crops`
    is the number of 224-pixel crops averaged per image (pyiqa's default 20). `weights=None` keeps
    the random initialisation (tests only).
    """

    def __init__(
        self,
        weights: str | None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        metric: str = "maniqa",
        crops: int = 20,
    ):
        try:
            import pyiqa
        except ImportError as err:
            raise ImportError(
                'the MANIQA reward needs pyiqa, an optional extra: pip install -e ".[iqa]"'
            ) from err
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        state_dict = load_maniqa_state_dict(weights) if weights else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        with _timm_without_pretrained():
            metric_model = pyiqa.create_metric(
                metric, as_loss=False, device=self.device, pretrained=False, test_sample=crops
            )
        self.net = metric_model.net
        if state_dict is not None:
            load_strict(self.net, state_dict, f"MANIQA checkpoint {weights}")
        self.net = self.net.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        scores = []
        for start in range(0, images.shape[0], self.batch_size):
            x = ((images[start : start + self.batch_size].float() + 1) / 2).clamp(0, 1).to(self.device)
            scores.append(self.net(x).reshape(-1))  # MANIQA returns [n, 1]
        return torch.cat(scores).float().to(images.device)  # scores: [N]
