"""A GRPO checkpoint is resumed only by the run that wrote it; anything else starts afresh, saying why."""

import torch

from argrpo.resume import fingerprint, plan_resume, record_run


def checkpointed(run_dir, digest="abc", run_id="run-1"):
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"step": torch.tensor(4), "weights": torch.ones(3)}, run_dir / "state.pt")
    (run_dir / "curves.csv").write_text("step\n0\n")
    record_run(run_dir, digest, run_id)
    return run_dir


def test_the_same_run_resumes_in_its_mlflow_run(tmp_path):
    plan = plan_resume(checkpointed(tmp_path / "run"), "abc")
    assert plan.resume and plan.run_id == "run-1"
    assert (tmp_path / "run/state.pt").exists() and (tmp_path / "run/curves.csv").exists()


def test_no_checkpoint_starts_afresh_quietly(tmp_path, capsys):
    plan = plan_resume(tmp_path / "run", "abc")
    assert not plan.resume and plan.run_id is None and capsys.readouterr().err == ""


def test_another_runs_checkpoint_is_cleared(tmp_path, capsys):
    run_dir = checkpointed(tmp_path / "run", digest="other")
    plan = plan_resume(run_dir, "abc")
    assert not plan.resume and plan.run_id is None and not run_dir.exists()
    assert "other params, inputs or code" in capsys.readouterr().err


def test_a_truncated_checkpoint_is_named_and_the_run_starts_afresh(tmp_path, capsys):
    run_dir = checkpointed(tmp_path / "run")
    data = (run_dir / "state.pt").read_bytes()
    (run_dir / "state.pt").write_bytes(data[: len(data) // 2])
    plan = plan_resume(run_dir, "abc")
    assert not plan.resume and not run_dir.exists()
    err = capsys.readouterr().err
    assert "state.pt cannot be read" in err and str(run_dir) in err


def test_a_checkpoint_without_its_record_is_not_trusted(tmp_path, capsys):
    run_dir = checkpointed(tmp_path / "run")
    (run_dir / "resume.json").unlink()
    assert not plan_resume(run_dir, "abc").resume
    assert "no readable resume.json" in capsys.readouterr().err


def test_fingerprint_follows_settings_and_file_contents(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code/a.py").write_text("x = 1\n")
    (tmp_path / "base.pt").write_bytes(b"weights")
    files = [tmp_path / "code", tmp_path / "base.pt"]
    first = fingerprint({"lr": 1e-5}, files)
    assert fingerprint({"lr": 1e-5}, files) == first
    assert fingerprint({"lr": 2e-5}, files) != first
    (tmp_path / "code/a.py").write_text("x = 2\n")
    assert fingerprint({"lr": 1e-5}, files) != first
    (tmp_path / "code/a.py").write_text("x = 1\n")
    assert fingerprint({"lr": 1e-5}, files) == first
    (tmp_path / "base.pt").write_bytes(b"other weights")
    assert fingerprint({"lr": 1e-5}, files) != first
