"""Stage grpo@<variant>-<seed>: GRPO fine-tuning of the base generator, without CFG in the loss.

The `grpo` section holds the settings every run shares; `grpo_runs.variants.<variant>` overrides
them and the seed comes from the stage's matrix. Condition ids are drawn from the training condition
set (data/prompts_train.npz: classes, (class, style) pairs or prompts), which also tells every reward
what it scores an id against.

Resumes from models/grpo/<run>/state.pt (kept between attempts: `persist: true` in dvc.yaml) in the same
MLflow run, when the checkpoint was written by this run: same params, input files and code
(`argrpo.resume`); otherwise the run starts afresh.
"""

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from common import JUDGE_DIR, condition_set, extractor, load_policy, params, preflight, run_stage, stage, write_json

from argrpo.distributed import barrier, cleanup, init_distributed
from argrpo.grpo import train_grpo
from argrpo.metrics import load_ref_stats
from argrpo.resume import fingerprint, plan_resume, record_run
from argrpo.rewards.loo_fid import LooFidReward
from argrpo.rewards.options import build_rewards

# what a run starts from besides its params: a change to any of them makes a checkpoint another run's
RUN_INPUTS = ["argrpo", "stages/grpo.py", "stages/common.py", "models/base", "models/judge",
              "data/reward_ref_stats.npz", "data/prompts_train.npz"]


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
    digest = fingerprint({"grpo": section, **{k: p.raw.get(k) for k in ("model", "weights", "reward_options")},
                          "processes": dist.world_size}, RUN_INPUTS)
    plan = plan_resume(out, digest) if dist.is_main else None
    barrier()  # the other ranks read state.pt only once rank 0 has kept or cleared it
    tracked = stage(f"grpo@{args.variant}-{args.seed}", {"grpo": section, "model": p.raw.get("model")},
                    run_name=name, resume_run_id=plan.run_id if plan else None)
    with tracked if dist.is_main else nullcontext() as run:
        if run:
            run.set_tags({"variant": args.variant, "seed": str(args.seed), "processes": str(dist.world_size)})
            record_run(out, digest, run.run_id)
            print(f"argrpo: grpo {name}: {plan.reason}", flush=True)
        torch.manual_seed(cfg.seed)
        conditions = condition_set("train")  # what the ids GRPO draws mean, for the policy and the rewards
        policy = load_policy(p, device=dist.device, conditions=conditions)
        ref = load_ref_stats("data/reward_ref_stats.npz")  # the reward side's real-image moments and features
        rewards = build_rewards(cfg.rewards, p.reward_options, p.weights, conditions, dist.device,
                                classifier=JUDGE_DIR / "reward_classifier.pt",
                                reward_features=lambda: (extractor(p, "reward"), torch.from_numpy(ref["features"])))
        loo_fid = None
        if cfg.fid_advantage_weight > 0:
            mu, std, sigma = (torch.from_numpy(ref[key]) for key in ("mu", "std", "sigma"))
            loo_fid = LooFidReward.from_config(extractor(p, "reward"), mu, std, cfg.loo_fid, ref_sigma=sigma)
        train_grpo(policy, rewards, loo_fid, cfg, out, dist=dist,
                   log=(lambda step, m: run.log_metrics(m, step)) if run else None,
                   # the rollout's images as one grid per checkpoint: the MLflow UI shows them with a step slider
                   log_images=(lambda step, images: run.log_image(images, "rollout", step)) if run else None)
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
