"""Stage pretrain: train the small VQ tokenizer and GPT (embedded default), or verify given checkpoints.

Writes models/base/manifest.json naming the two checkpoints with their sha256, plus the checkpoints
themselves when trained here (LlamaGen's format, read back through the loaders as a check).
"""

import torch
from common import BASE_DIR, params, preflight, run_stage, stage, write_json

from argrpo.checkpoints import load_gpt, load_vq, save_checkpoint
from argrpo.data import load_dataset
from argrpo.generator import build_models
from argrpo.pretrain import encode_all, train_gpt, train_vq
from argrpo.weights import sha256_file


def main() -> None:
    p = params()
    cfg, model = p.pretrain, p.model
    preflight(p, ["gpt_checkpoint", "vq_checkpoint"])
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    with stage("pretrain", {"model": p.raw.get("model"), "pretrain": p.raw.get("pretrain")}) as run:
        if model.source == "weights":
            gpt_path, vq_path = p.weights.gpt_checkpoint, p.weights.vq_checkpoint
            load_gpt(gpt_path, model.gpt()), load_vq(vq_path, model.vq())  # right architecture, or a clear error
        else:
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            images, labels = load_dataset("data/dataset.npz").part("train")
            gpt, vq = build_models(model)
            vq = train_vq(vq, images, cfg.vq, gen, log=lambda s, m: run.log_metrics(m, s))
            codes = encode_all(vq, images)  # [N, T]
            used = codes.unique().numel()
            gpt = train_gpt(gpt, codes, labels, cfg.gpt, gen, log=lambda s, m: run.log_metrics(m, s))
            gpt_path, vq_path = BASE_DIR / "gpt.pt", BASE_DIR / "vq.pt"
            save_checkpoint(gpt_path, gpt.state_dict())
            save_checkpoint(vq_path, vq.state_dict())
            load_gpt(gpt_path, model.gpt()), load_vq(vq_path, model.vq())  # they must read back
            with torch.no_grad():
                recon = vq.decode_tokens(codes[:512])
                mse = torch.mean((recon - images[:512]) ** 2).item()
            run.log_metrics({"vq_codes_used": used, "vq_recon_mse": mse})
            print(f"pretrain: {used} of {model.vq().codebook_size} codes used, reconstruction MSE {mse:.4f}")
        manifest = {name: {"path": str(path), "sha256": sha256_file(path)}
                    for name, path in (("gpt", gpt_path), ("vq", vq_path))}
        write_json(BASE_DIR / "manifest.json", manifest)
        run.set_tags({f"sha256_{k}": v["sha256"] for k, v in manifest.items()})


if __name__ == "__main__":
    run_stage(main)
