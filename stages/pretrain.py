"""Stage pretrain: train the embedded default's tokenizer and transformer (of the configured family), or
verify the given checkpoints.

Writes models/base/manifest.json naming the two files with their sha256, plus the files themselves when
trained here (in the family's published format, read back through its loaders as a check).
"""

import torch
from common import BASE_DIR, condition_set, params, preflight, run_stage, stage, write_json

from argrpo.data import load_dataset
from argrpo.families import load_models, pretrain_models, save_network
from argrpo.weights import sha256_file


def main() -> None:
    p = params()
    cfg, model = p.pretrain, p.model
    preflight(p, ["gpt_checkpoint", "vq_checkpoint"])
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    with stage("pretrain", {"model": p.raw.get("model"), "pretrain": p.raw.get("pretrain")}) as run:
        if model.source == "weights":
            net_path, tokenizer_path = p.weights.gpt_checkpoint, p.weights.vq_checkpoint
            load_models(model, net_path, tokenizer_path)  # right architecture, or a clear error
        else:
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            images, labels = load_dataset("data/dataset.npz").part("train")
            net, tokenizer, stats = pretrain_models(model, cfg, images, labels, condition_set("train"), gen,
                                                    log=lambda s, m: run.log_metrics(m, s))
            net_path, tokenizer_path = BASE_DIR / "gpt.pt", BASE_DIR / "vq.pt"
            save_network(model, net_path, net.state_dict())
            save_network(model, tokenizer_path, tokenizer.state_dict())
            load_models(model, net_path, tokenizer_path)  # they must read back
            run.log_metrics(stats)
            print(f"pretrain ({model.family}): {stats['vq_codes_used']:.0f} of {model.tokenizer_vocab} codes used, "
                  f"reconstruction MSE {stats['vq_recon_mse']:.4f}")
        manifest = {name: {"path": str(path), "sha256": sha256_file(path)}
                    for name, path in (("gpt", net_path), ("vq", tokenizer_path))}
        write_json(BASE_DIR / "manifest.json", manifest)
        run.set_tags({f"sha256_{k}": v["sha256"] for k, v in manifest.items()})


if __name__ == "__main__":
    run_stage(main)
