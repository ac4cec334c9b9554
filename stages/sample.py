"""Stage sample: class-balanced, seeded samples of every configuration, as PNG files and one .npz each.

Configurations: base_cfg (the base model at `sample.cfg_scale`), base_nocfg, and one
grpo_<variant>_s<seed>_nocfg per GRPO run (the tuned policies sample without guidance).
Runs under `torchrun`: each process samples its own contiguous share of the image indices and rank 0
writes the files; every image depends on the seed and its index only, not on the process count.
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import load_base, model_config, params, preflight, stage, write_json
from PIL import Image

from argrpo.config import load_section, require
from argrpo.data import to_uint8
from argrpo.distributed import all_gather_cat, barrier, cleanup, init_distributed
from argrpo.generator import forward_passes_per_image, generate_sharded
from argrpo.sampling import SamplingConfig

OUT = Path("samples")


@dataclass(frozen=True)
class SampleConfig:
    num_images: int = 1000
    batch_size: int = 250
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    save_png: int = 100

    def __post_init__(self) -> None:
        require(self.num_images >= 2, "num_images", "must be >= 2", self.num_images)
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(self.cfg_scale > 1, "cfg_scale", "must be > 1 (the guided row of the base model)", self.cfg_scale)
        require(self.save_png >= 0, "save_png", "must be >= 0", self.save_png)

    def sampling(self, cfg_scale: float) -> SamplingConfig:
        return SamplingConfig(cfg_scale=cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def configurations(p: dict, cfg: SampleConfig) -> dict[str, tuple[Path | None, SamplingConfig]]:
    runs = p.get("grpo_runs") or {}
    configs: dict[str, tuple[Path | None, SamplingConfig]] = {
        "base_cfg": (None, cfg.sampling(cfg.cfg_scale)),
        "base_nocfg": (None, cfg.sampling(1.0)),
    }
    for variant in runs.get("variants") or {}:
        for seed in runs.get("seeds") or []:
            policy = Path("models/grpo") / f"{variant}_s{seed}" / "policy.pt"
            configs[f"grpo_{variant}_s{seed}_nocfg"] = (policy, cfg.sampling(1.0))
    return configs


def write_samples(name: str, pixels: np.ndarray, labels: np.ndarray, save_png: int, cost: dict) -> None:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(save_png, len(pixels))):
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}_class{int(labels[i])}.png")
    np.savez_compressed(OUT / f"{name}.npz", images=pixels, labels=labels)
    write_json(OUT / f"{name}.json", cost)


def main() -> None:
    p = params()
    cfg = load_section(SampleConfig, p.get("sample"), "sample")
    model = model_config(p)
    preflight(p, ["gpt_checkpoint", "vq_checkpoint"])
    dist = init_distributed(model.device)
    labels = torch.arange(cfg.num_images) % model.num_classes  # class-balanced
    with stage("sample", p.get("sample")) if dist.is_main else nullcontext() as run:
        for name, (policy, sampling) in configurations(p, cfg).items():
            gpt, vq = load_base(model, policy, dist.device)
            start = time.perf_counter()
            index, images = generate_sharded(gpt, vq, labels, sampling, cfg.batch_size, cfg.seed, dist, desc=name,
                                             precision=model.precision)
            seconds = time.perf_counter() - start
            index, pixels = all_gather_cat(index), all_gather_cat(torch.from_numpy(to_uint8(images)))
            if dist.is_main:
                assert torch.equal(index, torch.arange(cfg.num_images)), "shards must tile the images exactly"
                cost = {"seconds_per_image": seconds * dist.world_size / cfg.num_images,  # device-seconds
                        "forward_passes_per_image": forward_passes_per_image(sampling, gpt.config.block_size),
                        "cfg_scale": sampling.cfg_scale, "num_images": cfg.num_images, "processes": dist.world_size}
                write_samples(name, pixels.numpy(), labels.numpy(), cfg.save_png, cost)
                run.log_metrics({f"{name}.seconds_per_image": cost["seconds_per_image"]})
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
