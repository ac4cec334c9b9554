"""What the pipeline shows people: sample grids, the results table, curves and scatter plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

COLUMNS = [("fid", "FID ↓"), ("is", "IS ↑"), ("precision", "Precision ↑"), ("recall", "Recall ↑"),
           ("class_accuracy", "Class acc. ↑"), ("forward_passes_per_image", "Fwd passes / img"),
           ("seconds_per_image", "s / img")]
# shown when the evaluation computed them (evaluate.scores)
SCORE_COLUMNS = [("clip_score", "CLIP score ↑"), ("hpsv2_score", "HPSv2 ↑"), ("aesthetic_score", "Aesthetic ↑")]


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8, scale: int = 4) -> Image.Image:
    """uint8 [N, H, W, 3] -> one row per class with its first `per_class` images, upscaled for viewing."""
    classes = np.unique(labels)
    H, W = images.shape[1:3]
    grid = np.full((len(classes) * (H + 1) + 1, per_class * (W + 1) + 1, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            grid[1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + j * (W + 1) : 1 + j * (W + 1) + W] = images[i]
    im = Image.fromarray(grid)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def prompt_grid(images: np.ndarray, conditions: np.ndarray, prompts: Sequence[str], rows: int = 10,
                per_row: int = 8, scale: int = 4, text_width: int = 300) -> Image.Image:
    """uint8 [N, H, W, 3] -> one row per condition (up to `rows`, spread over the condition ids present) with
    its prompt written on the left and its first `per_row` images, upscaled for viewing."""
    from PIL import ImageDraw

    present = np.unique(conditions)
    chosen = present[np.linspace(0, len(present) - 1, min(rows, len(present))).round().astype(int)]
    H, W = images.shape[1] * scale, images.shape[2] * scale
    grid = Image.new("RGB", (text_width + per_row * (W + scale) + scale, len(chosen) * (H + scale) + scale), "white")
    draw = ImageDraw.Draw(grid)
    for r, c in enumerate(chosen):
        top = scale + r * (H + scale)
        draw.text((4, top + H // 2 - 6), shorten(prompts[int(c)], text_width // 6), fill="black")
        for j, i in enumerate(np.flatnonzero(conditions == c)[:per_row]):
            tile = Image.fromarray(images[i]).resize((W, H), Image.NEAREST)
            grid.paste(tile, (text_width + scale + j * (W + scale), top))
    return grid


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt(value: float, spread: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 4 if abs(value) < 0.1 else 3
    text = f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return text if spread is None else f"{text} ± {spread:.{digits}f}".rstrip("0").rstrip(".")


def results_table(metrics: Mapping[str, Mapping[str, float]], spread: Mapping[str, Mapping[str, float]],
                  accuracy: str = "Class acc. ↑") -> str:
    """Markdown table, one row per configuration; GRPO rows as mean ± std over seeds. `accuracy` titles the
    class accuracy column (text-to-image: prompt accuracy)."""
    columns = [(key, accuracy if key == "class_accuracy" else title) for key, title in COLUMNS]
    columns += [(key, title) for key, title in SCORE_COLUMNS if any(key in row for row in metrics.values())]
    head = "| configuration | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, row in metrics.items():
        s = spread.get(name, {})
        label = f"{name} ({s['seeds']} seeds)" if s else name
        cells = [fmt(row.get(key, math.nan), s.get(key)) for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(csv_files: Sequence[Path], out: Path,
                keys: Sequence[str] = ("reward/composite_mean", "fid/ema", "entropy/normalised", "entropy/coef",
                                       "policy/kl", "optim/grad_norm")) -> None:
    """GRPO training curves, one panel per metric, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {f.stem: pd.read_csv(f) for f in csv_files}
    keys = [k for k in keys if any(k in df.columns for df in frames.values())]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, df in frames.items():
            if key in df.columns:
                ax.plot(df["step"], df[key], label=name, lw=1.2, color=f"C{0 if 'instance' in name else 1}",
                        alpha=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_fid_recall(rows: Mapping[str, Mapping[str, float]], out: Path, title: str = "FID against recall") -> None:
    """Scatter of FID (lower is better) against recall, one labelled point per configuration or run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, row in rows.items():
        ax.scatter(row["recall"], row["fid"], s=30)
        ax.annotate(name, (row["recall"], row["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("recall ↑")
    ax.set_ylabel("FID ↓")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def environment() -> dict[str, str]:
    """What the numbers were measured on: library versions, the CPU, threads."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": cpu, "logical CPUs": str(os.cpu_count()),
            "CUDA": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "intra-op threads per stage process": os.environ.get("ARGRPO_THREADS", "1")}
