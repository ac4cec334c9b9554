"""Stage judge: the embedded stand-ins for the networks real runs take from files.

- a reward classifier trained on the generator's train split (the instance reward and, through its
  features, the LOO-FID reward);
- an independent evaluation network (another seed, another split of the data) whose pooled
  features serve FID / precision / recall and whose class probabilities serve IS, as Inception does
  on ImageNet. Rewards never read the evaluation network's weights.
"""

import numpy as np
import torch
from common import JUDGE_DIR, params, run_stage, stage, write_json

from argrpo.classifier import accuracy, save_classifier, train_classifier
from argrpo.data import load_dataset, stratified_split, to_tensor


def main() -> None:
    p = params()
    cfg = p.judge
    data = load_dataset("data/dataset.npz")
    n_classes = len(data.class_names)
    with stage("judge", p.raw.get("judge")) as run:
        if not cfg.enabled:
            JUDGE_DIR.mkdir(parents=True, exist_ok=True)
            (JUDGE_DIR / "DISABLED").write_text("judge.enabled is false: no embedded judge networks\n")
            write_json("reports/judge.json", {"enabled": False})
            return
        train_x, train_y = data.part("train")
        hold_x, hold_y = data.part("holdout")
        reward = train_classifier(train_x, train_y, seed=cfg.reward_seed, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, lr=cfg.lr, num_classes=n_classes, progress=True)
        # the evaluation network sees its own random split of all the data, drawn with its own seed
        own = stratified_split(data.labels, cfg.eval_holdout_fraction, cfg.eval_seed)
        x_all, y_all = to_tensor(data.images), torch.from_numpy(data.labels)
        eval_net = train_classifier(x_all[own == 0], y_all[own == 0], seed=cfg.eval_seed, epochs=cfg.epochs,
                                    batch_size=cfg.batch_size, lr=cfg.lr, num_classes=n_classes, progress=True)
        own_hold = torch.from_numpy(np.flatnonzero(own == 1))
        scores = {
            "reward_classifier_holdout_accuracy": accuracy(reward, hold_x, hold_y),
            "eval_net_holdout_accuracy": accuracy(eval_net, x_all[own_hold], y_all[own_hold]),
            "eval_net_holdout_images": int(len(own_hold)),
        }
        save_classifier(JUDGE_DIR / "reward_classifier.pt", reward)
        save_classifier(JUDGE_DIR / "eval_net.pt", eval_net)
        write_json("reports/judge.json", scores)
        run.log_metrics(scores)
        print(f"judge: {scores}")


if __name__ == "__main__":
    run_stage(main)
