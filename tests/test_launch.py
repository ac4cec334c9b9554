"""The distributed stages start through stages/launch.py: params are checked first and torchrun's options
never pass through a shell, even when every earlier stage is cached."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, distributed: dict, *args: str) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distributed"].update(distributed)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "stages/launch.py", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.parametrize("args", ["--standalone $(touch pwned)", "--standalone; touch pwned",
                                  "--standalone `touch pwned`", "--standalone && touch pwned"])
def test_shell_syntax_in_torchrun_args_is_refused_before_anything_runs(tmp_path, args):
    result = launch(tmp_path, {"torchrun_args": args}, "grpo", "instance", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"params.yaml: distributed.torchrun_args must be plain torchrun options (letters, digits and . _ : = / , @ + - "
        f"only; no shell syntax), got {args!r}"], result.stderr
    assert not (tmp_path / "pwned").exists()


def test_an_unknown_stage_is_refused(tmp_path):
    result = launch(tmp_path, {}, "report")
    assert result.returncode == 2 and "must be one of grpo, sample, evaluate" in result.stderr


def test_dvc_yaml_starts_every_torchrun_stage_through_the_launcher():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("grpo", "sample", "evaluate"):
        assert stages[name]["cmd"].startswith(f"python stages/launch.py {name}"), stages[name]["cmd"]
        assert "distributed" in stages[name]["params"]
    assert not any("torchrun_args" in str(stage["cmd"]) for stage in stages.values())
