"""Stage grpo@<variant>-<seed>: GRPO fine-tuning of the base generator, without CFG in the loss.

The `grpo` section holds the settings every run shares; `grpo_runs.variants.<variant>` overrides
them and the seed comes from the stage's matrix. Resumes from models/grpo/<run>/state.pt.
"""

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from common import extractor, load_policy, params, preflight, run_stage, stage, write_json

from argrpo.data import load_dataset
from argrpo.distributed import cleanup, init_distributed
from argrpo.grpo import train_grpo
from argrpo.metrics import load_ref_stats
from argrpo.params import Params
from argrpo.rewards import build_reward
from argrpo.rewards.loo_fid import LooFidReward


def instance_rewards(p: Params, names: dict[str, float], class_names: list[str], device) -> dict:
    w = p.weights
    kwargs = {
        "classifier": lambda: {"model_or_path": "models/judge/reward_classifier.pt", "device": device},
        "classifier_prob": lambda: {"model_or_path": "models/judge/reward_classifier.pt", "device": device},
        "realism": lambda: {"extractor": extractor(p, "reward"),
                            "real_features": torch.from_numpy(load_ref_stats("data/reward_ref_stats.npz")["features"])},
        "clip": lambda: {"model_name": w.clip_model, "weights": w.clip_weights, "class_names": class_names,
                         "device": device},
        "hpsv2": lambda: {"weights": w.hpsv2_weights, "class_names": class_names, "device": device},
        "maniqa": lambda: {"weights": w.maniqa_weights, "device": device},
    }
    return {name: (build_reward(name, **kwargs[name]()), weight) for name, weight in names.items()}


def class_names_for(num_classes: int) -> list[str]:
    """Prompt names: ImageNet's 1,000 categories for 1,000-class models, else the dataset's folder names."""
    if num_classes == 1000:
        from argrpo.imagenet import imagenet_class_names

        return imagenet_class_names()
    return load_dataset("data/dataset.npz").class_names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant")
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
    p = params()
    cfg = p.grpo_variant(args.variant, args.seed)
    section = p.grpo_section(args.variant, args.seed)
    preflight(p)
    name = f"{args.variant}_s{args.seed}"
    out = Path("models/grpo") / name
    dist = init_distributed(p.model.device)  # torchrun: one process per GPU (or CPU slot), gloo / NCCL
    tracked = stage(f"grpo@{args.variant}-{args.seed}", {"grpo": section, "model": p.raw.get("model")},
                    run_name=name)
    with tracked if dist.is_main else nullcontext() as run:
        if run:
            run.set_tags({"variant": args.variant, "seed": str(args.seed), "processes": str(dist.world_size)})
        torch.manual_seed(cfg.seed)
        policy = load_policy(p, device=dist.device)
        rewards = instance_rewards(p, cfg.rewards, class_names_for(p.model.num_classes), dist.device)
        loo_fid = None
        if cfg.fid_advantage_weight > 0:
            ref = load_ref_stats("data/reward_ref_stats.npz")
            mu, std, sigma = (torch.from_numpy(ref[key]) for key in ("mu", "std", "sigma"))
            loo_fid = LooFidReward.from_config(extractor(p, "reward"), mu, std, cfg.loo_fid, ref_sigma=sigma)
        train_grpo(policy, rewards, loo_fid, cfg, out, dist=dist,
                   log=(lambda step, m: run.log_metrics(m, step)) if run else None)
        if not dist.is_main:
            cleanup()
            return
        curves = Path("reports/grpo") / f"{name}.csv"
        curves.parent.mkdir(parents=True, exist_ok=True)
        curves.write_text((out / "curves.csv").read_text())
        write_json(out / "run.json", {"variant": args.variant, "seed": args.seed, "steps": cfg.steps,
                                      "config": json.loads(json.dumps(section)), "processes": dist.world_size})
    cleanup()


if __name__ == "__main__":
    run_stage(main)
