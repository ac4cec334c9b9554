"""`argrpo`: the command line for work outside DVC (runs table, comparisons, file checks)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="GRPO fine-tuning of autoregressive image generators: tracking and checks.")


# per stage, the metrics `argrpo runs` shows (last logged value) and their column headers
HEADLINES = {
    "prepare": [("data_images", "images"), ("data_classes", "classes")],
    "pretrain": [("vq_recon_mse", "vq_mse"), ("vq_codes_used", "vq_codes")],
    "judge": [("eval_net_holdout_accuracy", "eval_acc"), ("reward_classifier_holdout_accuracy", "reward_acc")],
    "ref_stats": [("ref_images", "ref_images")],
    "grpo": [("reward/composite_mean", "reward"), ("fid/ema", "fid/ema"), ("entropy/normalised", "entropy")],
}
LEGEND = {
    "grpo": "step: last step logged; reward: reward/composite_mean, entropy: entropy/normalised, at that step",
    "evaluate": "one row per evaluated configuration",
}
NAME_WIDTH = 30


def pipeline_stages() -> list[str]:
    """The stage names of the repository's dvc.yaml, in pipeline order (empty without one)."""
    import yaml

    from argrpo.tracking import repo_root

    path = repo_root() / "dvc.yaml"
    if not path.is_file():
        return []
    return list((yaml.safe_load(path.read_text()) or {}).get("stages") or {})


def cell(value) -> str:
    """A table cell: numbers to 4 significant digits, missing values as '-', long names shortened."""
    import pandas as pd

    if isinstance(value, pd.Timestamp):
        return "-" if pd.isna(value) else value.strftime("%m-%d %H:%M")
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= NAME_WIDTH else text[: NAME_WIDTH - 1] + "~"


def render(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table of `rows` with (key, header) `columns`, dropping columns with no value."""
    shown = [(k, h) for k, h in columns if any(cell(r.get(k)) not in ("", "-") for r in rows)]
    texts = [[cell(r.get(k)) for k, _ in shown] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in shown]
    widths = [max([len(h)] + [len(t[i]) for t in texts]) for i, (_, h) in enumerate(shown)]

    def line(values: list[str]) -> str:
        cells = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in cells).rstrip()

    return "\n".join([line([h for _, h in shown])] + [line(t) for t in texts])


RUN_COLUMNS = [("run", "run"), ("dvc_exp_name", "experiment"), ("status", "status"), ("start_time", "started")]


def stage_section(stage: str, table) -> str:
    """The `argrpo runs` table of one stage's runs: who, when, status and the stage's headline metrics."""
    from argrpo.tracking import evaluation_rows, last_step

    records = table.to_dict("records")
    if stage == "evaluate":
        rows, seen = [], set()
        by_run = {}
        for row in evaluation_rows(table):
            by_run.setdefault(row["run_id"], []).append(row)
        for record in records:
            for row in by_run.get(record["run_id"], [{**record, "configuration": "-"}]):
                first = row["run_id"] not in seen
                seen.add(row["run_id"])
                rows.append(row if first else {**row, **{k: "" for k, _ in RUN_COLUMNS}})
        columns = RUN_COLUMNS + [("configuration", "configuration"), ("fid", "fid"), ("is", "is"),
                                 ("precision", "precision"), ("recall", "recall"), ("class_accuracy", "class_acc")]
    else:
        rows = records
        columns = list(RUN_COLUMNS)
        if stage == "grpo":
            for row in rows:
                row["step"] = last_step(row["run_id"], "reward/composite_mean")
            columns.append(("step", "step"))
        columns += HEADLINES.get(stage, [])
    columns.append(("stage_seconds", "seconds"))
    title = f"{stage}: {len(records)} run{'s' if len(records) != 1 else ''}"
    legend = f"  ({LEGEND[stage]})" if stage in LEGEND else ""
    return f"{title}{legend}\n{render(rows, columns)}"


@app.command()
def runs(limit: int = typer.Option(50, help="newest runs to show (per stage with --stage)"),
         stage: str = typer.Option("", help="only runs of this stage (e.g. evaluate, grpo)")) -> None:
    """Print the tracked runs, one table per stage with its headline metrics (from MLflow)."""
    from argrpo.tracking import experiment_name, runs_table, tracked_stages, tracking_uri

    order = pipeline_stages()
    if stage and stage not in order and stage not in tracked_stages():
        valid = order + sorted(tracked_stages() - set(order))
        typer.echo(f"unknown stage {stage!r}; valid stages: {', '.join(valid) or '(none: no dvc.yaml here)'}",
                   err=True)
        raise typer.Exit(2)
    df = runs_table(stage or None, max_results=limit)
    if df.empty:
        typer.echo(f"no {stage + ' ' if stage else ''}runs in {tracking_uri()} (experiment {experiment_name()})")
        raise typer.Exit(0)
    present = list(dict.fromkeys(df["stage"]))
    sections = [s for s in order if s in present] + [s for s in present if s not in order]
    typer.echo("\n\n".join(stage_section(s, df[df["stage"] == s].dropna(axis=1, how="all")) for s in sections))


@app.command()
def compare(out: Path = typer.Option(Path("reports/compare.png"), help="FID-against-recall plot to write"),
            limit: int = typer.Option(200, help="newest evaluate runs to compare")) -> None:
    """Compare the evaluate runs of experiments: a table of every configuration and a FID / recall plot."""
    from argrpo.report import plot_fid_recall
    from argrpo.tracking import EVAL_METRICS, evaluation_rows, runs_table

    rows = evaluation_rows(runs_table("evaluate", max_results=limit))
    if not rows:
        typer.echo("no evaluate runs tracked yet: run the pipeline first")
        raise typer.Exit(1)
    points = {}
    for row in rows:
        row["run"] = row["dvc_exp_name"] or row["run_id"][:8]
        points[f"{row['run']}/{row['configuration']}"] = row
    typer.echo(render(rows, [("run", "run"), ("configuration", "configuration")] + [(m, m) for m in EVAL_METRICS]))
    plot_fid_recall(points, out)
    typer.echo(f"plot: {out}")


@app.command()
def doctor(params: Path = typer.Option(Path("params.yaml"), help="params file to check")) -> None:
    """Check every local file the configuration names: exists, loads safely, right architecture, sha256."""
    from argrpo.config import ConfigError, read_params
    from argrpo.params import parse_params
    from argrpo.weights import check_weights, model_shapes, needed_weights

    try:
        p = parse_params(read_params(params))
    except ConfigError as err:
        typer.echo(f"{params}: {err}", err=True)
        raise typer.Exit(2) from None
    model, weights = p.model, p.weights
    needed = needed_weights(model.source, p.instance_rewards(), p.ref_stats.features, weights.ref_stats,
                            text_encoder=p.prompts.encoder if model.text_conditional else "", scores=p.evaluate.scores,
                            reward_features=p.ref_stats.reward_features)
    typer.echo(f"model: {model.family} {model.gpt_preset} + {model.vq_preset} at {model.image_size}px, "
               f"source: {model.source}")
    if not needed:
        typer.echo("this configuration reads no external files (embedded default): nothing to check")
        return
    checks = check_weights(weights, needed, model_shapes(model.network(), model.tokenizer()), model.family)
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        typer.echo(f"[{mark}] {check.message}")
        if check.sha256:
            typer.echo(f"       sha256 {check.sha256}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
