"""Sampler throughput: the KV cache against prefix recomputation, one batched call against G small calls,
and the cost of classifier-free guidance. Run by hand, not a test:

    python benchmarks/bench_sampling.py                 # CPU, "small" preset, 256 tokens, 2 threads
    python benchmarks/bench_sampling.py --device cuda   # adds GPT-B / 256 tokens / batch 64 / bf16 under "gpu"

from the repository root with argrpo importable (`pip install -e .`, or `PYTHONPATH=.`). On a CPU shared with other
jobs, spinning OpenMP workers make 2-thread timings swing tenfold between repeats; `OMP_WAIT_POLICY=PASSIVE` in the
environment steadies them (the JSON records the load average and the OpenMP settings).

Writes the raw timings and medians to reports/bench_sampling.json and a table to reports/bench_sampling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from argrpo.gpt import GPT, gpt_config
from argrpo.sampling import SamplingConfig, sample_tokens, sample_tokens_nocache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# targets on the 2-core CPU: speed-ups are "at least", the CFG cost ratio "at most"
OMP_SETTINGS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TARGETS = {"cached_vs_nocache": (">=", 5.0), "batched_vs_sequential": (">=", 2.0), "cfg_cost_ratio": ("<=", 2.1)}


def build_model(preset: str, tokens: int, vocab: int, num_classes: int, device: str, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    model = GPT(gpt_config(preset, block_size=tokens, vocab_size=vocab, num_classes=num_classes))
    # a zero head samples uniformly; give it weights so the filtered distributions look like a trained model's
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(run: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of one call of `run`, fenced by device syncs."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def paired_timings(run_a: Callable[[], object], run_b: Callable[[], object], repeats: int,
                   device: str) -> tuple[list[float], list[float]]:
    """Alternate A and B `repeats` times: on a shared machine each pair sees about the same load."""
    pairs = [(seconds(run_a, device), seconds(run_b, device)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def summary(seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {"median_s": median, "tokens_per_s": tokens / median, "timings_s": seconds, "tokens_per_call": tokens}


def sampler(model: GPT, batch: int, cfg: SamplingConfig, cached: bool = True, seed: int = 0) -> Callable[[], object]:
    device = model.output.weight.device
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    labels = labels.to(device)
    fn = sample_tokens if cached else sample_tokens_nocache

    def run():
        return fn(model, labels, cfg, torch.Generator(device).manual_seed(seed))

    return run


def ratio(name: str, num: list[float], den: list[float], parts: dict, note: str) -> dict:
    """The median over repeats of num / den, each repeat's pair timed back to back."""
    value = statistics.median(a / b for a, b in zip(num, den, strict=True))
    op, target = TARGETS[name]
    met = value >= target if op == ">=" else value <= target
    return {"median": value, "timings_ratio": [a / b for a, b in zip(num, den, strict=True)],
            "target": f"{op} {target}", "met": met, "note": note, **parts}


def compare_samplers(args: argparse.Namespace) -> dict:
    dtype, T, B, G = DTYPES[args.dtype], args.tokens, args.batch, args.groups
    model = build_model(args.preset, T, args.vocab, args.num_classes, args.device, dtype)
    plain, guided = SamplingConfig(), SamplingConfig(cfg_scale=2.0)
    sampler(model, B, plain)()  # warm-up: allocator, kernels, thread pool

    cached, nocache = paired_timings(sampler(model, B, plain), sampler(model, B, plain, cached=False),
                                     args.repeats, args.device)
    small_calls = [sampler(model, B, plain, seed=g) for g in range(G)]
    batched, sequential = paired_timings(sampler(model, B * G, plain), lambda: [run() for run in small_calls],
                                         args.repeats, args.device)
    cfg_on, cfg_off = paired_timings(sampler(model, B, guided), sampler(model, B, plain), args.repeats, args.device)

    return {
        "cached_vs_nocache": ratio(
            "cached_vs_nocache", nocache, cached,
            {"cached": summary(cached, B * T), "nocache": summary(nocache, B * T)},
            f"speed-up of sample_tokens over sample_tokens_nocache, batch {B}"),
        "batched_vs_sequential": ratio(
            "batched_vs_sequential", sequential, batched,
            {"one_call": summary(batched, B * G * T), "sequential": summary(sequential, B * G * T)},
            f"speed-up of one call with batch {B * G} over {G} calls with batch {B}"),
        "cfg_cost_ratio": ratio(
            "cfg_cost_ratio", cfg_on, cfg_off,
            {"cfg_on": summary(cfg_on, B * T), "cfg_off": summary(cfg_off, B * T)},
            f"time with cfg_scale 2 over time with cfg_scale 1, batch {B}"),
    }


def gpu_benchmark(repeats: int) -> dict:
    """GPT-B at 256 px (256 tokens, vocab 16384, 1000 classes), batch 64, bfloat16: throughput and peak memory."""
    model = build_model("GPT-B", 256, 16384, 1000, "cuda", torch.bfloat16)
    out = {"preset": "GPT-B", "tokens": 256, "batch": 64, "dtype": "bfloat16",
           "device_name": torch.cuda.get_device_name()}
    for name, cfg in (("cfg_1.0", SamplingConfig()), ("cfg_2.0", SamplingConfig(cfg_scale=2.0))):
        run = sampler(model, 64, cfg)
        run()  # warm-up
        torch.cuda.reset_peak_memory_stats()
        out[name] = summary([seconds(run, "cuda") for _ in range(repeats)], 64 * 256)
        out[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
            "env": {k: os.environ[k] for k in OMP_SETTINGS if k in os.environ}}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Sampler benchmark",
        "",
        f"`{s['preset']}` GPT, {s['tokens']} image tokens, vocab {s['vocab']}, batch {s['batch']}, "
        f"G = {s['groups']}, {s['dtype']} on {s['device']} ({report['machine']['threads']} threads, "
        f"{report['machine']['cpu']}, {report['machine']['env'] or 'default OpenMP settings'}); "
        f"medians over {s['repeats']} repeats, A and B timed back to back in each. "
        f"Load average (1, 5, 15 min) before / after: {report['load_before']} / {report['load_after']}; "
        f"total {report['total_s']:.0f} s.",
        "",
        "| comparison | A: median s (tokens/s) | B: median s (tokens/s) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, (a, b) in {"cached_vs_nocache": ("cached", "nocache"),
                         "batched_vs_sequential": ("one_call", "sequential"),
                         "cfg_cost_ratio": ("cfg_on", "cfg_off")}.items():
        r = report[name]
        cells = [f"{k}: {r[k]['median_s']:.3f} ({r[k]['tokens_per_s']:,.0f})" for k in (a, b)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {r['median']:.2f} | {r['target']} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    lines += ["", *(f"- {name}: {report[name]['note']}" for name in TARGETS)]
    if "gpu" in report:
        g = report["gpu"]
        lines += ["", f"## GPU: {g['preset']}, {g['tokens']} tokens, batch {g['batch']}, {g['dtype']}, "
                      f"{g['device_name']}", "",
                  "| setting | median s | tokens/s | peak memory GiB |", "|---|---|---|---|"]
        for name in ("cfg_1.0", "cfg_2.0"):
            r = g[name]
            lines.append(f"| {name} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens per sample (a square number)")
    parser.add_argument("--batch", type=int, default=4, help="batch B of the cached / nocache / CFG runs")
    parser.add_argument("--groups", type=int, default=8, help="G: G calls of batch B against one of batch B*G")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_sampling.json"))
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3 for a median, got {args.repeats}")
    torch.set_num_threads(args.threads)

    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine(), "load_before": load_before}
    report.update(compare_samplers(args))
    if args.device.startswith("cuda"):
        report["gpu"] = gpu_benchmark(args.repeats)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = time.perf_counter() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
