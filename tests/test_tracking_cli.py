"""Tracking store location, run grouping, and the `argrpo` CLI (runs, doctor)."""

import os
from pathlib import Path

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


def test_stage_runs_share_a_parent_and_show_in_runs_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ARGRPO_PIPELINE_ID", "test-pipeline")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
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
