"""End to end: the real `dvc repro` on a shrunken copy of the pipeline, tracked in a temporary MLflow store."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from argrpo import samples

ROOT = Path(__file__).resolve().parents[1]
COPY = ["argrpo", "stages", "configs", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore"]

SHRINK = {
    "data": {"max_per_class": 24},
    "pretrain": {"vq": {"steps": 20, "batch_size": 32}, "gpt": {"steps": 20, "batch_size": 32}},
    "judge": {"epochs": 1},
    "grpo": {"steps": 3, "batch_classes": 2, "group_size": 4, "checkpoint_every": 2},
    "grpo_runs": {"seeds": [0]},
    "sample": {"num_images": 60, "batch_size": 30, "save_png": 4},
}


def deep_update(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def pipeline_repo(tmp_path: Path, params_file: str, shrink: dict, variants: dict | None = None) -> tuple[Path, dict]:
    """A git + DVC repository holding the pipeline with `params_file` shrunk by `shrink` (and only `variants` as
    the GRPO runs, when given), and its environment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, repo / name)
    params = deep_update(yaml.safe_load((ROOT / params_file).read_text()), shrink)
    if variants is not None:
        params["grpo_runs"]["variants"] = variants
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q"], repo, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # dvc.yaml's plot templates
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pipeline"], repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
    repo, env = pipeline_repo(tmp_path, "params.yaml", SHRINK)

    first = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    for stage in ["prepare", "prompts", "pretrain", "judge", "ref_stats", "grpo@instance-0", "grpo@loofid-0",
                  "sample", "png", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert len(list((repo / "samples_png/base_cfg").glob("*.png"))) == 4  # sample.save_png

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == {"base_cfg", "base_nocfg", "grpo_instance_nocfg", "grpo_loofid_nocfg"}
    for name, row in metrics.items():
        for key in ("fid", "is", "precision", "recall", "class_accuracy"):
            assert math.isfinite(row[key]), (name, key, row[key])
    assert metrics["base_cfg"]["forward_passes_per_image"] == 2 * metrics["base_nocfg"]["forward_passes_per_image"]
    for produced in ["reports/results.md", "reports/grpo_curves.png", "reports/fid_vs_recall.png",
                     "reports/timings.json", "reports/grids/base_cfg.png", "models/grpo/loofid_s0/policy.pt"]:
        assert (repo / produced).exists(), produced
    timings = json.loads((repo / "reports/timings.json").read_text())
    assert {"prepare", "pretrain", "grpo@loofid-0", "report"} <= set(timings)
    # dvc plots: one plot per metric, a line per run that logs it, and the sample grids as images
    plots = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo, env).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {name for name in plots["data"] if name.startswith("reports/plots/")} == {
        f"reports/plots/{plot}.csv" for plot in ("reward", "entropy", "kl", "fid_ema")
    }
    for plot, runs in (("reward", {"instance_s0", "loofid_s0"}), ("fid_ema", {"loofid_s0"})):
        [rendered] = plots["data"][f"reports/plots/{plot}.csv"]
        assert {row["run"] for row in rendered["content"]["data"]["values"]} == runs, plot
    assert "reports/grids/base_cfg.png" in plots["data"]

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["argrpo"])
    stages = set(runs["tags.stage"].dropna())
    assert {"prepare", "pretrain", "judge", "ref_stats", "grpo", "sample", "evaluate", "report"} <= stages
    nested = runs["tags.argrpo.child"].notna() if "tags.argrpo.child" in runs else runs["tags.stage"].isna()
    children = runs[runs["tags.stage"].notna() & ~nested]
    assert children["tags.mlflow.parentRunId"].nunique() == 1  # one parent run groups this repro
    [evaluate_id] = children[children["tags.stage"] == "evaluate"]["run_id"]
    per_run = runs[runs["tags.mlflow.parentRunId"] == evaluate_id]  # one child run per evaluated sample set
    assert set(per_run["tags.configuration"]) == {"base_cfg", "base_nocfg", "grpo_instance_s0_nocfg",
                                                 "grpo_loofid_s0_nocfg"}
    assert per_run["metrics.fid"].notna().all() and set(per_run["status"]) == {"FINISHED"}
    grpo_runs = children[children["tags.stage"] == "grpo"]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run_id in grpo_runs["run_id"]:  # rollout images at the checkpoint steps, for the UI's step slider
        assert any("rollout" in a.path for a in client.list_artifacts(run_id, "images")), run_id
    assert grpo_runs["metrics.entropy/coef"].notna().all()  # metric keys keep their '/' for MLflow's grouping

    second = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    unread_params_change_nothing(repo, env)

    killed_dvc_repro_resumes_grpo(repo, env)

    # sweeps: the README's two queued experiments, two at a time, run in copies through the DVC queue and report
    # to one new store (created by whichever stage comes first); one switches the model family by params alone
    # (VAR, with VAR's base CFG), the same dvc.yaml running it
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'sweep.db'}"}
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    # the most common sweep writes a float in exponent form (`lr: 2e-05`), which YAML reads as a string
    for name, settings in (("var-face", ["model.family=var", "sample.cfg_scale=2.5"]), ("lower-lr", ["grpo.lr=2e-5"])):
        sets = [arg for setting in settings for arg in ("-S", setting)]
        run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, *sets], repo, env)
    run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], repo, env)
    for _ in range(240):  # the worker runs in the background: poll its status, bounded
        status = run([sys.executable, "-m", "dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status and status.count("Success") == 2, status
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], repo, env).stdout
    assert "var-face" in shown and "lower-lr" in shown
    runs = mlflow.search_runs(experiment_names=["argrpo"])
    names = set(runs["tags.dvc_exp_name"].dropna())
    assert {"var-face", "lower-lr"} <= names, names
    queued = runs[runs["tags.dvc_exp_name"].isin(["var-face", "lower-lr"]) & (runs["tags.stage"] == "grpo")]
    assert len(queued) == 4  # two GRPO variants per experiment
    var = runs[(runs["tags.dvc_exp_name"] == "var-face") & runs["tags.stage"].isin(["prompts", "pretrain"])]
    assert set(var["tags.stage"]) == {"prompts", "pretrain"}  # the family switch retrains the base model
    assert set(var["params.model.family"]) == {"var"}
    lower = queued[queued["tags.dvc_exp_name"] == "lower-lr"]
    assert set(lower["metrics.optim/lr"]) == {2e-5}, lower["metrics.optim/lr"]  # the run trained at that lr


def changed_stages(repo: Path, env: dict) -> set[str]:
    return set(json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo, env).stdout or "{}"))


def unread_params_change_nothing(repo: Path, env: dict) -> None:
    """Stages depend on the keys they read: a key no stage reads reruns nothing, `sample.save_png` (read by the
    png stage alone) never re-samples, and a variant's key reruns that variant's GRPO run, not the others."""
    original = (repo / "params.yaml").read_text()
    assert changed_stages(repo, env) == set()
    for key, value, expected in (("weights.ref_images", "elsewhere/imagenet_val", set()),
                                 ("weights.t5_dir", "elsewhere/flan-t5-xl", {"prompts"}),
                                 ("sample.save_png", 2, {"png"}),
                                 # the other variant's run stays; sample and report read the run names (and
                                 # follow the retrained policy anyway)
                                 ("grpo_runs.variants.loofid.fid_advantage_weight", 0.5,
                                  {"grpo@loofid-0", "sample", "report"})):
        params = yaml.safe_load(original)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert changed_stages(repo, env) == expected, key
    (repo / "params.yaml").write_text(original)
    assert changed_stages(repo, env) == set()


def kill_grpo_after_a_checkpoint(repo: Path, env: dict, rows: int) -> str:
    """Start `dvc repro grpo@instance-0`, SIGTERM the whole process group (dvc, torchrun, the workers) once
    its curves hold `rows` checkpointed steps; the MLflow run id the attempt logged to."""
    run_dir = repo / "models/grpo/instance_s0"
    (run_dir / "curves.csv").unlink(missing_ok=True)  # the last attempt's; this one starts afresh (params changed)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "grpo@instance-0"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for _ in range(1200):
            curves = run_dir / "curves.csv"
            if curves.exists() and len(curves.read_text().splitlines()) > rows:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return json.loads((run_dir / "resume.json").read_text())["run_id"]


def killed_dvc_repro_resumes_grpo(repo: Path, env: dict) -> None:
    """A killed `dvc repro` resumes GRPO at its checkpoint in the same MLflow run, which ends FINISHED with the
    whole curve; a params change between the kill and the rerun starts afresh in a new run."""
    import mlflow

    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["grpo"].update(steps=24, checkpoint_every=3)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    killed = kill_grpo_after_a_checkpoint(repo, env, rows=6)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    # KILLED by the stage's signal handler, or, when the SIGTERM found the workers inside a collective and
    # torchrun's SIGKILL followed, marked KILLED by the next stage that opens a run (`mark_dead_runs`)
    assert client.get_run(killed).info.status in ("KILLED", "RUNNING")
    rerun = run([sys.executable, "-m", "dvc", "repro", "grpo@instance-0"], repo, env)
    assert "resuming from models/grpo/instance_s0/state.pt" in rerun.stdout + rerun.stderr
    resumed = client.get_run(killed)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["argrpo.attempts"] == "2"
    steps = {m.step for m in client.get_metric_history(killed, "reward/composite_mean")}
    assert steps == set(range(24)), sorted(steps)  # one run holds the whole curve
    curves = (repo / "models/grpo/instance_s0/curves.csv").read_text().splitlines()
    assert len(curves) == 25

    for factor in (2, 3):  # killed with one lr, rerun with another
        params["grpo"]["lr"] = factor * float(yaml.safe_load(original)["grpo"]["lr"])
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if factor == 2:
            killed = kill_grpo_after_a_checkpoint(repo, env, rows=3)
    rerun = run([sys.executable, "-m", "dvc", "repro", "grpo@instance-0"], repo, env)
    assert "starting the run afresh" in rerun.stderr, rerun.stderr[-3000:]
    fresh = json.loads((repo / "models/grpo/instance_s0/resume.json").read_text())["run_id"]
    assert fresh != killed and client.get_run(fresh).info.status == "FINISHED"
    running = mlflow.search_runs(experiment_names=["argrpo"], filter_string="attributes.status = 'RUNNING'")
    assert running.empty, running[["tags.mlflow.runName"]]
    (repo / "params.yaml").write_text(original)
    # what a run dropped from the matrix leaves behind is never reported (seeds [0] here; a seed 7 ran once)
    shutil.copy(repo / "reports/grpo/instance_s0.csv", repo / "reports/grpo/instance_s7.csv")
    (repo / "reports/timings/grpo_instance-7.json").write_text(json.dumps({"stage": "grpo@instance-7",
                                                                            "seconds": 999.0}))
    shutil.copy(repo / "reports/grids/base_cfg.png", repo / "reports/grids/grpo_instance_s7_nocfg.png")
    run([sys.executable, "-m", "dvc", "repro"], repo, env)
    timings = json.loads((repo / "reports/timings.json").read_text())
    assert "grpo@instance-7" not in timings and timings["total"] < 999, timings
    assert "_s7" not in (repo / "reports/results.md").read_text()
    assert not (repo / "reports/grids/grpo_instance_s7_nocfg.png").exists()


# the text-to-image face, shrunk further: one GRPO variant (with LOO-FID), fewer samples
FACE_SHRINK = deep_update(json.loads(json.dumps(SHRINK)), {
    "pretrain": {"vq": {"steps": 10}, "gpt": {"steps": 10}},
    "grpo": {"steps": 2},
    "sample": {"num_images": 40, "batch_size": 20},
})


@pytest.mark.slow
def test_dvc_repro_runs_the_text_to_image_face(tmp_path: Path) -> None:
    """The same dvc.yaml runs LlamaGen T2I (prompts with cached features), chosen by params alone (the VAR face
    runs as a queued experiment in the test above)."""
    repo, env = pipeline_repo(tmp_path, "configs/embedded_t2i.yaml", FACE_SHRINK,
                              variants={"loofid": {"fid_advantage_weight": 2.0}})
    done = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    for stage in ["prepare", "prompts", "pretrain", "judge", "ref_stats", "grpo@loofid-0", "sample", "evaluate",
                  "report"]:
        assert f"Running stage '{stage}'" in done.stdout, stage
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == {"base_cfg", "base_nocfg", "grpo_loofid_nocfg"}
    for name, row in metrics.items():
        for key in ("fid", "precision", "recall", "class_accuracy"):
            assert math.isfinite(row[key]), (name, key, row[key])
    assert metrics["base_cfg"]["forward_passes_per_image"] == 2 * metrics["base_nocfg"]["forward_passes_per_image"]
    results = (repo / "reports/results.md").read_text()
    conditions, labels = (samples.column(repo / "samples/base_nocfg", key) for key in ("conditions", "labels"))
    # 160 evaluation prompts, each labelled with its digit; 8 caption rows + 15 decode steps per image
    assert conditions.max() == 39 and (labels == np.tile(np.repeat(np.arange(10), 2), 8)[conditions]).all()
    assert metrics["base_nocfg"]["forward_passes_per_image"] == 8 + 16 - 1
    assert "Prompt acc." in results and "evaluation prompts" in results
    assert (repo / "reports/grids/grpo_loofid_s0_nocfg.png").exists()
    assert (repo / "models/grpo/loofid_s0/policy.pt").exists()
