"""Peak memory of the sample and evaluate stages against the number of images, extrapolated to real scale.

Run by hand in a pipeline workspace after `dvc repro` (it needs models/, data/ and params.yaml). For each
image count the two stages run as they do under DVC (`python stages/launch.py sample|evaluate`, one process)
in a scratch copy of the workspace with `sample.num_images` set and only the base model and one GRPO run
sampled; `/usr/bin/time`-style peak RSS comes from the children's rusage. A line fitted to peak RSS against
pixel values (images x H x W x 3) gives the bytes each pixel value costs; the extrapolation multiplies it by
50,000 images at 384 px, the LlamaGen protocol's size, plus the intercept.

    python benchmarks/bench_memory.py --counts 10000 20000 40000   # -> reports/bench_memory.json / .md

At the embedded default's 16 px the images are small next to the ~0.9 GB a stage process holds anyway, so
the counts must be large for the slope to rise above that noise; a fit whose slope is not positive, or
whose data span less than 50 MB, is reported as not measurable instead of extrapolated.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10000, 20000, 40000])
    parser.add_argument("--out", default="reports/bench_memory")
    args = parser.parse_args()
    root = Path.cwd()
    params = yaml.safe_load((root / "params.yaml").read_text())
    variant = next(iter(params["grpo_runs"]["variants"]))
    params["grpo_runs"].update(variants={variant: params["grpo_runs"]["variants"][variant]}, seeds=[0])
    params["distributed"]["nproc_per_node"] = 1
    px = params["data"]["image_size"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for name in ("stages", "data", "models"):
            os.symlink(root / name, work / name)
        for n in args.counts:
            params["sample"].update(num_images=n, batch_size=min(250, n), save_png=0)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
            row = {"images": n, "pixel_values": n * px * px * 3}
            for stage in ("sample", "evaluate"):
                row[f"{stage}_peak_mb"] = peak_rss_mb([sys.executable, "stages/launch.py", stage], work, env)
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / "samples", ignore_errors=True)
    x = np.array([r["pixel_values"] for r in rows], float)
    fits, extrapolated = {}, {}
    target_values = TARGET_IMAGES * TARGET_PX * TARGET_PX * 3
    for stage in ("sample", "evaluate"):
        y = np.array([r[f"{stage}_peak_mb"] for r in rows]) * 2**20
        slope, intercept = np.polyfit(x, y, 1)
        measurable = bool(slope > 0 and np.ptp(y) > 50 * 2**20)
        fits[stage] = {"bytes_per_pixel_value": float(slope), "intercept_mb": float(intercept) / 2**20,
                       "measurable": measurable}
        extrapolated[stage] = (intercept + slope * target_values) / 2**30 if measurable else None
    report = {"rows": rows, "fit": fits, "extrapolated_gb": extrapolated,
              "target": {"images": TARGET_IMAGES, "px": TARGET_PX, "budget_gb": BUDGET_GB},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "image_px": px, "configurations": ["base_cfg", "base_nocfg", f"grpo_{variant}_s0_nocfg"]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Peak memory of sample and evaluate", "",
             f"Environment: {report['environment']}. One process per stage, peak RSS of the stage's processes.", "",
             "| images | sample peak MB | evaluate peak MB |", "|---|---|---|"]
    lines += [f"| {r['images']} | {r['sample_peak_mb']:.0f} | {r['evaluate_peak_mb']:.0f} |" for r in rows]
    lines += ["", "| stage | bytes per pixel value (fit) | intercept MB | extrapolated to 50,000 images at 384 px | "
              f"under {BUDGET_GB:.0f} GB |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {fits[s]['bytes_per_pixel_value']:.1f} | {fits[s]['intercept_mb']:.0f} | "
              + (f"{extrapolated[s]:.1f} GB | {'yes' if extrapolated[s] < BUDGET_GB else 'no'} |"
                 if extrapolated[s] is not None else "not measurable at these counts | – |") for s in fits]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
