"""Ablations of the GRPO recipe on the embedded default: which options matter, over several seeds.

Run by hand in a pipeline workspace after `dvc repro` (it reads params.yaml, data/, models/base and
models/judge), e.g.

    python benchmarks/ablation.py benchmarks/ablations.yaml --seeds 10 11 12 --jobs 2

Every ablation is a partial `grpo` section laid over params.yaml's `grpo` section (as a GRPO variant is).
Each (ablation, seed) is trained into models/ablation/<name>_s<seed> (skipped when its policy.pt exists, so
an interrupted sweep resumes), sampled without guidance with the sample stage's settings and scored by
the evaluation network exactly as the evaluate stage scores it. The base model's rows (with and without
CFG) are scored the same way. Results: <out>.json (every run) and <out>.md (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

KEYS = ("fid", "precision", "recall", "class_accuracy", "is")


def score(policy, p, sampling) -> dict[str, float]:
    """The evaluate stage's metrics of `policy`'s samples under `sampling` (the sample stage's protocol)."""
    from common import extractor

    from argrpo.features import extract
    from argrpo.generator import generate_sharded
    from argrpo.metrics import compute_metrics, load_ref_stats

    conditions = torch.arange(p.sample.num_images) % policy.num_conditions
    _, images = generate_sharded(policy, conditions, sampling, p.sample.batch_size, p.sample.seed, progress=False)
    ref = load_ref_stats("data/ref_stats.npz")
    features, probs = extract(extractor(p, "eval"), images)
    row = compute_metrics(ref["features"], features, probs, ref["mu"], ref["sigma"], k=p.evaluate.k,
                          splits=p.evaluate.is_splits)
    row["class_accuracy"] = float((probs.argmax(1) == conditions.numpy()).mean())
    return {k: float(row[k]) for k in KEYS}


def run_one(job: tuple[str, dict, int, str]) -> dict:
    """Train one (ablation, seed) GRPO run and score it; returns its row."""
    name, override, seed, runs = job
    torch.set_num_threads(1)
    from common import extractor, load_policy, params

    from argrpo.config import load_section
    from argrpo.grpo import GRPOConfig, train_grpo
    from argrpo.metrics import load_ref_stats
    from argrpo.params import merge
    from argrpo.rewards import build_reward
    from argrpo.rewards.loo_fid import LooFidReward

    p = params()
    section = merge(merge(p.raw.get("grpo") or {}, override), {"seed": seed})
    cfg = load_section(GRPOConfig, section, f"ablation {name}")
    run_dir = Path(runs) / f"{name}_s{seed}"
    torch.manual_seed(cfg.seed)
    policy = load_policy(p, device=torch.device("cpu"))
    if not (run_dir / "policy.pt").exists():
        real = torch.from_numpy(load_ref_stats("data/reward_ref_stats.npz")["features"])
        kwargs = {"realism": {"extractor": extractor(p, "reward"), "real_features": real}}
        rewards = {r: (build_reward(r, **kwargs.get(r, {"model_or_path": "models/judge/reward_classifier.pt"})), w)
                   for r, w in cfg.rewards.items()}  # the embedded default's rewards
        loo_fid = None
        if cfg.fid_advantage_weight > 0:
            ref = load_ref_stats("data/reward_ref_stats.npz")
            mu, std, sigma = (torch.from_numpy(ref[key]) for key in ("mu", "std", "sigma"))
            loo_fid = LooFidReward.from_config(extractor(p, "reward"), mu, std, cfg.loo_fid, ref_sigma=sigma)
        train_grpo(policy, rewards, loo_fid, cfg, run_dir, progress=False)
    # the GRPO loop's own seconds, from its curves (wall time would count the other jobs on the machine)
    with (run_dir / "curves.csv").open() as f:
        seconds = sum(float(row["time/step"]) for row in csv.DictReader(f))
    policy = load_policy(p, run_dir / "policy.pt", torch.device("cpu"))
    row = score(policy, p, p.sample.sampling(1.0))
    return {"ablation": name, "seed": seed, "grpo_step_seconds": seconds, **row}


def base_rows() -> dict:
    torch.set_num_threads(1)
    from common import load_policy, params

    p = params()
    policy = load_policy(p, device=torch.device("cpu"))
    return {"base_cfg": score(policy, p, p.sample.sampling(p.sample.cfg_scale)),
            "base_nocfg": score(policy, p, p.sample.sampling(1.0))}


def change(override: dict) -> str:
    """An ablation's partial grpo section as one line of dotted keys."""
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v)

    walk(override or {}, "")
    return ", ".join(f"`{k}: {v}`" for k, v in flat.items())


def table(results: dict) -> str:
    env = results.get("environment", {})
    lines = ["# Ablations of the embedded default's GRPO recipe", "",
             "Written by `benchmarks/ablation.py benchmarks/ablations.yaml` in a pipeline workspace. Every row but the "
             "base rows is a partial `grpo` section laid over params.yaml's, trained on seeds "
             f"{sorted({r['seed'] for r in results['runs']})} (never the pipeline's own seeds), sampled without CFG "
             "with the sample stage's settings in one process, and scored by the evaluation network as the "
             "evaluate stage scores it (mean ± std over seeds). The base rows are the same base model sampled "
             "the same way. Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
             "| ablation | what it sets | seeds | " + " | ".join(KEYS) + " |", "|---|---|---|" + "---|" * len(KEYS)]
    for name, row in results["base"].items():
        lines.append(f"| {name} | | – | " + " | ".join(f"{row[k]:.3f}" for k in KEYS) + " |")
    names = list(dict.fromkeys(r["ablation"] for r in results["runs"]))
    for name in names:
        rows = [r for r in results["runs"] if r["ablation"] == name]
        cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}" for k in KEYS]
        lines.append(f"| {name} | {change(results.get('ablations', {}).get(name))} | {len(rows)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablations", type=Path, help="YAML: a mapping of ablation name -> partial grpo section")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--out", default="reports/ablation")
    parser.add_argument("--runs", default="models/ablation", help="where the runs' checkpoints go (not committed)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these ablations")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    ablations = yaml.safe_load(args.ablations.read_text())
    if args.only:
        ablations = {k: v for k, v in ablations.items() if k in args.only}
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    done = {(r["ablation"], r["seed"]) for r in results["runs"]}
    jobs = [(name, override or {}, seed, args.runs) for name, override in ablations.items() for seed in args.seeds
            if (name, seed) not in done]
    if "base" not in results:
        results["base"] = base_rows()
    if jobs or "environment" not in results:  # a rewrite of the table keeps the environment the runs had
        results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                                  "cpu": platform.processor() or platform.machine(), "threads_per_run": 1,
                                  "jobs": args.jobs, "cpus": os.cpu_count()}
    results["ablations"] = {**results.get("ablations", {}), **ablations}

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(table(results) + "\n")

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            results["runs"].append(row)
            save()
            print(json.dumps(row))
    save()


if __name__ == "__main__":
    main()
