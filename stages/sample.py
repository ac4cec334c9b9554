"""Stage sample: condition-balanced, seeded samples of every configuration, as .npz shards (the png stage
writes the first `sample.save_png` of each as PNG files).

Configurations: base_cfg (the base model at `sample.cfg_scale`), base_nocfg, and one
grpo_<variant>_s<seed>_nocfg per GRPO run (the tuned policies sample without guidance). Image i is drawn
for condition id i mod P of the evaluation condition set (data/prompts_eval.npz: P classes, (class,
style) pairs or prompts); the shards hold `images`, `conditions` and `labels` (the class of each image's
condition, -1 where it has none), which evaluation's class (prompt) accuracy reads (layout: argrpo/samples.py).
Runs under `torchrun`: each process samples its own contiguous share of the image indices and writes each
sampling call's images as one shard as soon as they are decoded, so memory stays one batch whatever
`sample.num_images`; rank 0 checks the shards tile the set and writes the cost file last. Every image
depends on the seed and its index only, not on the process count.
"""

import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import condition_set, load_policy, params, preflight, run_stage, stage, write_json

from argrpo.data import to_uint8
from argrpo.distributed import barrier, cleanup, init_distributed
from argrpo.generator import generate_chunks
from argrpo.params import Params
from argrpo.samples import shards, write_shard
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


def sample_configuration(p: Params, name: str, weights: Path | None, sampling: SamplingConfig, conditions, evaluation,
                         dist) -> float:
    """Sample one configuration into samples/<name>/ (this process's shards); its device-seconds per image."""
    cfg, folder = p.sample, OUT / name
    if dist.is_main:  # shards of an earlier run with another batch size would not tile with the new ones
        shutil.rmtree(folder, ignore_errors=True)
        (OUT / f"{name}.json").unlink(missing_ok=True)
        folder.mkdir(parents=True)
    barrier()
    policy = load_policy(p, weights, dist.device, evaluation)
    seconds, start = 0.0, time.perf_counter()
    for index, images in generate_chunks(policy, conditions, sampling, cfg.batch_size, cfg.seed, dist, desc=name,
                                         precision=p.model.precision):
        seconds += time.perf_counter() - start  # sampling and decoding only, not the writing
        pixels, chunk = to_uint8(images), conditions[index]
        labels = policy.labels(chunk.to(policy.device)).cpu().numpy()
        write_shard(folder, int(index[0]), pixels, chunk.numpy(), labels)
        start = time.perf_counter()
    seconds_per_image = seconds * dist.world_size / cfg.num_images  # device-seconds
    barrier()
    if dist.is_main:
        shards(folder, cfg.num_images)  # every process's shards are there and tile the set exactly
        cost = {"seconds_per_image": seconds_per_image, "forward_passes_per_image": policy.forward_passes(sampling),
                "cfg_scale": sampling.cfg_scale, "num_images": cfg.num_images, "processes": dist.world_size}
        write_json(OUT / f"{name}.json", cost)  # last: the mark of a complete set
    return seconds_per_image


def main() -> None:
    p = params()
    cfg = p.sample
    preflight(p, ["gpt_checkpoint", "vq_checkpoint"])
    dist = init_distributed(p.model.device)
    evaluation = condition_set("eval")
    conditions = torch.arange(cfg.num_images) % len(evaluation)  # balanced over the condition ids
    with stage("sample", p.raw.get("sample")) if dist.is_main else nullcontext() as run:
        for name, (weights, sampling) in configurations(p).items():
            seconds_per_image = sample_configuration(p, name, weights, sampling, conditions, evaluation, dist)
            if dist.is_main:
                run.log_metrics({f"{name}/seconds_per_image": seconds_per_image})
    barrier()
    cleanup()


if __name__ == "__main__":
    run_stage(main)
