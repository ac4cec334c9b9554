"""Stage ref_stats: reference feature moments of the real images.

- data/ref_stats.npz: evaluation-network (or Inception) features of every real image: `mu`,
  `sigma` (full covariance, as clean-fid and the ADM evaluator store them) and `features` for
  precision / recall. With `weights.ref_stats` set, an ADM reference batch is imported instead.
- data/reward_ref_stats.npz: the reward side's features of the train split, for LOO-FID.
"""

import numpy as np
from common import extractor, params, preflight, run_stage, stage

from argrpo.data import load_dataset
from argrpo.features import extract
from argrpo.metrics import save_ref_stats


def main() -> None:
    p = params()
    cfg = p.ref_stats
    preflight(p, ["inception", "ref_stats", "reward_inception"])
    with stage("ref_stats", p.raw.get("ref_stats")) as run:
        eval_x = extractor(p, "eval")
        # one Inception serves both sides unless LOO-FID scores with its own network
        shared = cfg.features == "inception" and cfg.reward_features == "same"
        reward_x = eval_x if shared else extractor(p, "reward")
        data = load_dataset("data/dataset.npz")
        if p.weights.ref_stats:  # an ADM-style reference batch (mu, sigma, arr_0) replaces the dataset's moments
            from argrpo.inception import load_adm_reference

            ref = load_adm_reference(p.weights.ref_stats, extractor=eval_x, batch_size=cfg.batch_size)
            np.savez("data/ref_stats.npz", **ref)
            run.log_metrics({"ref_images": len(ref.get("features", []))})
        else:
            save_ref_stats("data/ref_stats.npz", *extract(eval_x, data.batches("all", cfg.batch_size),
                                                          desc="ref_stats", total=len(data.labels)))
            run.log_metrics({"ref_images": len(data.labels)})
        if shared and p.weights.ref_stats:  # LOO-FID compares against the same reference moments
            np.savez("data/reward_ref_stats.npz", mu=ref["mu"], sigma=ref["sigma"])
        else:
            # the reward side never sees the evaluation network
            train = data.count("train")
            features, _ = extract(reward_x, data.batches("train", cfg.batch_size), desc="reward_ref_stats", total=train)
            save_ref_stats("data/reward_ref_stats.npz", features)
            run.log_metrics({"reward_ref_images": train})


if __name__ == "__main__":
    run_stage(main)
