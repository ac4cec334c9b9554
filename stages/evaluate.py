"""Stage evaluate: FID (full covariance), IS, precision / recall (k-NN), class accuracy and sampling
cost of every configuration, against data/ref_stats.npz, with the evaluation network's features.

Class accuracy counts the images whose condition has a class (the `labels` the sample stage wrote; for
text-to-image the class a prompt asks for, so it is prompt accuracy). `evaluate.scores` adds mean reward-model
scores, CLIP and HPSv2 against each image's prompt in the evaluation condition set, the aesthetic predictor.

reports/metrics.json holds one row per configuration; the GRPO rows are means over their seeds,
and reports/metrics_seeds.json holds every seed's row and the spread. Each sample set is read shard by shard
(argrpo/samples.py): memory holds its features, never its images.
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from common import condition_set, extractor, params, preflight, run_stage, stage, write_json

from argrpo import samples
from argrpo.data import load_dataset, to_tensor
from argrpo.distributed import cleanup, init_distributed
from argrpo.features import extract
from argrpo.metrics import EvaluateConfig, compute_metrics, load_ref_stats
from argrpo.params import Params
from argrpo.rewards.options import RewardOptions, build_rewards

KEYS = ("fid", "is", "precision", "recall", "class_accuracy", "forward_passes_per_image", "seconds_per_image")


def stream_features(folder: Path, extractor, batch_size: int, scorers: dict, total: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    """One pass over a sample set in batches of `batch_size` images: its features, class probabilities, labels
    and reward-model scores. Memory holds these and one batch, never the set."""
    labels, scores = [], {name: [] for name in scorers}

    def images():  # each batch's labels and scores are taken as it goes to the feature network
        for batch in samples.batches(folder, batch_size):
            x = to_tensor(batch["images"])
            labels.append(batch["labels"].copy())  # not a view that would keep its batch alive
            for name, (scorer, _) in scorers.items():
                scores[name].append(scorer(x, torch.from_numpy(batch["conditions"])).double())
            yield x

    features, probs = extract(extractor, images(), desc=f"evaluate {folder.name}", total=total)
    return features, probs, np.concatenate(labels), {name: torch.cat(s) for name, s in scores.items()}


def evaluate_config(folder: Path, extractor, ref: dict, cfg: EvaluateConfig, scorers: dict) -> dict[str, float]:
    """The metrics of one sample set, streamed (`stream_features`)."""
    cost = samples.cost(folder)
    features, probs, labels, scores = stream_features(folder, extractor, cfg.batch_size, scorers, cost["num_images"])
    row = compute_metrics(ref["features"], features, probs, ref["mu"], ref["sigma"], k=cfg.k, splits=cfg.is_splits)
    known = labels >= 0  # images whose condition has a class
    row["class_accuracy"] = (float((probs.argmax(1)[known] == labels[known]).mean())
                             if probs.shape[1] > 1 and known.any() else float("nan"))
    row.update({f"{name}_score": float(s.nanmean()) for name, s in scores.items()})
    row.update({k: v for k, v in cost.items() if k in KEYS})
    return row


def score_models(p: Params) -> dict:
    """The reward models of `evaluate.scores` over the evaluation condition set, at scale 1."""
    if not p.evaluate.scores:
        return {}
    return build_rewards(dict.fromkeys(p.evaluate.scores, 1.0), RewardOptions(), p.weights, condition_set("eval"),
                         p.model.torch_device())


def main() -> None:
    p = params()
    cfg = p.evaluate
    preflight(p, ["inception", "clip_weights", "hpsv2_weights", "aesthetic_weights"])
    dist = init_distributed(p.model.device)
    if not dist.is_main:  # scoring is cheap next to sampling: rank 0 evaluates, the others only join and leave
        cleanup()
        return
    with stage("evaluate", p.raw.get("evaluate")) as run:
        eval_x = extractor(p, "eval")
        ref = load_ref_stats("data/ref_stats.npz")
        scorers = score_models(p)
        keys = KEYS + tuple(f"{name}_score" for name in scorers)
        rows = {f.name: evaluate_config(f, eval_x, ref, cfg, scorers) for f in samples.completed("samples")}
        metrics, groups = {}, {}
        for name, row in rows.items():
            seeded = re.fullmatch(r"(grpo_.+)_s(\d+)_nocfg", name)
            if seeded:
                groups.setdefault(f"{seeded.group(1)}_nocfg", []).append(row)
            else:
                metrics[name] = {k: row[k] for k in keys}
        spread = {}
        for name, seed_rows in groups.items():
            metrics[name] = {k: float(np.mean([r[k] for r in seed_rows])) for k in keys}
            spread[name] = {k: float(np.std([r[k] for r in seed_rows])) for k in keys}
            spread[name]["seeds"] = len(seed_rows)
        # the floor a generator can reach: held-out real images scored the same way (fewer images, so a
        # slightly higher FID than the same number of real images would give)
        data = load_dataset("data/dataset.npz")
        held = data.count("holdout")
        floor = compute_metrics(ref["features"], *extract(eval_x, data.batches("holdout", cfg.batch_size),
                                                          desc="held-out real", total=held),
                                ref["mu"], ref["sigma"], k=cfg.k, splits=cfg.is_splits)
        floor["images"] = held
        write_json("reports/metrics.json", metrics)
        write_json("reports/metrics_seeds.json", {"per_run": rows, "std_over_seeds": spread,
                                                  "real_holdout": floor})
        for name, row in metrics.items():  # `<configuration>/<metric>`: the UI groups the charts by configuration
            run.log_metrics({f"{name}/{k}": v for k, v in row.items()})
        for name, row in rows.items():  # every evaluated sample set (each seed) as a child run, to compare in the UI
            seeded = re.fullmatch(r"grpo_(.+)_s(\d+)_nocfg", name)
            tags = {"configuration": name, **({"variant": seeded.group(1), "seed": seeded.group(2)} if seeded else {})}
            with run.child(name, params={"sample": p.raw.get("sample")}, tags=tags) as child:
                child.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))})
        print(json.dumps(metrics, indent=1))
    cleanup()


if __name__ == "__main__":
    run_stage(main)
