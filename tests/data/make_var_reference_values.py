"""Regenerate var_reference_values.json with FoundationVision/VAR's own modules (not a test; run by hand).

    python tests/data/make_var_reference_values.py /path/to/VAR    # a checkout of github.com/FoundationVision/VAR

The weights are filled exactly as tests/test_var.py::fill does (state-dict order, one seeded normal
stream, buffers kept), so the test compares argrpo's VQVAE and VAR with VAR's on identical weights.
VAR's modules import its `dist` helper and ask torch.distributed for the world size; both are stood in
for a single CPU process here.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def fill(module: torch.nn.Module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    fixed = ("attn_bias_for_masking", "ema_vocab_hit_SV", "zero_k_bias")
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not key.endswith(fixed):
                value.copy_(torch.randn(value.shape, generator=g) * std)


def main(var_repo: str) -> None:
    sys.modules["dist"] = types.SimpleNamespace(get_device=lambda: "cpu", initialized=lambda: False)
    torch.distributed.get_world_size = lambda *args, **kwargs: 1
    sys.path.insert(0, var_repo)
    from models.var import VAR
    from models.vqvae import VQVAE

    vae = VQVAE(vocab_size=256, z_channels=16, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PATCH_NUMS)
    fill(vae, 0, 0.1)
    var = VAR(vae, num_classes=10, depth=2, embed_dim=64, num_heads=2, norm_eps=1e-6, attn_l2_norm=True,
              patch_nums=PATCH_NUMS, flash_if_available=False, fused_if_available=False, cond_drop_rate=0.0).eval()
    fill(var, 1, 0.3)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.tensor([1, 7])
    positions = [0, 3, 20, 60, 109]
    with torch.no_grad():
        codes = vae.img_to_idxBl(images)
        decoded = vae.idxBl_to_img(codes, same_shape=True, last_one=True)
        inputs = vae.quantize.idxBl_to_var_input(codes)
        logits = var(labels, inputs)
        guided = var.autoregressive_infer_cfg(2, labels, g_seed=0, cfg=1.5, top_k=1, top_p=0.0).mul(2).sub(1)
    out = {
        "note": "computed with FoundationVision/VAR's VQVAE and VAR modules (commit 78b9539) on the weights "
                "the test fills in; guided image: VAR cfg 1.5, top_k 1",
        "patch_nums": PATCH_NUMS,
        "tokens": torch.cat(codes, 1).tolist(),
        "decoded_subsampled": decoded[:, :, ::16, ::16].tolist(),
        "var_input_sum": inputs.double().sum().item(),
        "var_input_abs_sum": inputs.double().abs().sum().item(),
        "logits_positions": positions,
        "logits": logits[:, positions, :6].tolist(),
        "logits_abs_mean": logits.double().abs().mean().item(),
        "guided_subsampled": guided[:, :, ::16, ::16].tolist(),
    }
    (Path(__file__).parent / "var_reference_values.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
