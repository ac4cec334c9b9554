"""Tiny models with non-trivial weights, shared by the GPT and sampling tests."""

import torch

from argrpo.gpt import GPT, gpt_config


def random_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT whose weights are all non-trivial (the zero-initialised head would give uniform logits)."""
    torch.manual_seed(seed)
    model = GPT(gpt_config("tiny", **{"vocab_size": 32, "num_classes": 10, "block_size": 16, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()
