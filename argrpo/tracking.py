"""MLflow tracking: the only module of argrpo that talks to MLflow.

Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo>/mlflow.db` with the absolute path of the
repository that holds the pipeline (queued DVC experiments run in copies under `.dvc/tmp/exps/`, so
the path points back to the original repository). Every stage opens one run tagged with the stage,
the git revision and `DVC_EXP_NAME`; the stages of one `dvc repro` / `dvc exp run` share a parent run,
found through the DVC process they all descend from.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = os.environ.get("ARGRPO_EXPERIMENT", "argrpo")
PIPELINE_TAG = "argrpo.pipeline"


def repo_root(start: str | Path | None = None) -> Path:
    """The repository holding the pipeline; from inside a queued DVC experiment, the original one."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True,
                             check=True).stdout.strip()
        return Path(top)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return path


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def _process(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, command line, start time) of a process, from /proc; None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), cmd, fields[19]


def pipeline_id() -> str | None:
    """An id shared by the stages of one DVC invocation: the nearest `dvc` ancestor process."""
    if os.environ.get("ARGRPO_PIPELINE_ID"):
        return os.environ["ARGRPO_PIPELINE_ID"]
    pid = os.getppid()
    for _ in range(12):
        info = _process(pid)
        if info is None or pid <= 1:
            return None
        parent, cmd, started = info
        words = cmd.split()
        if any(Path(w).name == "dvc" or w.endswith("/dvc") for w in words[:3]) or "dvc.cli" in cmd:
            return f"{os.uname().nodename}:{pid}:{started}"
        pid = parent
    return None


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


class StageRun:
    """A thin handle on one MLflow run; metrics are logged with explicit steps."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("/", "."), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in _flat(params).items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


def _parent_run(client, experiment_id: str, pid: str, exp_name: str) -> str:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'", max_results=1)
    if found:
        return found[0].info.run_id
    name = exp_name or time.strftime("repro-%Y%m%d-%H%M%S")
    run = client.create_run(experiment_id, run_name=name,
                            tags={PIPELINE_TAG: pid, "dvc_exp_name": exp_name, "git_revision": git_revision()})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, run_name: str | None = None
              ) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (child of the pipeline's parent run when under DVC)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"stage": stage, "git_revision": git_revision(), "dvc_exp_name": exp_name}
    pid = pipeline_id()
    if pid:
        tags["mlflow.parentRunId"] = _parent_run(client, experiment_id, pid, exp_name)
        tags[PIPELINE_TAG + ".member"] = pid
    run = client.create_run(experiment_id, run_name=run_name or stage, tags=tags)
    handle = StageRun(client, run.info.run_id)
    if params:
        handle.log_params(params)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)


def runs_table(metric_prefixes: tuple[str, ...] = ("fid", "is", "precision", "recall", "class_accuracy"),
               max_results: int = 200):
    """A pandas table of the tracked runs, newest first (`argrpo runs`, `argrpo compare`)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    df = mlflow.search_runs(experiment_names=[EXPERIMENT], max_results=max_results,
                            order_by=["attributes.start_time DESC"])
    if df.empty:
        return df
    keep = ["run_id", "tags.mlflow.runName", "tags.stage", "tags.dvc_exp_name", "start_time", "status"]
    metric_cols = [c for c in df.columns if c.startswith("metrics.")
                   and any(c.split(".")[-1].startswith(p) for p in metric_prefixes)]
    df = df[[c for c in keep if c in df.columns] + sorted(metric_cols)]
    return df.rename(columns=lambda c: c.replace("tags.mlflow.runName", "run").replace("tags.", "")
                     .replace("metrics.", ""))
