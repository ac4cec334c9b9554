"""Stage report: reports/results.md (the table and what it shows), a sample grid per configuration,
the GRPO curves, a FID-against-recall plot and reports/timings.json (seconds per stage)."""

import csv
import json
import shutil
import time
from pathlib import Path

from common import condition_set, params, run_stage, stage, write_json

from argrpo import samples
from argrpo.report import environment, fmt, image_grid, plot_curves, plot_fid_recall, prompt_grid, results_table

REPORTS = Path("reports")
GRID_COLUMNS = 8  # images per row of the sample grids


def check(ok: bool, text: str) -> str:
    return f"- [{'x' if ok else ' '}] {text}"


def findings(m: dict, judge: dict, floor: dict) -> list[str]:
    """Plain statements computed from the measured numbers; an unmet target reads as unmet."""
    out = []
    base_cfg, base_nocfg = m.get("base_cfg"), m.get("base_nocfg")
    if judge:
        acc = judge.get("eval_net_holdout_accuracy", float("nan"))
        out.append(check(acc >= 0.95, f"the evaluation network classifies {acc:.1%} of its held-out real images "
                                      f"(target >= 95%)"))
    if base_cfg and base_nocfg:
        # Guidance buys class fidelity and FID; precision is reported beside it but not required to rise:
        # a miniature's off-class digits are still digits, so precision can stay level (docs/method.md).
        out.append(check(base_cfg["class_accuracy"] > base_nocfg["class_accuracy"]
                         and base_cfg["fid"] < base_nocfg["fid"],
                         f"guidance matters for the base model: class accuracy {fmt(base_cfg['class_accuracy'])} "
                         f"with CFG vs {fmt(base_nocfg['class_accuracy'])} without, FID {fmt(base_cfg['fid'])} "
                         f"vs {fmt(base_nocfg['fid'])} (precision {fmt(base_cfg['precision'])} vs "
                         f"{fmt(base_nocfg['precision'])})"))
        if floor:
            out.append(check(base_nocfg["fid"] > 2 * floor["fid"],
                             f"the base model without CFG does not already match the data: FID "
                             f"{fmt(base_nocfg['fid'])} against {fmt(floor['fid'])} for {floor['images']} held-out "
                             f"real images scored the same way"))
    loofid, inst = m.get("grpo_loofid_nocfg"), m.get("grpo_instance_nocfg")
    if loofid and base_cfg and base_nocfg:
        out.append(check(loofid["fid"] < min(base_cfg["fid"], base_nocfg["fid"]),
                         f"GRPO + LOO-FID (no CFG) FID {fmt(loofid['fid'])} is below both base rows "
                         f"({fmt(base_cfg['fid'])}, {fmt(base_nocfg['fid'])})"))
        out.append(check(loofid["precision"] >= base_cfg["precision"]
                         and loofid["class_accuracy"] >= base_cfg["class_accuracy"],
                         f"its precision {fmt(loofid['precision'])} and class accuracy "
                         f"{fmt(loofid['class_accuracy'])} are at or above the base model with CFG "
                         f"({fmt(base_cfg['precision'])}, {fmt(base_cfg['class_accuracy'])})"))
        out.append(check(loofid["forward_passes_per_image"] * 2 <= base_cfg["forward_passes_per_image"],
                         f"at half the forward passes ({fmt(loofid['forward_passes_per_image'])} vs "
                         f"{fmt(base_cfg['forward_passes_per_image'])} per image)"))
    if loofid and inst:
        out.append(check(loofid["recall"] > inst["recall"],
                         f"LOO-FID keeps recall above the instance-only run ({fmt(loofid['recall'])} vs "
                         f"{fmt(inst['recall'])})"))
    if inst and base_nocfg and base_cfg:
        out.append(check(inst["recall"] < min(base_nocfg["recall"], base_cfg["recall"]),
                         f"the instance-only run collapses: recall {fmt(inst['recall'])} below the base model's "
                         f"({fmt(base_nocfg['recall'])} without CFG, {fmt(base_cfg['recall'])} with)"))
    return out


# `dvc plots`: one plot per metric (dvc.yaml `plots`), each a long-format CSV in which every GRPO run that logs
# the metric is a line (the `run` column; the template .dvc/plots/by_run.json colours by it)
PLOT_METRICS = {"reward": "reward/composite_mean", "fid_ema": "fid/ema", "entropy": "entropy/normalised",
                "kl": "policy/kl"}


def write_plot_data(curves: list[Path], folder: Path) -> None:
    """reports/plots/<plot>.csv with the columns step, run and the metric, one row per run and step, from the
    runs' curves (reports/grpo/<run>.csv). The folder is rewritten from these runs only, so a run dropped from
    the matrix leaves no rows; a run without the metric (no LOO-FID: no fid/ema) has no rows in that plot. Every
    plot gets its file: one no run logs holds the header alone, which `dvc plots show` passes over without an error
    (a missing file would be one)."""
    if folder.exists():
        shutil.rmtree(folder)
    tables = {plot: [f"step,run,{key}"] for plot, key in PLOT_METRICS.items()}
    for curve in curves:
        with curve.open() as f:
            rows = list(csv.DictReader(f))
        for plot, key in PLOT_METRICS.items():
            values = [(r["step"], r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
            tables[plot].extend(f"{step},{curve.stem},{value}" for step, value in values)
    folder.mkdir(parents=True)
    for plot, lines in tables.items():
        (folder / f"{plot}.csv").write_text("\n".join(lines) + "\n")


def generator_line(p, conditions: int) -> str:
    m, d = p.model, p.data
    if m.family == "var":
        scales = ", ".join(str(n) for n in m.msvq().patch_nums)
        return (f"Generator: VAR preset `{m.gpt_preset}` over the multi-scale VQVAE `{m.vq_preset}` (scales {scales}), "
                f"{m.image_size} px, {m.num_classes} classes (data: `{d.kind}`).")
    if m.text_conditional:
        return (f"Generator: LlamaGen text-to-image GPT preset `{m.gpt_preset}` ({m.cls_token_num} caption positions "
                f"of {m.caption_dim}-d text features, encoder `{p.prompts.encoder}`), VQ preset `{m.vq_preset}`, "
                f"{m.image_size} px (data: `{d.kind}`), {conditions} evaluation prompts (`{p.prompts.eval}`).")
    return (f"Generator: GPT preset `{m.gpt_preset}`, VQ preset `{m.vq_preset}`, {m.image_size} px, "
            f"{m.num_classes} classes (data: `{d.kind}`).")


def main() -> None:
    started = time.perf_counter()
    p = params()
    with stage("report") as run:
        metrics = json.loads((REPORTS / "metrics.json").read_text())
        seeds = json.loads((REPORTS / "metrics_seeds.json").read_text())
        judge_file = REPORTS / "judge.json"
        judge = json.loads(judge_file.read_text()) if judge_file.exists() else {}
        # only what the current params define: runs dropped from the matrix leave files behind, never rows
        runs = [f"{v}_s{seed}" for v in p.grpo_runs.variants for seed in p.grpo_runs.seeds]
        configurations = {"base_cfg", "base_nocfg", *(f"grpo_{r}_nocfg" for r in runs)}
        stages = {"prepare", "prompts", "pretrain", "judge", "ref_stats", "sample", "evaluate",
                  *(f"grpo@{v}-{seed}" for v in p.grpo_runs.variants for seed in p.grpo_runs.seeds)}
        grids = REPORTS / "grids"
        if grids.exists():
            shutil.rmtree(grids)
        grids.mkdir()
        evaluation = condition_set("eval")
        plain_classes = evaluation.features is None and len(evaluation) == int(evaluation.classes.max()) + 1
        for folder in (f for f in samples.completed("samples") if f.name in configurations):
            # conditions cycle through the set's ids, so its first 8 images per id are the first 8 x ids images
            z = samples.head(folder, GRID_COLUMNS * len(evaluation))
            # one row per class; prompts and (class, style) pairs: one row per condition, labelled with its prompt
            grid = (image_grid(z["images"], z["labels"], per_class=GRID_COLUMNS) if plain_classes
                    else prompt_grid(z["images"], z["conditions"], evaluation.prompts, per_row=GRID_COLUMNS))
            grid.save(REPORTS / "grids" / f"{folder.name}.png")
        curves = [REPORTS / "grpo" / f"{r}.csv" for r in runs if (REPORTS / "grpo" / f"{r}.csv").exists()]
        if curves:
            plot_curves(curves, REPORTS / "grpo_curves.png")
        write_plot_data(curves, REPORTS / "plots")
        plot_fid_recall({k: v for k, v in seeds["per_run"].items() if k in configurations},
                        REPORTS / "fid_vs_recall.png")
        recorded = (json.loads(f.read_text()) for f in sorted((REPORTS / "timings").glob("*.json")))
        timings = {t["stage"]: round(t["seconds"], 1) for t in recorded if t["stage"] in stages}
        timings["report"] = round(time.perf_counter() - started, 1)  # up to here: the report writes this file
        timings["total"] = round(sum(timings.values()), 1)
        write_json(REPORTS / "timings.json", timings)
        m, d, s = p.model, p.data, p.sample
        grid_rows = "one row per class" if plain_classes else "one row per condition, labelled with its prompt"
        lines = [
            "# Results",
            "",
            f"{generator_line(p, len(evaluation))} {s.num_images} "
            f"{'prompt' if m.text_conditional else 'class'}-balanced samples per "
            f"configuration; base CFG scale {s.cfg_scale}; temperature {s.temperature}, top-k {s.top_k}, "
            f"top-p {s.top_p}.",
            "",
            "Metrics compare against `data/ref_stats.npz`: features of every real image of the dataset "
            f"({d.kind}) from the evaluation network `{p.ref_stats.features}` (the judge stage's "
            "independent network on the embedded default). FID uses full covariances, IS 10 splits, "
            f"precision / recall k = {p.evaluate.k}. Rewards never read the evaluation network: the "
            "LOO-FID reward uses the reward classifier's features, so the FID reported is not the FID optimised.",
            "",
            results_table(metrics, seeds.get("std_over_seeds", {}),
                          "Prompt acc. ↑" if m.text_conditional else "Class acc. ↑"),
            "",
            "## What the numbers show",
            "",
            *findings(metrics, judge, seeds.get("real_holdout", {})),
            "",
            f"Stage seconds (`reports/timings.json`): total {timings['total']} s.",
            "",
            "## Environment",
            "",
            *(f"- {key}: {value}" for key, value in environment().items()),
            f"- processes per GRPO / sample / evaluate stage: {p.distributed.nproc_per_node}",
            "",
            "![GRPO curves](grpo_curves.png)",
            "",
            "![FID against recall](fid_vs_recall.png)",
            "",
            f"Sample grids ({grid_rows}): " + ", ".join(
                f"[{n.stem}](grids/{n.name})" for n in sorted((REPORTS / "grids").glob("*.png"))),
            "",
        ]
        (REPORTS / "results.md").write_text("\n".join(lines))
        for png in sorted((REPORTS / "grids").glob("*.png")) + sorted(REPORTS.glob("*.png")):
            run.log_artifact(png, "report")
        run.log_artifact(REPORTS / "results.md", "report")


if __name__ == "__main__":
    run_stage(main)
