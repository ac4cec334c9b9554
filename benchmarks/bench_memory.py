"""Peak memory of the sample and evaluate stages against the number of images and their size, extrapolated
to real scale.

Run by hand in a pipeline workspace after `dvc repro` (it needs models/, data/ and params.yaml):

    python benchmarks/bench_memory.py   # -> reports/bench_memory.json / .md

The two stages run as they do under DVC (`python stages/launch.py sample|evaluate`, one process) in scratch
workspaces, with `sample.num_images` set and the base model and one GRPO run sampled; peak RSS comes from
the children's rusage. Two image sizes are measured, so that what grows with the number of images can be
told apart from what grows with their pixels:

- the pipeline's own size (16 px embedded), with its trained models;
- a larger size (default 32 px) with the same model classes trained for a few steps at that size in a
  scratch chain (prepare, prompts, pretrain, judge, ref_stats; the GRPO run is the base network). What
  they draw does not matter here, only how much memory drawing and scoring takes.

For each measurement and size a line is fitted to peak RSS against the image count N: its slope is the bytes
kept per image, its intercept what the process holds whatever N (code, models, one batch in flight). The slope
is then taken as linear in P, the pixel values per image (H x W x 3), through the two sizes:

    slope(P) = b + c * P

so c is the bytes kept per pixel value of every image: a stage that holds its images has c of a few bytes
(12.6 and 35.5 before sample sets were streamed), a streaming one c ~ 0 and a slope b of per-image records.

The evaluate stage has two phases whose peaks do not add: streaming the images into features (grows with P
through the batch in flight, should not grow with N) and the metrics on the features (grows with N through
the k-NN distance blocks, 1024 rows x N in float64, not with P). Its peak is the larger of the two, so a
line through its peaks at two sizes mixes them; the bench therefore also measures the streaming phase alone
(`evaluate_stream`: `stages/evaluate.py: stream_features` over the same sample sets) and takes c from it,
and b from the whole stage at the pipeline's size. The extrapolation to 50,000 images of 384 px, the
LlamaGen protocol's size, adds the phases rather than taking the larger, which overestimates:

    intercept at the pipeline's size + one batch in flight at 384 px + (b + c * P) * 50,000 + features

with c clamped at >= 0 (noise never lowers the estimate); the batch in flight is counted at BATCH_BYTES per
pixel value (decoded float32, its uint8 copy and up to three uint8 copies while shards are cut into batches).
"features" is evaluate's feature working set at real scale's Inception width, which the embedded 64-d
features do not show: per generated image its 2048 features as float32 and float64 (precision / recall
compute in float64) and 1008 class probabilities, and per reference image (50,000, an upper bound: ADM's
ImageNet batch holds 10,000) its features as float32 and float64. The intercepts at the two sizes are
reported, not extrapolated: they hold models of different sizes, not only images.

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

TARGET_IMAGES, TARGET_PX, BUDGET_GB = 50_000, 384, 8.0
INCEPTION_DIM, INCEPTION_CLASSES, REFERENCE_IMAGES = 2048, 1008, 50_000
BATCH_BYTES = 8  # bytes per pixel value of the batch in flight (float32 + uint8 + up to three uint8 copies)
BATCH = {"sample": 250, "evaluate": 256}  # images per batch: sample.batch_size here, evaluate.batch_size
STAGES = ("sample", "evaluate")
MEASURED = ("sample", "evaluate_stream", "evaluate")
# the evaluate stage's first phase alone: every sample set streamed into features, no metrics
STREAM = ("import sys; sys.path.insert(0, 'stages'); import common, evaluate; from argrpo import samples; "
          "p = common.params(); x = common.extractor(p, 'eval'); "
          "[evaluate.stream_features(f, x, p.evaluate.batch_size, {}) for f in samples.completed('samples')]")


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
    """The workspace's params with one GRPO run, one process, no PNGs; at `px`, a few-step chain."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    variant = next(iter(params["grpo_runs"]["variants"]))
    params["grpo_runs"].update(variants={variant: params["grpo_runs"]["variants"][variant]}, seeds=[0])
    params["distributed"]["nproc_per_node"] = 1
    params["sample"]["save_png"] = 0
    if px is not None:
        params["data"]["image_size"] = params["model"]["image_size"] = px
        params["pretrain"]["vq"]["steps"] = params["pretrain"]["gpt"]["steps"] = 2
        params["judge"]["epochs"] = 1
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
    rows = []
    for n in [counts[0], *counts]:  # the first run, not recorded, creates the tracking store and warms caches
        params["sample"].update(num_images=n, batch_size=min(250, n))
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        row = {"px": px, "images": n, "pixel_values_per_image": px * px * 3}
        row["sample_peak_mb"] = peak_rss_mb([sys.executable, "stages/launch.py", "sample"], work, env)
        row["evaluate_stream_peak_mb"] = peak_rss_mb([sys.executable, "-c", STREAM], work, env)
        row["evaluate_peak_mb"] = peak_rss_mb([sys.executable, "stages/launch.py", "evaluate"], work, env)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work / "samples", ignore_errors=True)
        rows.append(row)
    return rows[1:]


def lines(rows: list[dict], key: str) -> dict[int, dict]:
    """Per image size P: the line fitted to the peak RSS of `key` against the image count."""
    out = {}
    for P in sorted({r["pixel_values_per_image"] for r in rows}):
        at = [r for r in rows if r["pixel_values_per_image"] == P]
        n = np.array([r["images"] for r in at], float)
        y = np.array([r[f"{key}_peak_mb"] for r in at]) * 2**20
        slope, intercept = np.polyfit(n, y, 1)
        residual = y - (intercept + slope * n)
        out[P] = {"bytes_per_image": float(slope), "intercept_mb": float(intercept) / 2**20,
                  "max_residual_mb": float(np.abs(residual).max()) / 2**20}
    return out


def fit(rows: list[dict], stage: str) -> dict:
    """The model of the module docstring for one stage, and its value at the target."""
    whole = lines(rows, stage)
    (p0, l0), (p1, l1) = sorted((lines(rows, "evaluate_stream") if stage == "evaluate" else whole).items())
    c = (l1["bytes_per_image"] - l0["bytes_per_image"]) / (p1 - p0)  # p0: the pipeline's own size
    own = whole[p0]
    b = own["bytes_per_image"] - max(c, 0.0) * p0
    target_p = TARGET_PX * TARGET_PX * 3
    batch = BATCH_BYTES * BATCH[stage] * target_p
    per_image = INCEPTION_DIM * (4 + 8) + INCEPTION_CLASSES * 4  # float32 + float64 features, float32 probs
    features = (TARGET_IMAGES * per_image + REFERENCE_IMAGES * INCEPTION_DIM * (4 + 8)) if stage == "evaluate" else 0.0
    kept = (max(b, 0.0) + max(c, 0.0) * target_p) * TARGET_IMAGES
    total = own["intercept_mb"] * 2**20 + batch + kept + features
    return {"c_from": "evaluate_stream" if stage == "evaluate" else stage,
            "bytes_per_pixel_value_per_image": c, "bytes_per_image": b,
            "batch_in_flight_gb": batch / 2**30, "kept_per_image_gb": kept / 2**30,
            "features_gb": features / 2**30,
            "extrapolated_gb": total / 2**30, "under_budget": bool(total / 2**30 < BUDGET_GB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10000, 20000, 40000],
                        help="image counts at the pipeline's own size")
    parser.add_argument("--large-px", type=int, default=32, help="the second image size (a multiple of 16)")
    parser.add_argument("--large-counts", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--out", default="reports/bench_memory")
    parser.add_argument("--from-json", help="refit the rows of an earlier report instead of measuring")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        rows = []
        root = Path.cwd()
        with tempfile.TemporaryDirectory() as scratch:
            for px, counts in ((None, args.counts), (args.large_px, args.large_counts)):
                work = Path(scratch) / f"px{px or 'own'}"
                env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
                params = prepare_workspace(root, work, px, env)
                rows += measure(work, params, counts, env)
    fits = {stage: fit(rows, stage) for stage in STAGES}
    report = {"rows": rows, "fit": fits, "lines": {k: lines(rows, k) for k in MEASURED},
              "target": {"images": TARGET_IMAGES, "px": TARGET_PX, "budget_gb": BUDGET_GB},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "batch": BATCH, "processes": 1}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = ["# Peak memory of sample and evaluate", "",
            f"Environment: {report['environment']}. One process per stage, peak RSS of the stage's processes; "
            "three configurations sampled and evaluated per row (base with and without CFG, one GRPO run). "
            "`evaluate stream`: the evaluate stage's first phase alone (features of every set, no metrics).", "",
            "| px | images | sample peak MB | evaluate stream peak MB | evaluate peak MB |", "|---|---|---|---|---|"]
    text += [f"| {r['px']} | {r['images']} | {r['sample_peak_mb']:.0f} | {r['evaluate_stream_peak_mb']:.0f} | "
             f"{r['evaluate_peak_mb']:.0f} |" for r in rows]
    text += ["", "| measured | px | bytes per image (slope) | intercept MB | largest residual MB |",
             "|---|---|---|---|---|"]
    for key in MEASURED:
        for P, line in lines(rows, key).items():
            text.append(f"| {key.replace('_', ' ')} | {round((P / 3) ** 0.5)} | {line['bytes_per_image']:.0f} | "
                        f"{line['intercept_mb']:.0f} | {line['max_residual_mb']:.1f} |")
    text += ["", "| stage | c: bytes kept per pixel value of every image (from) | b: bytes per image | kept at "
             "50,000 x 384 px | batch in flight at 384 px | features at Inception width | extrapolated | under "
             f"{BUDGET_GB:.0f} GB |", "|---|---|---|---|---|---|---|---|"]
    text += [f"| {s} | {f['bytes_per_pixel_value_per_image']:.4f} ({f['c_from'].replace('_', ' ')}) | "
             f"{f['bytes_per_image']:.0f} | {f['kept_per_image_gb']:.2f} GB | {f['batch_in_flight_gb']:.2f} GB | "
             f"{f['features_gb']:.2f} GB | {f['extrapolated_gb']:.2f} GB | "
             f"{'yes' if f['under_budget'] else 'no'} |" for s, f in fits.items()]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
