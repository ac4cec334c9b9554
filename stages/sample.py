"""Stage sample: condition-balanced, seeded samples of every configuration, as PNG files and one .npz each.

Configurations: base_cfg (the base model at `sample.cfg_scale`), base_nocfg, and one
grpo_<variant>_s<seed>_nocfg per GRPO run (the tuned policies sample without guidance). Image i is drawn
for condition id i mod P of the evaluation condition set (data/prompts_eval.npz: P classes, (class,
style) pairs or prompts); the .npz holds `images`, `conditions` and `labels` (the class of each image's
condition, -1 where it has none), which evaluation's class (prompt) accuracy reads.
Runs under `torchrun`: each process samples its own contiguous share of the image indices and rank 0
writes the files; every image depends on the seed and its index only, not on the process count.
"""

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import condition_set, load_policy, params, preflight, run_stage, stage, write_json
from PIL import Image

from argrpo.data import to_uint8
from argrpo.distributed import all_gather_cat, barrier, cleanup, init_distributed
from argrpo.generator import generate_sharded
from argrpo.params import Params
from argrpo.sampling import SamplingConfig

OUT = Path("samples")


def configurations(p: Params) -> dict[str, tuple[Path | None, SamplingConfig]]:
    configs: dict[str, tuple[Path | None, SamplingConfig]] = {
        "base_cfg": (None, p.sample.sampling(p.sample.cfg_scale)),
        "base_nocfg": (None, p.sample.sampling(1.0)),
    }
    for variant in p.grpo_runs.variants:
        for seed in p.grpo_runs.seeds:
            policy = Path("models/grpo") / f"{variant}_s{seed}" / "policy.pt"
            configs[f"grpo_{variant}_s{seed}_nocfg"] = (policy, p.sample.sampling(1.0))
    return configs


def write_samples(name: str, pixels: np.ndarray, conditions: np.ndarray, labels: np.ndarray, save_png: int,
                  cost: dict) -> None:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(save_png, len(pixels))):
        c, label = int(conditions[i]), int(labels[i])
        # plain class ids keep the short name; pairs and prompts name their condition and class (if any)
        what = f"class{label}" if c == label else f"condition{c}" + (f"_class{label}" if label >= 0 else "")
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}_{what}.png")
    np.savez_compressed(OUT / f"{name}.npz", images=pixels, conditions=conditions, labels=labels)
    write_json(OUT / f"{name}.json", cost)


def main() -> None:
    p = params()
    cfg = p.sample
    preflight(p, ["gpt_checkpoint", "vq_checkpoint"])
    dist = init_distributed(p.model.device)
    evaluation = condition_set("eval")
    conditions = torch.arange(cfg.num_images) % len(evaluation)  # balanced over the condition ids
    with stage("sample", p.raw.get("sample")) if dist.is_main else nullcontext() as run:
        for name, (weights, sampling) in configurations(p).items():
            policy = load_policy(p, weights, dist.device, evaluation)
            start = time.perf_counter()
            index, images = generate_sharded(policy, conditions, sampling, cfg.batch_size, cfg.seed, dist,
                                             desc=name, precision=p.model.precision)
            seconds = time.perf_counter() - start
            index, pixels = all_gather_cat(index), all_gather_cat(torch.from_numpy(to_uint8(images)))
            if dist.is_main:
                assert torch.equal(index, torch.arange(cfg.num_images)), "shards must tile the images exactly"
                cost = {"seconds_per_image": seconds * dist.world_size / cfg.num_images,  # device-seconds
                        "forward_passes_per_image": policy.forward_passes(sampling),
                        "cfg_scale": sampling.cfg_scale, "num_images": cfg.num_images, "processes": dist.world_size}
                labels = policy.labels(conditions.to(policy.device)).cpu()
                write_samples(name, pixels.numpy(), conditions.numpy(), labels.numpy(), cfg.save_png, cost)
                run.log_metrics({f"{name}.seconds_per_image": cost["seconds_per_image"]})
    barrier()
    cleanup()


if __name__ == "__main__":
    run_stage(main)
