"""MLflow tracking (store, run grouping, names, tags, images, child runs, kills, resume, concurrent writers)
and the `argrpo` CLI (runs, compare, doctor)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from argrpo import tracking
from argrpo.cli import app


def test_store_points_back_to_the_original_repo_from_a_queued_experiment(tmp_path, monkeypatch):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert tracking.repo_root(copy) == tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking.tracking_uri() == "sqlite:////elsewhere/mlflow.db"


def test_stage_runs_share_a_parent_and_show_in_runs_table(tmp_path, store):
    with tracking.stage_run("prepare", {"data": {"image_size": 16}}) as run:
        run.log_metrics({"a/b": 1.0}, step=0)
    with tracking.stage_run("evaluate") as run:
        run.log_metrics({"base_cfg.fid": 3.5, "base_cfg.recall": 0.4})
    df = tracking.runs_table()
    children = df[df["stage"].notna()]
    assert set(children["stage"]) == {"prepare", "evaluate"}
    assert set(children["dvc_exp_name"]) == {"exp-one"}
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    raw = mlflow.search_runs(experiment_names=["argrpo"])
    parents = raw["tags.mlflow.parentRunId"].dropna().unique()
    assert len(parents) == 1 and parents[0] in set(raw["run_id"])
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 0 and "evaluate" in result.output and "prepare" in result.output
    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0, result.output
    assert "base_cfg" in result.output and (tmp_path / "cmp.png").exists()


def test_doctor_names_each_missing_file_and_its_param(tmp_path):
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/llamagen_b_256.yaml").read_text())
    params["weights"]["gpt_checkpoint"] = str(tmp_path / "nope" / "c2i_B_256.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["doctor", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    for param in ("gpt_checkpoint", "vq_checkpoint", "clip_weights", "hpsv2_weights", "inception", "ref_stats"):
        assert f"weights.{param}" in result.output
    assert "c2i_B_256.pt" in result.output and "Hugging Face" in result.output


def test_doctor_on_the_embedded_default_has_nothing_to_check():
    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(app, ["doctor", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0 and "nothing to check" in result.output


ROOT = Path(__file__).resolve().parents[1]


def use_store(tmp_path, monkeypatch, pipeline: str | None = "test-pipeline", exp: str | None = "exp-one",
              template: Path | None = None) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if template is not None:
        shutil.copy(template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in (("ARGRPO_PIPELINE_ID", pipeline), ("DVC_EXP_NAME", exp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("ARGRPO_EXPERIMENT", raising=False)
    return uri


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An MLflow database with its schema and no experiment of ours: MLflow takes seconds to create the
    schema (one migration after another), a copy takes none."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    client_of(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_store) -> str:
    """A store of its own for the test (pipeline `test-pipeline`, DVC experiment `exp-one`); its URI."""
    return use_store(tmp_path, monkeypatch, template=migrated_store)


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str, experiment: str = "argrpo") -> list:
    client = client_of(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def by_name(uri: str) -> dict:
    return {r.info.run_name: r for r in all_runs(uri)}


def test_metric_keys_keep_their_slash_and_step_is_the_step_not_a_metric(store):
    uri = store
    with tracking.stage_run("grpo", run_name="grpo_a_s0") as run:
        for step in range(3):
            run.log_metrics({"step": step, "reward/composite_mean": 0.5 + step, "fid/ema": 9.0 - step})
        run.log_metrics({"time/step": 1.25}, step=7)
    client = client_of(uri)
    metrics = client.get_run(run.run_id).data.metrics
    assert set(metrics) == {"reward/composite_mean", "fid/ema", "time/step"}
    history = client.get_metric_history(run.run_id, "reward/composite_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 1.5), (2, 2.5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "time/step")] == [7]


def test_runs_carry_mlflow_standard_source_tags(store):
    import getpass

    uri = store
    with tracking.stage_run("prepare") as run:
        pass
    tags = client_of(uri).get_run(run.run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"]
    assert tags["mlflow.source.git.commit"] == tracking.git_revision() and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["stage"] == "prepare" and tags["dvc_exp_name"] == "exp-one"


def test_experiment_name_follows_mlflow_then_argrpo_then_default(tmp_path, monkeypatch, store):
    uri = store
    assert tracking.experiment_name() == "argrpo"
    monkeypatch.setenv("ARGRPO_EXPERIMENT", "from-argrpo")
    assert tracking.experiment_name() == "from-argrpo"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-lr")
    with tracking.stage_run("prepare") as run:
        pass
    client = client_of(uri)
    exp = client.get_experiment_by_name("sweep-lr")
    assert exp is not None and client.get_run(run.run_id).info.experiment_id == exp.experiment_id
    assert client.get_experiment_by_name("from-argrpo") is None
    # artifacts land beside the database, not in the working directory
    assert exp.artifact_location == (tmp_path / "mlruns" / "sweep-lr").as_uri()


def test_run_names_are_unique_and_say_which_experiment(monkeypatch, store):
    uri = store
    for _ in range(3):
        with tracking.stage_run("grpo", run_name="grpo_a_s0"):
            pass
    names = [r.info.run_name for r in all_runs(uri) if r.data.tags.get("stage")]
    assert sorted(names) == ["grpo_a_s0-exp-one", "grpo_a_s0-exp-one-2", "grpo_a_s0-exp-one-3"]
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.stage_run("grpo", run_name="grpo_a_s0") as run:
        pass
    assert re.fullmatch(r"grpo_a_s0-\d{8}-\d{6}", run.name)  # outside an experiment: the start time


def test_log_image_keeps_one_image_per_step_for_the_slider(tmp_path, store):
    import torch

    uri = store
    with tracking.stage_run("grpo", run_name="grpo_a_s0") as run:
        for step in (0, 5):
            run.log_image(torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8), "samples/grid", step=step)
        run.log_image(np.zeros((6, 5, 3), np.uint8), "samples/single", step=1)
    client = client_of(uri)
    files = [f.path for f in client.list_artifacts(run.run_id, "images")]
    pngs = sorted(f for f in files if f.endswith(".png"))
    assert len(pngs) == 3 and sum("+step+5+" in f for f in pngs) == 1 and sum("samples~grid" in f for f in pngs) == 2
    assert client.get_run(run.run_id).data.tags["mlflow.loggedImages"] == "True"
    grid = next(f for f in pngs if "+step+0+" in f)
    local = client.download_artifacts(run.run_id, grid, str(tmp_path / "dl"))
    from PIL import Image

    assert Image.open(local).size == (2 * 9 + 1, 2 * 9 + 1)  # 4 images of 8 px tiled 2 x 2 with 1 px lines
    assert str(tmp_path / "mlruns") in client.get_run(run.run_id).info.artifact_uri


def test_child_runs_nest_and_a_failed_child_fails_its_run_and_the_pipeline(store):
    uri = store
    with tracking.stage_run("prepare"):
        pass
    with tracking.stage_run("evaluate") as run:
        for seed in (0, 1):
            with run.child(f"grpo_a_s{seed}_nocfg", tags={"seed": str(seed)}) as child:
                child.log_metrics({"fid": 3.0 + seed})
        with pytest.raises(RuntimeError), run.child("grpo_b_s0_nocfg"):
            raise RuntimeError("sampler crashed")
        # the stage carries on after the failed child, yet its run must not read FINISHED
    runs = by_name(uri)
    parent = runs["exp-one"]
    assert runs["grpo_a_s0_nocfg-exp-one"].info.status == "FINISHED"
    assert runs["grpo_a_s0_nocfg-exp-one"].data.tags["mlflow.parentRunId"] == run.run_id
    assert runs["grpo_a_s1_nocfg-exp-one"].data.metrics == {"fid": 4.0}
    assert runs["grpo_b_s0_nocfg-exp-one"].info.status == "FAILED"
    assert runs["evaluate-exp-one"].info.status == "FAILED"
    assert parent.info.status == "FAILED" and runs["prepare-exp-one"].info.status == "FINISHED"
    with tracking.stage_run("report"):  # a later stage that succeeds does not clear the pipeline's failure
        pass
    assert by_name(uri)["exp-one"].info.status == "FAILED"
    assert set(tracking.runs_table()["stage"]) == {"prepare", "evaluate", "report"}  # children kept out
    assert len(tracking.runs_table(include_children=True)) == 6


def test_pipeline_parent_runs_while_a_stage_runs_and_finishes_after(tmp_path, store):
    uri = store
    with tracking.stage_run("prepare"):
        assert by_name(uri)["exp-one"].info.status == "RUNNING"
    assert by_name(uri)["exp-one"].info.status == "FINISHED"


WORKER = """
import sys, time
from argrpo import tracking
marker, first, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resume = tracking.read_run_id(marker)
with tracking.stage_run("grpo", {"grpo": {"steps": 6}}, run_name="grpo_a_s0", resume_run_id=resume) as run:
    tracking.write_run_id(marker, run.run_id)
    for step in range(first, 6):
        run.log_metrics({"reward/composite_mean": step / 10, "step": step})
        if step == stop_at:
            print("ready", flush=True)
            time.sleep(120)
"""


def start_worker(tmp_path, first: int, stop_at: int) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run.json"), str(first), str(stop_at)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def test_sigterm_marks_the_run_killed_and_exits_non_zero(tmp_path, store):
    uri = store
    proc = start_worker(tmp_path, 0, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "SIGTERM" in proc.stderr.read()
    runs = by_name(uri)
    assert runs["grpo_a_s0-exp-one"].info.status == "KILLED"
    assert runs["exp-one"].info.status == "KILLED"  # the pipeline's parent shows the kill too


def test_a_sigkilled_run_is_found_dead_and_the_resumed_stage_continues_it(tmp_path, monkeypatch, store):
    uri = store
    proc = start_worker(tmp_path, 0, 2)  # logs steps 0, 1, 2, then is killed without a chance to clean up
    proc.kill()
    proc.wait(timeout=60)
    killed_id = tracking.read_run_id(tmp_path / "run.json")
    assert client_of(uri).get_run(killed_id).info.status == "RUNNING"
    monkeypatch.setenv("ARGRPO_PIPELINE_ID", "test-pipeline-rerun")  # the rerun is another DVC invocation
    with tracking.stage_run("grpo", {"grpo": {"steps": 6}}, run_name="grpo_a_s0",
                            resume_run_id=tracking.read_run_id(tmp_path / "run.json")) as run:
        assert run.run_id == killed_id and run.resumed and run.attempt == 2
        for step in range(3, 6):
            run.log_metrics({"reward/composite_mean": step / 10}, step=step)
    client = client_of(uri)
    resumed = client.get_run(killed_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["argrpo.attempts"] == "2"
    assert "found dead" in resumed.data.tags["argrpo.ended_by"]
    steps = sorted(m.step for m in client.get_metric_history(killed_id, "reward/composite_mean"))
    assert steps == [0, 1, 2, 3, 4, 5]  # one curve in one run
    runs = by_name(uri)
    assert len([r for r in runs.values() if r.data.tags.get("stage") == "grpo"]) == 1
    assert resumed.data.tags["mlflow.parentRunId"] == runs["exp-one-2"].info.run_id
    assert runs["exp-one"].info.status == "KILLED" and runs["exp-one-2"].info.status == "FINISHED"


def test_a_sigkilled_run_is_marked_killed_when_the_next_stage_starts(tmp_path, store):
    uri = store
    proc = start_worker(tmp_path, 0, 1)
    proc.kill()
    proc.wait(timeout=60)
    killed_id = tracking.read_run_id(tmp_path / "run.json")
    before = int(time.time() * 1000)
    with tracking.stage_run("sample"):
        pass
    killed = client_of(uri).get_run(killed_id)
    assert killed.info.status == "KILLED" and killed.info.end_time <= before  # ended at its last metric
    assert by_name(uri)["exp-one"].info.status == "KILLED"


def test_owner_state_judges_only_processes_this_machine_can_see():
    mine = tracking.owner_tags()
    assert tracking.owner_state(mine) == "alive"
    assert tracking.owner_state({**mine, "argrpo.pid_start": "1"}) == "gone"  # the pid now names another process
    assert tracking.owner_state({**mine, "argrpo.boot_id": "before-a-reboot"}) == "gone"
    assert tracking.owner_state({**mine, "argrpo.pid_namespace": "pid:[1]"}) == "unknown"  # another container
    assert tracking.owner_state({**mine, "argrpo.host": "elsewhere"}) == "unknown"
    assert tracking.owner_state({}) == "unknown"


def test_signals_end_the_run_killed_and_handlers_are_restored(store):
    uri = store
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit) as exit_info, tracking.stage_run("grpo", run_name="grpo_a_s0") as run:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises as soon as the signal is delivered
    assert exit_info.value.code == 143 and isinstance(exit_info.value, tracking.StageInterrupted)
    assert {s: signal.getsignal(s) for s in before} == before
    assert client_of(uri).get_run(run.run_id).info.status == "KILLED"
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("grpo", run_name="b", handle_signals=False) as run:
        raise KeyboardInterrupt
    assert client_of(uri).get_run(run.run_id).info.status == "KILLED"
    with pytest.raises(ValueError), tracking.stage_run("grpo", run_name="grpo_c_s0") as run:
        raise ValueError("bad config")
    assert client_of(uri).get_run(run.run_id).info.status == "FAILED"


def test_live_runs_are_left_running_and_a_live_run_cannot_be_resumed_twice(store):
    uri = store
    with tracking.stage_run("grpo", run_name="grpo_a_s0") as outer:
        with tracking.stage_run("sample"):
            pass
        assert client_of(uri).get_run(outer.run_id).info.status == "RUNNING"  # its process is alive
        with pytest.raises(RuntimeError, match="still RUNNING"), tracking.stage_run("grpo", resume_run_id=outer.run_id):
            pass


def test_resuming_an_unknown_run_opens_a_new_one_and_changed_params_are_recorded(store):
    uri = store
    with tracking.stage_run("grpo", {"grpo": {"steps": 4, "lr": 1e-5}}, run_name="g",
                            resume_run_id="0123456789abcdef0123456789abcdef") as first:
        pass
    assert not first.resumed
    with tracking.stage_run("grpo", {"grpo": {"steps": 8, "lr": 1e-5, "seed": 1}}, run_name="g",
                            resume_run_id=first.run_id) as again:
        pass
    run = client_of(uri).get_run(again.run_id)
    assert again.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"grpo.steps": "4", "grpo.lr": "1e-05", "grpo.seed": "1"}
    assert run.data.tags["argrpo.changed_params"] == "grpo.steps: 4 -> 8"


def test_run_id_file_is_ignored_for_another_store(tmp_path, monkeypatch, store):
    tracking.write_run_id(tmp_path / "m" / "run.json", "abc")
    assert tracking.read_run_id(tmp_path / "m" / "run.json") == "abc"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert tracking.read_run_id(tmp_path / "m" / "run.json") is None
    assert tracking.read_run_id(tmp_path / "absent.json") is None


def write_one_run(uri: str, index: int) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["DVC_EXP_NAME"] = "race"
    os.environ.pop("ARGRPO_PIPELINE_ID", None)
    with tracking.stage_run("grpo", {"grpo": {"seed": index}}, run_name="grpo_a") as run:
        for step in range(5):
            run.log_metrics({"reward/composite_mean": index + step / 10}, step=step)


def test_four_processes_on_a_fresh_store_all_record_their_run(tmp_path, monkeypatch):
    import multiprocessing

    uri = use_store(tmp_path, monkeypatch, pipeline=None)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_one_run, args=(uri, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    client = client_of(uri)
    assert [e.name for e in client.search_experiments()].count("argrpo") == 1
    runs = all_runs(uri)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.run_name for r in runs}) == 4
    assert sorted(r.data.params["grpo.seed"] for r in runs) == ["0", "1", "2", "3"]
    assert all(len(client.get_metric_history(r.info.run_id, "reward/composite_mean")) == 5 for r in runs)


def test_runs_prints_a_compact_table_per_stage_with_headline_metrics(store):
    with tracking.stage_run("prepare") as run:
        run.log_metrics({"data_images": 1797, "data_classes": 10, "stage_seconds": 2.0})
    for variant in ("instance", "loofid"):
        with tracking.stage_run("grpo", run_name=f"grpo_{variant}_s0") as run:
            for step in range(4):
                run.log_metrics({"reward/composite_mean": 0.25 * step, "fid/ema": 20.0 - step, "entropy/token": 3.0,
                                 "entropy/normalised": 0.875, "advantage/std": 1.0, "time/rollout": 0.1,
                                 "throughput/tokens_per_s": 1e4, "policy/kl": 0.01}, step=step)
    with tracking.stage_run("evaluate") as run:
        run.log_metrics({"base_cfg.fid": 12.5, "base_cfg.recall": 0.5, "base_cfg.precision": 0.75,
                         "base_cfg.is": 3.25, "base_cfg.class_accuracy": 0.875, "grpo_loofid_nocfg/fid": 9.5,
                         "grpo_loofid_nocfg/recall": 0.625, "base_cfg.seconds_per_image": 0.01})
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 0, result.output
    out = result.output
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, out
    assert "nan" not in out.lower() and "advantage" not in out and "throughput" not in out
    grpo_header = next(line for line in lines if line.startswith("run") and "reward" in line)
    assert grpo_header.split() == ["run", "experiment", "status", "started", "step", "reward", "fid/ema", "entropy"]
    grpo_rows = [line.split() for line in lines if line.startswith("grpo_")]
    assert sorted(row[0] for row in grpo_rows) == ["grpo_instance_s0", "grpo_loofid_s0"]
    assert all(row[-4:] == ["3", "0.75", "17", "0.875"] for row in grpo_rows)
    assert [s.split(":")[0] for s in out.split("\n\n")] == ["prepare", "grpo", "evaluate"]  # pipeline order
    evaluate = out.split("\n\n")[2]
    assert "base_cfg" in evaluate and "grpo_loofid_nocfg" in evaluate and "9.5" in evaluate and "12.5" in evaluate
    assert "seconds_per_image" not in evaluate
    assert "1797" in out.split("\n\n")[0]

    only = CliRunner().invoke(app, ["runs", "--stage", "grpo", "--limit", "1"])
    assert only.exit_code == 0 and only.output.count("\ngrpo_") == 1 and "prepare" not in only.output


def test_runs_rejects_an_unknown_stage_naming_the_valid_ones(store):
    with tracking.stage_run("prepare"):
        pass
    result = CliRunner().invoke(app, ["runs", "--stage", "gpro"])
    assert result.exit_code != 0
    assert "unknown stage 'gpro'" in result.output and "grpo" in result.output and "evaluate" in result.output
    empty = CliRunner().invoke(app, ["runs", "--stage", "evaluate"])  # a real stage without runs yet
    assert empty.exit_code == 0 and "no evaluate runs" in empty.output


def test_runs_on_a_missing_store_reports_it_and_creates_nothing(tmp_path, monkeypatch):
    use_store(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 0 and "no runs in" in result.output
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("config, files", [
    ("var_d16_256", ["var_d16.pth", "vae_ch160v4096z32.pth", "sac+logos+ava1-l14-linearMSE.pth"]),
    ("llamagen_t2i_xl_256", ["t2i_XL_stage1_256.pt", "vq_ds16_t2i.pt", "google/flan-t5-xl",
                             "Qwen2.5-VL-3B-Instruct", "HPS_v2.1_compressed.pt", "ckpt_koniq10k.pt"]),
])
def test_doctor_knows_the_files_of_var_and_text_to_image(tmp_path, config, files):
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / f"configs/{config}.yaml").read_text())
    params["weights"] = {k: str(tmp_path / "nope" / Path(v).name) if v and k != "clip_model" else v
                         for k, v in params["weights"].items()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["doctor", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"model: {params['model']['family']} {params['model']['gpt_preset']}")
    for name in files:
        assert name in result.output, name
    if config.startswith("llamagen_t2i"):
        for param in ("t5_dir", "qwen_vl_dir", "maniqa_weights", "clip_weights", "hpsv2_weights"):
            assert f"weights.{param}: folder not found" in result.output or f"weights.{param}: file not found" \
                in result.output, param
