"""`dvc plots show` draws one plot per metric from the report's long-format files, every GRPO run a line, with the
template in .dvc/plots; the files hold only the runs the report was given."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {"reward", "fid_ema", "entropy", "kl"}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def write_curve(folder: Path, run: str, loo_fid: bool, steps: int = 3, offset: float = 0.0) -> Path:
    """A GRPO run's curve as stages/grpo.py writes it (reports/grpo/<run>.csv): fid/ema only for LOO-FID runs."""
    keys = ["reward/composite_mean", "policy/kl", "entropy/normalised"] + (["fid/ema"] if loo_fid else [])
    lines = [",".join(["step", *keys])]
    lines += [",".join([str(step), *(str(offset + step + i / 10) for i in range(len(keys)))]) for step in range(steps)]
    path = folder / f"{run}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def dvc(repo: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC repository with the project's `plots` (dvc.yaml), its templates and one sample grid."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, capture_output=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    (repo / "reports" / "grids").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(repo / "reports" / "grids" / "base_cfg.png")
    return repo


def runs_by_plot(shown: dict, rev: str | None = None) -> dict[str, set[str]]:
    """The runs in each metric's plot (of revision `rev`, if given); every plot is one vega plot."""
    found = {}
    for name, entries in shown["data"].items():
        if name.startswith("reports/plots/"):
            assert len(entries) <= 1, name
            values = entries[0]["content"]["data"]["values"] if entries else []
            found[name] = {v["run"] for v in values if rev is None or v["rev"] == rev}
    return found


def test_one_plot_per_metric_and_a_line_per_run(report, repo, tmp_path):
    curves = [write_curve(tmp_path / "grpo", "instance_s0", loo_fid=False),
              write_curve(tmp_path / "grpo", "loofid_s0", loo_fid=True)]
    report.write_plot_data(curves, repo / "reports" / "plots")
    assert sorted(p.name for p in (repo / "reports" / "plots").iterdir()) == sorted(f"{p}.csv" for p in PLOTS)
    assert rows(repo / "reports" / "plots" / "reward.csv")[:2] == [["step", "run", "reward/composite_mean"],
                                                                    ["0", "instance_s0", "0.0"]]

    shown = dvc(repo, "plots", "show", "--json")
    assert not shown.get("errors"), shown.get("errors")
    both = {"instance_s0", "loofid_s0"}
    assert runs_by_plot(shown) == {"reports/plots/reward.csv": both, "reports/plots/entropy.csv": both,
                                   "reports/plots/kl.csv": both, "reports/plots/fid_ema.csv": {"loofid_s0"}}
    assert [entry["type"] for entry in shown["data"]["reports/grids/base_cfg.png"]] == ["image"]
    titles = {next(iter(p)): next(iter(p.values()))["title"] for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())
              ["plots"] if isinstance(p, dict)}
    for name, [entry] in ((n, e) for n, e in shown["data"].items() if n.startswith("reports/plots/")):
        content = entry["content"]
        assert entry["type"] == "vega" and content["title"]["text"] == titles[name]
        assert content["encoding"]["color"]["field"] == "run"  # the template's: a line per run, not per file
        assert content["encoding"]["strokeDash"]["field"] == "rev"
        assert len(content["data"]["values"]) == 3 * len(runs_by_plot(shown)[name])  # one row per run and step
        assert "<DVC_METRIC" not in json.dumps(content)  # every anchor filled


def test_a_run_dropped_from_the_matrix_leaves_no_rows(report, tmp_path):
    folder = tmp_path / "reports" / "plots"
    (folder / "reward").mkdir(parents=True)  # the earlier layout, one folder per metric: removed too
    (folder / "reward" / "instance_s0.csv").write_text("step,reward/composite_mean\n0,1.0\n")
    grpo = tmp_path / "grpo"
    report.write_plot_data([write_curve(grpo, "instance_s0", False), write_curve(grpo, "loofid_s0", True)], folder)
    assert {r[1] for r in rows(folder / "kl.csv")[1:]} == {"instance_s0", "loofid_s0"}

    report.write_plot_data([write_curve(grpo, "loofid_s0", True)], folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p}.csv" for p in PLOTS)
    for plot in PLOTS:
        assert {r[1] for r in rows(folder / f"{plot}.csv")[1:]} == {"loofid_s0"}, plot

    report.write_plot_data([], folder)  # no runs at all: every file holds its header alone
    assert {p.name: rows(p) for p in folder.iterdir()} == {
        f"{plot}.csv": [["step", "run", key]] for plot, key in report.PLOT_METRICS.items()}


def test_plots_diff_across_revisions_and_a_metric_no_run_logs(report, repo, tmp_path):
    folder = repo / "reports" / "plots"
    report.write_plot_data([write_curve(tmp_path / "a", "loofid_s0", True)], folder)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "loofid")
    # an instance-only matrix: fid_ema.csv holds its header alone, which DVC shows without an error
    report.write_plot_data([write_curve(tmp_path / "b", "instance_s0", False, offset=1.0)], folder)
    assert rows(folder / "fid_ema.csv") == [["step", "run", "fid/ema"]]
    shown = dvc(repo, "plots", "show", "--json")
    assert not shown.get("errors"), shown.get("errors")
    assert runs_by_plot(shown)["reports/plots/fid_ema.csv"] == set()

    diff = dvc(repo, "plots", "diff", "HEAD", "--json")
    assert not diff.get("errors"), diff.get("errors")
    [reward] = diff["data"]["reports/plots/reward.csv"]
    assert set(reward["revisions"]) == {"HEAD", "workspace"}
    assert runs_by_plot(diff, "HEAD")["reports/plots/reward.csv"] == {"loofid_s0"}
    assert runs_by_plot(diff, "workspace")["reports/plots/reward.csv"] == {"instance_s0"}
    assert runs_by_plot(diff, "workspace")["reports/plots/fid_ema.csv"] == set()
    assert runs_by_plot(diff, "HEAD")["reports/plots/fid_ema.csv"] == {"loofid_s0"}
