"""Stage evaluate: FID (full covariance), IS, precision / recall (k-NN), class accuracy and sampling
cost of every configuration, against data/ref_stats.npz, with the evaluation network's features.

reports/metrics.json holds one row per configuration; the GRPO rows are means over their seeds,
and reports/metrics_seeds.json holds every seed's row and the spread.
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from common import extractor, params, preflight, run_stage, stage, write_json

from argrpo.data import load_dataset, to_tensor
from argrpo.distributed import cleanup, init_distributed
from argrpo.features import extract
from argrpo.metrics import EvaluateConfig, compute_metrics, load_ref_stats

KEYS = ("fid", "is", "precision", "recall", "class_accuracy", "forward_passes_per_image", "seconds_per_image")


def evaluate_config(npz: Path, extractor, ref: dict, cfg: EvaluateConfig) -> dict[str, float]:
    with np.load(npz) as z:
        images, labels = to_tensor(z["images"]), torch.from_numpy(z["labels"])
    features, probs = extract(extractor, images)
    row = compute_metrics(ref["features"], features, probs, ref["mu"], ref["sigma"], k=cfg.k, splits=cfg.is_splits)
    row["class_accuracy"] = float((probs.argmax(1) == labels.numpy()).mean()) if probs.shape[1] > 1 else float("nan")
    row.update({k: v for k, v in json.loads(npz.with_suffix(".json").read_text()).items() if k in KEYS})
    return row


def main() -> None:
    p = params()
    cfg = p.evaluate
    preflight(p, ["inception"])
    dist = init_distributed(p.model.device)
    if not dist.is_main:  # scoring is cheap next to sampling: rank 0 evaluates, the others only join and leave
        cleanup()
        return
    with stage("evaluate", p.raw.get("evaluate")) as run:
        eval_x = extractor(p, "eval")
        ref = load_ref_stats("data/ref_stats.npz")
        rows = {f.stem: evaluate_config(f, eval_x, ref, cfg) for f in sorted(Path("samples").glob("*.npz"))}
        metrics, groups = {}, {}
        for name, row in rows.items():
            seeded = re.fullmatch(r"(grpo_.+)_s(\d+)_nocfg", name)
            if seeded:
                groups.setdefault(f"{seeded.group(1)}_nocfg", []).append(row)
            else:
                metrics[name] = {k: row[k] for k in KEYS}
        spread = {}
        for name, seed_rows in groups.items():
            metrics[name] = {k: float(np.mean([r[k] for r in seed_rows])) for k in KEYS}
            spread[name] = {k: float(np.std([r[k] for r in seed_rows])) for k in KEYS}
            spread[name]["seeds"] = len(seed_rows)
        # the floor a generator can reach: held-out real images scored the same way (fewer images, so a
        # slightly higher FID than the same number of real images would give)
        data = load_dataset("data/dataset.npz")
        held, held_labels = data.part("holdout")
        floor = compute_metrics(ref["features"], *extract(eval_x, held), ref["mu"], ref["sigma"], k=cfg.k,
                                splits=cfg.is_splits)
        floor["images"] = len(held_labels)
        write_json("reports/metrics.json", metrics)
        write_json("reports/metrics_seeds.json", {"per_run": rows, "std_over_seeds": spread,
                                                  "real_holdout": floor})
        for name, row in metrics.items():
            run.log_metrics({f"{name}.{k}": v for k, v in row.items()})
        print(json.dumps(metrics, indent=1))
    cleanup()


if __name__ == "__main__":
    run_stage(main)
