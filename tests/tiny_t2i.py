"""Tiny text-to-image GPTs and left-padded captions with non-trivial values, shared by the T2I tests."""

import torch

from argrpo.gpt import GPT, gpt_config

V, T, LC, DC = 32, 16, 6, 12  # vocab, image tokens (4 x 4), caption positions, caption width


def random_t2i_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny t2i GPT whose weights are all non-trivial (the zero-initialised head would give uniform logits)."""
    torch.manual_seed(seed)
    config = gpt_config("tiny", **{"model_type": "t2i", "cls_token_num": LC, "caption_dim": DC, "vocab_size": V,
                                   "block_size": T, **overrides})
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def left_padded_captions(counts: list[int], seed: int = 0, length: int = LC,
                         dim: int = DC) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions [N, length, dim] whose last counts[i] positions are valid and the rest zero, and their mask."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(counts), length, dim, generator=g)
    mask = torch.arange(length)[None] >= length - torch.tensor(counts)[:, None]  # [N, length]
    return features * mask[..., None], mask
