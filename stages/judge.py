"""Stage judge: the embedded stand-ins for the networks real runs take from files.

- a reward classifier trained on the generator's train split (the instance reward and, through its
  features, the LOO-FID reward);
- an independent evaluation network (another seed, another split of the data) whose pooled
  features serve FID / precision / recall and whose class probabilities serve IS, as Inception does
  on ImageNet. Rewards never read the evaluation network's weights.
"""

from dataclasses import dataclass

import numpy as np
import torch
from common import JUDGE_DIR, params, stage, write_json

from argrpo.classifier import accuracy, save_classifier, train_classifier
from argrpo.config import load_section, require
from argrpo.data import load_dataset, stratified_split, to_tensor


@dataclass(frozen=True)
class JudgeConfig:
    reward_seed: int = 1
    eval_seed: int = 2
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    eval_holdout_fraction: float = 0.3
    enabled: bool = True  # false at real scale, where Inception and the reward files judge

    def __post_init__(self) -> None:
        require(self.reward_seed != self.eval_seed, "eval_seed", "must differ from reward_seed", self.eval_seed)
        require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        require(0 < self.eval_holdout_fraction < 1, "eval_holdout_fraction", "must be in (0, 1)",
                self.eval_holdout_fraction)


def main() -> None:
    p = params()
    cfg = load_section(JudgeConfig, p.get("judge"), "judge")
    data = load_dataset("data/dataset.npz")
    n_classes = len(data.class_names)
    with stage("judge", p.get("judge")) as run:
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
    main()
