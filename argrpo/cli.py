"""`argrpo`: the command line for work outside DVC (runs table, comparisons, file checks)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="GRPO fine-tuning of autoregressive image generators: tracking and checks.")


@app.command()
def runs(limit: int = typer.Option(50, help="newest runs to show"),
         stage: str = typer.Option("", help="only runs of this stage (e.g. evaluate, grpo)")) -> None:
    """Print the tracked runs with their headline metrics (from MLflow)."""
    import pandas as pd

    from argrpo.tracking import runs_table, tracking_uri

    df = runs_table(max_results=limit)
    if stage and not df.empty:
        df = df[df["stage"] == stage]
    if df.empty:
        typer.echo(f"no runs in {tracking_uri()}")
        raise typer.Exit(0)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 40):
        typer.echo(df.drop(columns=["run_id"]).to_string(index=False))


@app.command()
def compare(out: Path = typer.Option(Path("reports/compare.png"), help="FID-against-recall plot to write"),
            limit: int = typer.Option(200, help="newest evaluate runs to compare")) -> None:
    """Compare the evaluate runs of experiments: a table of every configuration and a FID / recall plot."""
    import pandas as pd

    from argrpo.report import plot_fid_recall
    from argrpo.tracking import runs_table

    df = runs_table(max_results=limit)
    df = df[df["stage"] == "evaluate"] if not df.empty else df
    if df.empty:
        typer.echo("no evaluate runs tracked yet: run the pipeline first")
        raise typer.Exit(1)
    rows, points = [], {}
    for _, r in df.iterrows():
        name = r.get("dvc_exp_name") or r["run_id"][:8]
        configs = sorted({c.rsplit(".", 1)[0] for c in df.columns if c.endswith(".fid") and pd.notna(r[c])})
        for config in configs:
            row = {"run": name, "configuration": config}
            row.update({m: r.get(f"{config}.{m}") for m in ("fid", "is", "precision", "recall", "class_accuracy")})
            rows.append(row)
            points[f"{name}/{config}"] = row
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
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
                            text_encoder=p.prompts.encoder if model.text_conditional else "", scores=p.evaluate.scores)
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
