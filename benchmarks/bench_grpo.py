"""GRPO step time: argrpo's step against a re-implementation of the LOO-FID paper's loop, compiled against
eager decoding, and the Inception resize. Run by hand, not a test:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_grpo.py        # CPU: T = 16, 64, 256 tokens, B = 10, G = 12
    python benchmarks/bench_grpo.py --device cuda                   # adds GPT-B / GPT-L decode per token (bf16)

from the repository root with argrpo importable (`pip install -e .`, or `PYTHONPATH=.`).

Both sides run the same LlamaGen-architecture GPT (argrpo.gpt.GPT, one set of weights copied to each), the same
VQ decoder, the same rewards (classifier log-prob and LOO-FID over a judge network's features) and the same
sampler; only the loop differs. argrpo: `grpo_step` (one batched rollout of B*G sequences, its own update).
The paper's loop, as its public code runs it (written here from its description, no code copied): G
sequential generate calls of the B labels, each with its own KV cache; each g's images decoded; rewards on
all G*B; advantages per label over G; old log-probs from G teacher-forced no-grad forwards with class dropout
active; then K epochs, each: for every g a grad forward, entropy, sequence log-prob, ratio,
min(-r A, -clip(r) A).mean() - c * entropy + beta * k3 KL against a no-grad reference forward of that g,
summed over g, one backward; then (LOO-FID on) for every g another grad forward and 2 * min(...) with the
FID advantages, summed, a second backward; grad-norm clip and one optimizer step per epoch. The reference
is a frozen copy. Settings are the paper's: G 12, K 2, clip 0.2, beta 3.0, W_FID 1 (x2), rollout cfg 1.5.

On a CPU shared with other jobs the two sides are interleaved (alternating which goes first) and every
ratio is the median over repeats of the per-repeat ratio; the JSON records the load average and the
OpenMP settings. Writes reports/bench_grpo.json and reports/bench_grpo.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from argrpo.classifier import DigitClassifier
from argrpo.features import ClassifierFeatures
from argrpo.generator import LlamaGenPolicy
from argrpo.gpt import GPT, gpt_config
from argrpo.grpo import GRPOConfig, autocast, grpo_step, start_run
from argrpo.inception import DEVICE_RESIZE_ATOL, resize_on_device
from argrpo.loss import group_advantages
from argrpo.rewards.classifier import ClassifierReward
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward
from argrpo.sampling import (
    SamplingConfig,
    attended_length,
    chosen_logprobs,
    decode_and_pick,
    race_noise,
    sample_tokens,
)
from argrpo.vq import VQModel, vq_config

OMP_SETTINGS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TARGETS = {"step_vs_paper": 2.0, "update_vs_paper": 1.2}  # at B = 10, every T: "at least"
PHASES = ("rollout", "decode", "reward", "update")
# H100 SXM (80 GB HBM3) datasheet bandwidth, the bound's denominator where none is measured
H100_HBM_BYTES_PER_S = 3.35e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Laps:
    """Seconds per phase, fenced by device syncs."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        sync(device)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase], self.last = now - self.last, now


def grpo_settings(args: argparse.Namespace, device: torch.device) -> GRPOConfig:
    """The paper's settings (README of its code): both sides read their numbers from this config."""
    return GRPOConfig(
        steps=600, batch_classes=args.batch_classes, group_size=args.group_size, inner_epochs=2, clip_eps=0.2,
        kl_beta=3.0, reference="frozen", rewards={"classifier": 1.0}, fid_advantage_weight=2.0,
        loo_fid=LooFidConfig(mode="ema_loo", ema_beta=0.5),
        sampling=SamplingConfig(cfg_scale=1.5, compile=args.compile), lr=1e-5,
        precision="bf16" if device.type == "cuda" else "fp32", seed=0,
    )


def build_policy(preset: str, tokens: int, num_classes: int, device: torch.device) -> LlamaGenPolicy:
    """A LlamaGen-architecture GPT on the small VQ's codebook, with a non-zero head (a trained model's
    filtered distributions, not uniform ones), and the VQ decoder; seeded, so each call gives the same weights."""
    torch.manual_seed(0)
    vq = VQModel(vq_config("small"))
    gpt = GPT(gpt_config(preset, vocab_size=vq.config.codebook_size, num_classes=num_classes, block_size=tokens))
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    return LlamaGenPolicy(gpt, vq).to(device).eval()


def build_rewards(num_classes: int, device: torch.device, cfg: GRPOConfig):
    """The instance reward (a judge's class log-prob) and LOO-FID over another judge's features."""
    torch.manual_seed(1)
    judge = DigitClassifier(num_classes=num_classes, width=16, feat_dim=32).to(device).eval()
    features = DigitClassifier(num_classes=num_classes, width=16, feat_dim=32).to(device).eval()
    rewards = {"classifier": (ClassifierReward(judge), 1.0)}
    loo = LooFidReward.from_config(ClassifierFeatures(features, device=device), torch.zeros(32), torch.ones(32),
                                   cfg.loo_fid)
    return rewards, loo


class ArgrpoSide:
    """argrpo's public step on its own copy of the weights."""

    def __init__(self, policy: LlamaGenPolicy, cfg: GRPOConfig, num_classes: int):
        self.rewards, self.loo = build_rewards(num_classes, policy.device, cfg)
        self.cfg, self.run = cfg, start_run(policy, cfg)

    def step(self) -> dict[str, float]:
        sync(self.run.policy.device)
        start = time.perf_counter()
        metrics = grpo_step(self.run, self.rewards, self.loo, self.cfg)
        sync(self.run.policy.device)
        self.run.step += 1
        return {"step": time.perf_counter() - start, **{p: metrics[f"time/{p}"] for p in PHASES}}


class PaperSide:
    """The LOO-FID paper's iteration (module docstring) over argrpo's sampler, decoder and rewards."""

    def __init__(self, policy: LlamaGenPolicy, cfg: GRPOConfig, num_classes: int):
        self.rewards, self.loo = build_rewards(num_classes, policy.device, cfg)
        self.policy, self.cfg, self.device = policy, cfg, policy.device
        self.reference = policy.frozen_copy()  # the wrapper the paper builds is never updated: a frozen anchor
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.condition_rng = torch.Generator().manual_seed(cfg.seed)
        self.sample_rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.entropy = cfg.entropy

    def sequence_logprobs(self, net: GPT, labels: torch.Tensor, tokens: torch.Tensor,
                          drop: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs and entropies [B, T]; `drop`: class dropout, as in train mode."""
        with autocast(self.device, self.cfg.precision):
            logits = net(tokens[:, :-1], labels, drop_labels=drop)[:, -tokens.shape[1]:]  # [B, T, V]
        return chosen_logprobs(logits.float() / self.cfg.sampling.temperature, tokens)

    def entropy_coef(self, entropy: torch.Tensor) -> float:
        """Stateless: clamp(base * exp(k * (target - H_norm)), min, max) from this batch's entropy."""
        e = self.entropy
        err = e.target - entropy.mean().item() / math.log(self.policy.vocab_size)
        return min(max(e.base_coef * math.exp(e.gain_k * err), e.min_coef), e.max_coef)

    def surrogate(self, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """The paper's per-g objective: mean_B min(-r A, -clip(r) A) with the sequence-level ratio."""
        ratio = (logp.mean(1) - old.mean(1)).exp()  # [B]
        eps = self.cfg.clip_eps
        return torch.min(-ratio * adv, -ratio.clamp(1 - eps, 1 + eps) * adv).mean()

    def step(self) -> dict[str, float]:
        cfg, G, B, net = self.cfg, self.cfg.group_size, self.cfg.batch_classes, self.policy.net
        start = time.perf_counter()
        laps = Laps(self.device)
        labels = torch.randint(self.policy.num_conditions, (B,), generator=self.condition_rng).to(self.device)
        with autocast(self.device, cfg.precision):  # G generate calls, each with a fresh KV cache
            tokens = [self.policy.rollout(labels, cfg.sampling, self.sample_rng).tokens for _ in range(G)]
        laps.lap("rollout")
        images = torch.cat([self.policy.decode(t) for t in tokens])  # [G*B, 3, H, W], g-major
        laps.lap("decode")
        all_labels = labels.repeat(G)
        reward, _ = self.rewards["classifier"]
        instance = reward(images, all_labels).float()
        fid = self.loo.score(self.loo.features(images))
        # advantages per label over its G samples: [G, B] -> groups of G contiguous -> back to [G, B]
        adv = group_advantages(instance.view(G, B).T.reshape(-1), G).view(B, G).T
        adv_fid = group_advantages(fid.view(G, B).T.reshape(-1), G).view(B, G).T
        laps.lap("reward")

        net.train()
        with torch.no_grad():  # old log-probs: G teacher-forced passes with class dropout, as in train mode
            old = [self.sequence_logprobs(net, labels, tokens[g], drop=True)[0] for g in range(G)]
        for _ in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for g in range(G):
                logp, entropy = self.sequence_logprobs(net, labels, tokens[g], drop=True)
                loss = self.surrogate(logp, old[g], adv[g]) - self.entropy_coef(entropy) * entropy.mean()
                if cfg.kl_beta > 0:
                    with torch.no_grad():
                        ref = self.sequence_logprobs(self.reference.net, labels, tokens[g], drop=False)[0]
                    d = ref.mean(1) - logp.mean(1)
                    loss = loss + cfg.kl_beta * (d.exp() - d - 1).mean()
                total = total + loss  # summed over g, not averaged
            total.backward()
            if cfg.fid_advantage_weight > 0:  # the FID term: another grad forward per g, a second backward
                total = 0.0
                for g in range(G):
                    logp, _ = self.sequence_logprobs(net, labels, tokens[g], drop=True)
                    total = total + cfg.fid_advantage_weight * self.surrogate(logp, old[g], adv_fid[g])
                total.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            self.optimizer.step()
        net.eval()
        laps.lap("update")
        return {"step": time.perf_counter() - start, **laps.seconds}


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def compare_steps(args: argparse.Namespace, device: torch.device, tokens: int) -> dict:
    """`args.repeats` interleaved GRPO steps of each side (after one warm-up step each) at `tokens` tokens."""
    cfg = grpo_settings(args, device)
    policy = build_policy(args.preset, tokens, args.num_classes, device)
    sides = {"argrpo": ArgrpoSide(copy.deepcopy(policy), cfg, args.num_classes),
             "paper": PaperSide(copy.deepcopy(policy), cfg, args.num_classes)}
    for side in sides.values():
        side.step()
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    loads = []
    for r in range(args.repeats):
        order = ("argrpo", "paper") if r % 2 == 0 else ("paper", "argrpo")
        for name in order:
            timings[name].append(sides[name].step())
        loads.append(round(os.getloadavg()[0], 2))
        print(f"T={tokens} repeat {r}: argrpo {timings['argrpo'][-1]['step']:.2f} s, "
              f"paper {timings['paper'][-1]['step']:.2f} s (load {loads[-1]})", flush=True)

    def series(name: str, key: str) -> list[float]:
        return [t[key] for t in timings[name]]

    out = {"tokens": tokens, "image_size": policy.decode(torch.zeros(1, tokens, dtype=torch.long,
                                                                      device=device)).shape[-1],
           "load_1min": loads, "timings_s": timings}
    for key in ("step", *PHASES):
        out[f"{key}_ratio"] = median_ratio(series("paper", key), series("argrpo", key))
        out[f"{key}_median_s"] = {name: statistics.median(series(name, key)) for name in sides}
    for name in sides:  # where each side's time goes, as fractions of its median step
        total = sum(out[f"{p}_median_s"][name] for p in PHASES)
        out.setdefault("phase_fractions", {})[name] = {p: out[f"{p}_median_s"][name] / total for p in PHASES}
    return out


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of the weights a decode step reads: every parameter but the embedding tables (rows only)."""
    skip = {id(p) for p in (*model.tok_embeddings.parameters(), *model.cls_embedding.parameters())}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def kv_bytes_per_step(model: GPT, rows: int) -> float:
    """Bytes of K and V a compiled decode step reads, the mean over a rollout's steps: `attended_length`
    cache positions of every layer."""
    c, p = model.config, model.output.weight
    max_len = c.cls_token_num + c.block_size
    lengths = [attended_length(c.cls_token_num + t - 1, max_len) for t in range(1, c.block_size)]
    return 2 * c.n_layer * rows * c.kv_heads * statistics.mean(lengths) * c.head_dim * p.element_size()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    x = torch.empty(256 * 2**20 if device.type == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * x.numel() / statistics.median(times)


def decode_explain(model: GPT, batch: int, cfg: SamplingConfig) -> dict:
    """What torch._dynamo.explain finds in one decode step (the model's step and the token choice)."""
    c, device = model.config, model.output.weight.device
    rows = 2 * batch if cfg.guided else batch
    cache = model.new_cache(rows)
    noise = race_noise((batch, c.vocab_size), torch.float32, device, None)
    token = torch.zeros(batch, dtype=torch.long, device=device)
    position = torch.tensor([c.cls_token_num], device=device)
    with torch.no_grad():
        explained = torch._dynamo.explain(decode_and_pick)(model, token, position, c.cls_token_num + 1, cache, noise,
                                                           batch, cfg, True)
    return {"graph_count": explained.graph_count, "graph_break_count": explained.graph_break_count,
            "break_reasons": [str(b.reason) for b in explained.break_reasons]}


def decode_speed(preset: str, tokens: int, vocab: int, num_classes: int, batch: int, modes: tuple[str, ...],
                 repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per token step (all rows one token) of `sample_tokens` with each compile mode, interleaved.

    batch sequences with cfg 1.5, so 2 * batch rows per step; the first call of each mode (compilation,
    CUDA graph recording) is left out.
    """
    torch.manual_seed(0)
    model = GPT(gpt_config(preset, block_size=tokens, vocab_size=vocab, num_classes=num_classes))
    torch.nn.init.normal_(model.output.weight, std=0.02)
    model = model.to(device=device, dtype=dtype).eval()
    labels = torch.arange(batch, device=device) % num_classes
    base = SamplingConfig(cfg_scale=1.5)
    explained = decode_explain(model, batch, base)
    assert explained["graph_break_count"] == 0, explained  # the decode step compiles to one graph

    def run(mode: str) -> tuple[float, torch.Tensor]:
        cfg = SamplingConfig(cfg_scale=1.5, compile=mode)
        sync(device)
        start = time.perf_counter()
        sample = sample_tokens(model, labels, cfg, torch.Generator(device).manual_seed(0))
        sync(device)
        return time.perf_counter() - start, sample.tokens

    first = {}
    for mode in modes:
        seconds, first[mode] = run(mode)
        if mode != "off":  # reduce-overhead records its CUDA graphs on the second call
            seconds, first[mode] = run(mode)
    seconds = {mode: [] for mode in modes}
    for r in range(repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            seconds[mode].append(run(mode)[0])
    rows = 2 * batch
    weights, kv = weight_bytes_per_step(model), kv_bytes_per_step(model, rows)
    out = {"preset": preset, "tokens": tokens, "vocab": vocab, "batch": batch, "rows": rows, "dtype": str(dtype),
           "explain": explained, "weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
           "same_tokens_as_eager": {m: bool(torch.equal(first[m], first["off"])) for m in modes},
           "timings_s": seconds}
    for mode in modes:
        per_call = statistics.median(seconds[mode])
        out[mode] = {"median_s": per_call, "tokens_per_s": batch * tokens / per_call,
                     "per_token_step_us": 1e6 * per_call / tokens}
    for mode in modes[1:]:
        out[f"{mode}_vs_off"] = median_ratio(seconds["off"], seconds[mode])
    return out


def resize_costs(device: torch.device, images: int = 16, size: int = 256) -> dict:
    """Seconds per image of clean-fid's PIL resize on the host and of `resize_on_device`, and their gap."""
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(images, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # [-1, 1]
    resize = build_resizer("clean")
    start = time.perf_counter()
    reference = np.stack([resize(p) for p in pixels])
    host = (time.perf_counter() - start) / images
    resize_on_device(x)  # warm-up
    sync(device)
    start = time.perf_counter()
    ours = resize_on_device(x)
    sync(device)
    on_device = (time.perf_counter() - start) / images
    gap = (ours.cpu() - torch.from_numpy(reference).permute(0, 3, 1, 2)).abs().max().item()
    return {"size": size, "images": images, "device": str(device), "clean_fid_pil_s_per_image": host,
            "device_resize_s_per_image": on_device, "max_abs_gap": gap, "tolerance": DEVICE_RESIZE_ATOL}


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in OMP_SETTINGS if k in os.environ}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# GRPO step: argrpo against the LOO-FID paper's loop",
        "",
        f"`{s['preset']}` GPT (LlamaGen architecture), small VQ, B = {s['batch_classes']}, G = {s['group_size']}, "
        f"K = 2, rollout cfg 1.5 (sampler compile: {s['compile']}), beta 3, LOO-FID on (x2), on {s['device']} "
        f"({m['threads']} threads, {m['cpu']}, "
        f"{m['env'] or 'default OpenMP settings'}, torch {m['torch']}{', ' + m['gpu'] if 'gpu' in m else ''}). "
        f"Medians over {s['repeats']} interleaved repeats after one warm-up step per side; each ratio is the "
        f"median of the per-repeat ratios (paper time / argrpo time). Load average (1, 5, 15 min) before / after: "
        f"{report['load_before']} / {report['load_after']}; total {report['total_s']:.0f} s.",
        "",
        "| T | image px | argrpo step s | paper step s | step ratio | update ratio | rollout ratio | "
        "decode ratio | reward ratio | 1-min load per repeat |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for T, r in report["steps"].items():
        lines.append(f"| {T} | {r['image_size']} | {r['step_median_s']['argrpo']:.2f} | "
                     f"{r['step_median_s']['paper']:.2f} | {r['step_ratio']:.2f} | {r['update_ratio']:.2f} | "
                     f"{r['rollout_ratio']:.2f} | {r['decode_ratio']:.2f} | {r['reward_ratio']:.2f} | "
                     f"{r['load_1min']} |")
    lines += ["", "Targets at B = 10: " + ", ".join(
        f"{name} >= {target} at every T: {'met' if report['targets_met'][name] else 'NOT met'}"
        for name, target in TARGETS.items()) + ".", "",
        "Where each side's step goes (fractions of its median step):", "",
        "| T | side | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for T, r in report["steps"].items():
        for name, fractions in r["phase_fractions"].items():
            lines.append(f"| {T} | {name} | " + " | ".join(f"{fractions[p]:.0%}" for p in PHASES) + " |")
    for key, title in (("decode_cpu", "Compiled against eager decoding"), ("decode_gpu", "GPU decoding")):
        for d in report.get(key, []):
            modes = [mode for mode in ("off", "default", "reduce-overhead") if mode in d]
            lines += ["", f"## {title}: `{d['preset']}`, {d['tokens']} tokens, {d['batch']} sequences "
                          f"({d['rows']} rows with cfg 1.5), {d['dtype']}", "",
                      f"torch._dynamo.explain on one decode step: {d['explain']['graph_count']} graph, "
                      f"{d['explain']['graph_break_count']} graph breaks. Bytes a compiled token step reads: "
                      f"weights {d['weight_bytes_per_step'] / 1e6:.1f} MB + KV cache "
                      f"{d['kv_bytes_per_step'] / 1e6:.1f} MB (mean over the steps).", "",
                      "| compile | s per call | tokens/s | us per token step | same tokens as eager | speed-up |",
                      "|---|---|---|---|---|---|"]
            for mode in modes:
                r = d[mode]
                lines.append(f"| {mode} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['per_token_step_us']:,.0f} | {d['same_tokens_as_eager'][mode]} | "
                             f"{d.get(f'{mode}_vs_off', 1.0):.2f} |")
            if "bound_us" in d:
                lines.append(f"\nMemory-bandwidth bound per token step: {d['bound_us']['weights']:.0f} us (weights), "
                             f"{d['bound_us']['weights_and_kv']:.0f} us (weights + KV), at "
                             f"{d['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s measured copy bandwidth.")
    r = report["resize"]
    lines += ["", f"## Inception resize ({r['size']} px -> 299, {r['images']} images)", "",
              f"clean-fid's PIL resize on the host: {1e3 * r['clean_fid_pil_s_per_image']:.2f} ms per image; "
              f"`resize_on_device` on {r['device']}: {1e3 * r['device_resize_s_per_image']:.2f} ms per image; "
              f"largest gap {r['max_abs_gap']:.1e} on the 0-255 scale (tolerance {r['tolerance']:.0e})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="GPT preset of the GRPO step comparison")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256], help="T: image tokens (squares)")
    parser.add_argument("--batch-classes", type=int, default=10, help="B")
    parser.add_argument("--group-size", type=int, default=12, help="G")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead"],
                        help="the sampler's compile mode in the GRPO step comparison, the same on both sides")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[12, 120],
                        help="sequences per sampling call in the compiled-vs-eager decode comparison")
    parser.add_argument("--gpu-presets", nargs="+", default=["GPT-B", "GPT-L"],
                        help="with --device cuda: presets timed per token (bf16, vocab 16384, 256 tokens)")
    parser.add_argument("--gpu-batch", type=int, default=12, help="sequences per GPU (the paper: 12 labels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_grpo.json"))
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3 for a median, got {args.repeats}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine(device), "load_before": load_before}
    report["steps"] = {str(T): compare_steps(args, device, T) for T in args.tokens}
    report["step_vs_paper"] = {T: r["step_ratio"] for T, r in report["steps"].items()}
    report["update_vs_paper"] = {T: r["update_ratio"] for T, r in report["steps"].items()}
    report["targets"] = {name: f">= {target} at B = {args.batch_classes}" for name, target in TARGETS.items()}
    report["targets_met"] = {name: all(v >= target for v in report[name].values())
                             for name, target in TARGETS.items()}

    modes = ("off", "default", "reduce-overhead") if device.type == "cuda" else ("off", "default")
    vocab = vq_config("small").codebook_size
    report["decode_cpu"] = [decode_speed(args.preset, max(args.tokens), vocab, args.num_classes, batch, modes,
                                         args.repeats, device, torch.float32) for batch in args.decode_batch]
    report["compiled_vs_eager"] = {str(d["batch"]): d["default_vs_off"] for d in report["decode_cpu"]}
    report["decode_graph_breaks"] = max(d["explain"]["graph_break_count"] for d in report["decode_cpu"])
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        report["decode_gpu"] = []
        for preset in args.gpu_presets:
            d = decode_speed(preset, 256, 16384, 1000, args.gpu_batch, modes, args.repeats, device, torch.bfloat16)
            d["bandwidth_bytes_per_s"] = bandwidth
            d["bound_us"] = {"weights": 1e6 * d["weight_bytes_per_step"] / bandwidth,
                             "weights_and_kv": 1e6 * (d["weight_bytes_per_step"] + d["kv_bytes_per_step"])
                             / bandwidth,
                             "weights_datasheet_h100": 1e6 * d["weight_bytes_per_step"] / H100_HBM_BYTES_PER_S}
            report["decode_gpu"].append(d)
    report["resize"] = resize_costs(device)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = time.perf_counter() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
