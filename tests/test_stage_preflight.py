"""A stage started with a missing weights file fails at once, naming the param, before building a model."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage, args, config, file", [
    ("pretrain", [], "llamagen_l_256", "c2i_L_256.pt"),
    ("grpo", ["instance", "0"], "llamagen_l_256", "c2i_L_256.pt"),
    ("sample", [], "llamagen_l_256", "c2i_L_256.pt"),
    ("grpo", ["loofid", "0"], "var_d16_256", "var_d16.pth"),
])
def test_missing_weights_fail_fast_with_the_param(tmp_path, stage, args, config, file):
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / f"configs/{config}.yaml").read_text())
    params["weights"] = {**params["weights"], "gpt_checkpoint": str(tmp_path / file)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, f"stages/{stage}.py", *args], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "weights.gpt_checkpoint: file not found" in result.stderr and file in result.stderr
    assert "weights.vq_checkpoint" in result.stderr and "Hugging Face" in result.stderr
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
    # the check runs before the stage opens its MLflow run or builds any model
    assert not (tmp_path / "mlflow.db").exists()
    assert elapsed < 30, elapsed  # seconds, mostly interpreter start-up and imports
