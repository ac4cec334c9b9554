"""Stage ref_stats: reference feature moments of the real images.

- data/ref_stats.npz: evaluation-network (or Inception) features of every real image: `mu`,
  `sigma` (full covariance, as clean-fid and the ADM evaluator store them) and `features` for
  precision / recall. With `weights.ref_stats` set, an ADM reference batch is imported instead.
- data/reward_ref_stats.npz: the reward side's features of the train split, for LOO-FID.
"""

from common import extractor, params, preflight, run_stage, stage

from argrpo.data import load_dataset, to_tensor
from argrpo.features import extract
from argrpo.metrics import save_ref_stats


def main() -> None:
    p = params()
    cfg = p.ref_stats
    preflight(p, ["inception", "ref_stats"])
    with stage("ref_stats", p.raw.get("ref_stats")) as run:
        eval_x = extractor(p, "eval")
        reward_x = extractor(p, "reward") if cfg.features == "classifier" else eval_x  # one Inception serves both
        data = load_dataset("data/dataset.npz")
        ref_file = p.weights.ref_stats
        if ref_file:  # an ADM-style reference batch (mu, sigma, arr_0) replaces the dataset's moments
            import numpy as np

            from argrpo.inception import load_adm_reference

            ref = load_adm_reference(ref_file, extractor=eval_x, batch_size=cfg.batch_size)
            np.savez("data/ref_stats.npz", **ref)
            # one Inception for both sides: LOO-FID compares against the same reference moments
            np.savez("data/reward_ref_stats.npz", mu=ref["mu"], sigma=ref["sigma"])
            run.log_metrics({"ref_images": len(ref.get("features", []))})
            return
        else:
            images = to_tensor(data.images)
            save_ref_stats("data/ref_stats.npz", *extract(eval_x, images))
        train_images, _ = data.part("train")  # the reward side never sees the evaluation network
        save_ref_stats("data/reward_ref_stats.npz", reward_x.features(train_images).numpy())
        run.log_metrics({"ref_images": len(data.labels), "reward_ref_images": len(train_images)})


if __name__ == "__main__":
    run_stage(main)
