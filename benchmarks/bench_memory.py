"""Peak memory of the sample and evaluate stages against the number of images, at the pipeline's own image
size and at real scale's 384 px, extrapolated to 50,000 images.

Run by hand in a pipeline workspace after `dvc repro` (it needs models/, data/ and params.yaml):

    python benchmarks/bench_memory.py   # -> reports/bench_memory.json / .md

The two stages run as they do under DVC (`python stages/launch.py sample|evaluate`, one process) in scratch
workspaces, with `sample.num_images` set and the base model and one GRPO run sampled (three configurations);
peak RSS comes from the children's rusage. Two image sizes are measured:

- the pipeline's own size (16 px embedded) with its trained models, at large counts (default 10k / 20k /
  40k), where what grows with the number of images alone shows: per-image records, and evaluate's k-NN
  distance blocks (1024 rows x N in float64);
- LlamaGen's 384 px, with the same model classes in a scratch chain (prepare, prompts, pretrain for two
  steps, judge, ref_stats on 20 digits per class): the `tiny` GPT over 24 x 24 tokens of the `tiny-f16`
  tokenizer (VQ-16's downsampling). Every image is 442 kB as uint8, so a stage that kept a fraction of its
  images would grow by hundreds of MB between the counts (default 300 / 600 / 1200). Batches are small
  here (sample 25, evaluate 16), because this CPU holds the decoder's and the feature network's
  activations, which a GPU holds at real scale. What the models draw does not matter, only how much
  memory drawing and scoring takes.

For each stage and size a line is fitted to peak RSS against the image count N. The extrapolation to 50,000
images of 384 px takes the 384 px line's intercept (code, models, one bench batch in flight with its CPU
activations) and the larger of the two sizes' slopes (clamped at >= 0; noise never lowers the estimate),
and adds what real scale holds beyond the bench:

    intercept(384 px) + max(slope(384 px), slope(own size), 0) * 50,000
        + (real batch - bench batch) * P * bytes per pixel value in flight + features

where P = 384 * 384 * 3 and the bytes per pixel value of a batch in flight on the host are counted from the
code: sample 10 (the decoded float32 batch, one float copy and the uint8 image in `to_uint8`, a copy while
saving), evaluate 8 (a uint8 batch, up to three uint8 copies while shards are cut into batches, its float32
tensor). "features" is evaluate's feature working set at real scale's Inception width, which the embedded
64-d features do not show: per generated image its 2048 features as float32 and float64 (precision / recall
compute in float64) and 1008 class probabilities, and per reference image (50,000, an upper bound: ADM's
ImageNet batch holds 10,000) its features as float32 and float64. The models of real scale (weights of a
GPT-XL or larger) are not in the estimate: it is about what grows with the images.

A last measurement runs the sample stage's per-batch work (sampling, decoding, uint8 conversion, one shard
per batch) at 384 px in the bench's own process, without the stage around it, and records RSS every five
batches (`rss_trace`): a flat trace says the work itself keeps nothing per image.

`--from-json reports/bench_memory.json` refits and rewrites the report from measured rows without running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from argrpo.data import to_uint8
from argrpo.generator import LlamaGenPolicy, generate_chunks
from argrpo.gpt import GPT, gpt_config
from argrpo.params import merge
from argrpo.samples import write_shard
from argrpo.sampling import SamplingConfig
from argrpo.vq import VQModel, vq_config

TARGET_IMAGES, TARGET_PX, BUDGET_GB = 50_000, 384, 8.0
INCEPTION_DIM, INCEPTION_CLASSES, REFERENCE_IMAGES = 2048, 1008, 50_000
STAGES = ("sample", "evaluate")
REAL_BATCH = {"sample": 250, "evaluate": 256}  # sample.batch_size and evaluate.batch_size of the shipped params
BENCH_BATCH = {"sample": 25, "evaluate": 16}  # at 384 px on this CPU
BYTES_IN_FLIGHT = {"sample": 10, "evaluate": 8}  # host bytes per pixel value of a batch in flight (docstring)
# the scratch chain at 384 px: a tokenizer with VQ-16's downsampling, short training, small batches
LARGE = {"model": {"gpt_preset": "tiny", "vq_preset": "tiny-f16"}, "data": {"max_per_class": 20},
         "pretrain": {"vq": {"steps": 2, "batch_size": 4}, "gpt": {"steps": 2, "batch_size": 4}},
         "judge": {"epochs": 1, "batch_size": 8}, "ref_stats": {"batch_size": BENCH_BATCH["evaluate"]},
         "evaluate": {"batch_size": BENCH_BATCH["evaluate"]}}


def peak_rss_mb(cmd: list[str], cwd: Path, env: dict) -> float:
    """Run `cmd` to completion; the largest peak RSS (MB) among the processes it started."""
    pid = os.fork()
    if pid == 0:  # a fresh child: its RUSAGE_CHILDREN covers only this command's process tree
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-3000:])
            os._exit(1)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        Path(cwd / "peak_kb").write_text(str(peak_kb))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return int((cwd / "peak_kb").read_text()) / 1024


def scratch_params(root: Path, px: int | None) -> dict:
    """The workspace's params with one GRPO run, one process, no PNGs; at `px`, the scratch chain's."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    variant = next(iter(params["grpo_runs"]["variants"]))
    params["grpo_runs"].update(variants={variant: params["grpo_runs"]["variants"][variant]}, seeds=[0])
    params["distributed"]["nproc_per_node"] = 1
    params["sample"]["save_png"] = 0
    if px is not None:
        params = merge(params, LARGE)
        params["data"]["image_size"] = params["model"]["image_size"] = px
    return params


def prepare_workspace(root: Path, work: Path, px: int | None, env: dict) -> dict:
    """A scratch workspace: the pipeline's data and models linked (px None), or a short chain run at `px`."""
    params = scratch_params(root, px)
    work.mkdir(parents=True)
    os.symlink(root / "stages", work / "stages")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if px is None:
        for name in ("data", "models"):
            os.symlink(root / name, work / name)
        return params
    for stage in ("prepare", "prompts", "pretrain", "judge", "ref_stats"):
        done = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{stage} at {px} px failed:\n{done.stderr[-3000:]}")
    run = work / "models" / "grpo" / f"{next(iter(params['grpo_runs']['variants']))}_s0"
    run.mkdir(parents=True)
    os.symlink(work / "models" / "base" / "gpt.pt", run / "policy.pt")  # memory does not depend on the weights
    return params


def measure(work: Path, params: dict, counts: list[int], env: dict) -> list[dict]:
    px = params["model"]["image_size"]
    batch = BENCH_BATCH["sample"] if px == TARGET_PX else REAL_BATCH["sample"]
    rows = []
    for n in [2 * batch, *counts]:  # the first run, not recorded, creates the tracking store and warms caches
        params["sample"].update(num_images=n, batch_size=min(batch, n))
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        row = {"px": px, "images": n, "pixel_values_per_image": px * px * 3}
        for stage in STAGES:
            row[f"{stage}_peak_mb"] = peak_rss_mb([sys.executable, "stages/launch.py", stage], work, env)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work / "samples", ignore_errors=True)
        rows.append(row)
    return rows[1:]


def rss_trace(images: int, every: int = 5) -> list[list[int]]:
    """The sample stage's per-batch work at 384 px in this process, without the stage around it: sampling
    with the `tiny` GPT over `tiny-f16` tokens (random weights), decoding, `to_uint8` and one shard written per
    batch of BENCH_BATCH["sample"]; [batch, RSS MB] every `every` batches. Flat if the work keeps nothing."""
    def rss_mb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024

    torch.manual_seed(0)
    vq = vq_config("tiny-f16")
    grid = TARGET_PX // vq.downsample
    gpt = GPT(gpt_config("tiny", vocab_size=vq.codebook_size, num_classes=10, block_size=grid * grid))
    policy = LlamaGenPolicy(gpt, VQModel(vq))
    conditions = torch.arange(images) % 10
    trace = []
    with tempfile.TemporaryDirectory() as out:
        chunks = generate_chunks(policy, conditions, SamplingConfig(), BENCH_BATCH["sample"], 0, desc="trace")
        for i, (index, decoded) in enumerate(chunks):
            labels = conditions[index].numpy()
            write_shard(out, int(index[0]), to_uint8(decoded), labels, labels)
            if i % every == 0:
                trace.append([i, rss_mb()])
    return trace + [[i, rss_mb()]]


def lines(rows: list[dict], stage: str) -> dict[int, dict]:
    """Per image size (px): the line fitted to the peak RSS of `stage` against the image count."""
    out = {}
    for px in sorted({r["px"] for r in rows}):
        at = [r for r in rows if r["px"] == px]
        n = np.array([r["images"] for r in at], float)
        y = np.array([r[f"{stage}_peak_mb"] for r in at]) * 2**20
        slope, intercept = np.polyfit(n, y, 1)
        residual = y - (intercept + slope * n)
        out[px] = {"bytes_per_image": float(slope), "intercept_mb": float(intercept) / 2**20,
                   "max_residual_mb": float(np.abs(residual).max()) / 2**20}
    return out


def fit(rows: list[dict], stage: str) -> dict:
    """The extrapolation of the module docstring for one stage."""
    by_px = lines(rows, stage)
    if TARGET_PX not in by_px:
        raise ValueError(f"no rows at {TARGET_PX} px to extrapolate from")
    slope = max(0.0, *(line["bytes_per_image"] for line in by_px.values()))
    target_p = TARGET_PX * TARGET_PX * 3
    batch = (REAL_BATCH[stage] - BENCH_BATCH[stage]) * target_p * BYTES_IN_FLIGHT[stage]
    per_image = INCEPTION_DIM * (4 + 8) + INCEPTION_CLASSES * 4  # float32 + float64 features, float32 probs
    features = (TARGET_IMAGES * per_image + REFERENCE_IMAGES * INCEPTION_DIM * (4 + 8)) if stage == "evaluate" else 0.0
    measured = by_px[TARGET_PX]["intercept_mb"] * 2**20
    total = measured + slope * TARGET_IMAGES + batch + features
    return {"intercept_gb": measured / 2**30, "bytes_per_image": slope,
            "growth_gb": slope * TARGET_IMAGES / 2**30, "larger_batch_gb": batch / 2**30,
            "features_gb": features / 2**30, "extrapolated_gb": total / 2**30,
            "under_budget": bool(total / 2**30 < BUDGET_GB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10000, 20000, 40000],
                        help="image counts at the pipeline's own size")
    parser.add_argument("--large-counts", type=int, nargs="+", default=[300, 600, 1200],
                        help=f"image counts at {TARGET_PX} px")
    parser.add_argument("--out", default="reports/bench_memory")
    parser.add_argument("--trace-images", type=int, default=1500, help="images of the in-process RSS trace")
    parser.add_argument("--from-json", help="refit the rows of an earlier report instead of measuring")
    parser.add_argument("--trace", action="store_true", help="with --from-json: rerun the RSS trace")
    args = parser.parse_args()
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        rows, trace = earlier["rows"], earlier.get("trace")
        if args.trace or trace is None:
            trace = rss_trace(args.trace_images)
    else:
        rows = []
        root = Path.cwd()
        with tempfile.TemporaryDirectory() as scratch:
            for px, counts in ((None, args.counts), (TARGET_PX, args.large_counts)):
                work = Path(scratch) / f"px{px or 'own'}"
                env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
                params = prepare_workspace(root, work, px, env)
                rows += measure(work, params, counts, env)
        trace = rss_trace(args.trace_images)
    fits = {stage: fit(rows, stage) for stage in STAGES}
    report = {"rows": rows, "trace": trace, "fit": fits, "lines": {stage: lines(rows, stage) for stage in STAGES},
              "target": {"images": TARGET_IMAGES, "px": TARGET_PX, "budget_gb": BUDGET_GB},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "bench_batch_at_384px": BENCH_BATCH, "real_batch": REAL_BATCH, "processes": 1}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = ["# Peak memory of sample and evaluate", "",
            f"Environment: {report['environment']}. One process per stage, peak RSS of the stage's processes; "
            "three configurations sampled and evaluated per row (base with and without CFG, one GRPO run). "
            f"384 px: the `tiny` GPT over the `tiny-f16` tokenizer's 24 x 24 tokens (benchmarks/bench_memory.py).", "",
            "| px | images | sample peak MB | evaluate peak MB |", "|---|---|---|---|"]
    text += [f"| {r['px']} | {r['images']} | {r['sample_peak_mb']:.0f} | {r['evaluate_peak_mb']:.0f} |" for r in rows]
    text += ["", "| stage | px | bytes per image (slope) | intercept MB | largest residual MB |",
             "|---|---|---|---|---|"]
    for stage in STAGES:
        for px, line in lines(rows, stage).items():
            text.append(f"| {stage} | {px} | {line['bytes_per_image']:.0f} | {line['intercept_mb']:.0f} | "
                        f"{line['max_residual_mb']:.1f} |")
    text += ["", f"| stage | measured at 384 px (intercept) | growth to 50,000 images (largest slope) | real batch "
             f"in flight beyond the bench's | features at Inception width | extrapolated | under {BUDGET_GB:.0f} GB |",
             "|---|---|---|---|---|---|---|"]
    text += [f"| {s} | {f['intercept_gb']:.2f} GB | {f['growth_gb']:.2f} GB ({f['bytes_per_image']:.0f} B/image) | "
             f"{f['larger_batch_gb']:.2f} GB | {f['features_gb']:.2f} GB | {f['extrapolated_gb']:.2f} GB | "
             f"{'yes' if f['under_budget'] else 'no'} |" for s, f in fits.items()]
    text += ["", f"In-process trace of the sample stage's per-batch work at {TARGET_PX} px (`rss_trace`), "
             f"batches of {BENCH_BATCH['sample']}: RSS MB " + ", ".join(f"{mb} (batch {i})" for i, mb in trace) + "."]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
