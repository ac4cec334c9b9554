"""MLflow tracking: the only module of argrpo that talks to MLflow.

Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo>/mlflow.db` with the absolute path of the
repository that holds the pipeline (queued DVC experiments run in copies under `.dvc/tmp/exps/`, so
the path points back to the original repository); artifacts (images) of a sqlite store go to `mlruns/`
beside the database. Experiment: `MLFLOW_EXPERIMENT_NAME`, else `ARGRPO_EXPERIMENT`, else "argrpo".

Runs. Every stage opens one run (`stage_run`) named `<name>-<DVC experiment or start time>`, unique in
the experiment, tagged with `stage`, `dvc_exp_name` and MLflow's standard source tags (script, user,
git commit / branch / remote). The stage runs of one `dvc repro` / `dvc exp run` share a parent run,
found through the DVC process they all descend from; a stage run can open nested child runs (one per
evaluated configuration or seed). A run ends FINISHED, FAILED (an exception) or KILLED (SIGTERM, SIGINT,
or found dead later); a run whose child failed or was killed ends with the child's status, and a
pipeline's parent run takes the worst status of its stages, for good.

Kills. `stage_run` turns SIGTERM (what torchrun and DVC's queue send) and SIGINT into an exit with
status 128 + signal after marking the run KILLED. SIGKILL cannot be caught: every run records its
host, pid and process start time, and the next `stage_run` on that host marks the RUNNING runs whose
process is gone as KILLED. A stage that resumes from a checkpoint continues its run: store the run id
next to the checkpoint (`write_run_id`) and pass it back (`stage_run(..., resume_run_id=read_run_id(...))`).

Concurrency. Queued experiments (`dvc queue start -j N`) and torchrun jobs write to one store at once:
creating the store's schema, the experiment, parent runs and unique names happens under a file lock
beside a sqlite database, and writes that meet `database is locked` are retried.
"""

from __future__ import annotations

import getpass
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

from argrpo.files import read_json, write_json_atomic

DEFAULT_EXPERIMENT = "argrpo"
PIPELINE_TAG = "argrpo.pipeline"
NAME_TAG = "argrpo.name"  # the name the stage gave, before the suffix that makes it unique
CHILD_TAG = "argrpo.child"  # set on runs opened with StageRun.child
HOST_TAG, PID_TAG, PID_START_TAG = "argrpo.host", "argrpo.pid", "argrpo.pid_start"
PID_NS_TAG, BOOT_TAG = "argrpo.pid_namespace", "argrpo.boot_id"
ATTEMPTS_TAG = "argrpo.attempts"
EVAL_METRICS = ("fid", "is", "precision", "recall", "class_accuracy")
STORE_LOCK_TIMEOUT_S = 600.0
RETRY_FOR_S = 120.0
# worst first: the status a parent takes from its children
BAD_STATUSES = ("FAILED", "KILLED")


def experiment_name() -> str:
    """`MLFLOW_EXPERIMENT_NAME` (MLflow's own variable), else `ARGRPO_EXPERIMENT`, else "argrpo"."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("ARGRPO_EXPERIMENT") or DEFAULT_EXPERIMENT


def repo_root(start: str | Path | None = None) -> Path:
    """The repository holding the pipeline; from inside a queued DVC experiment, the original one."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    top = _git("rev-parse", "--show-toplevel", cwd=path)
    return Path(top) if top else path


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths from the working directory); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def _git(*args: str, cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError, NotADirectoryError):
        return None
    return out.stdout.strip() or None


def git_revision() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def _process(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, command line, start time) of a process, from /proc; None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), cmd, fields[19]


def host_name() -> str:
    return os.uname().nodename


def _machine() -> dict[str, str]:
    """Which processes this one can see: its pid namespace (a container has its own) and the boot."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return {HOST_TAG: host_name(), PID_NS_TAG: namespace, BOOT_TAG: boot}


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that owns a run: machine, pid namespace, boot, pid and the process's start
    time (pids are reused)."""
    pid = pid or os.getpid()
    info = _process(pid)
    return {**_machine(), PID_TAG: str(pid), PID_START_TAG: info[2] if info else ""}


def process_alive(pid: int, start: str) -> bool:
    """Whether process `pid` exists and, where /proc tells, is the one that started at `start`."""
    info = _process(pid)
    if info is not None:
        return not start or info[2] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc/self").exists()  # with /proc, a pid missing from it is gone


def owner_state(tags: Mapping[str, str]) -> str:
    """"alive", "gone" or "unknown": the state of the process that owns a run, from its owner tags.

    Only processes of this machine's pid namespace can be checked: a run of another host or container
    is "unknown" (never declared dead from here), unless this machine rebooted since it started.
    """
    mine = _machine()
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != mine[HOST_TAG] or not pid.isdigit() or tags.get(PID_NS_TAG, "") != mine[PID_NS_TAG]:
        return "unknown"
    if tags.get(BOOT_TAG) and mine[BOOT_TAG] and tags[BOOT_TAG] != mine[BOOT_TAG]:
        return "gone"
    return "alive" if process_alive(int(pid), tags.get(PID_START_TAG, "")) else "gone"


def pipeline_id() -> str | None:
    """An id shared by the stages of one DVC invocation: `host:pid:start` of the nearest `dvc` ancestor."""
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
            return f"{host_name()}:{pid}:{started}"
        pid = parent
    return None


def _pipeline_owner(pid: str) -> dict[str, str]:
    """Owner tags of a pipeline's parent run: the DVC process, when the id names one on this host."""
    parts = pid.split(":")
    if len(parts) == 3 and parts[0] == host_name() and parts[1].isdigit():  # an ancestor: same namespace
        return {**_machine(), PID_TAG: parts[1], PID_START_TAG: parts[2]}
    return {}


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: script, source type, user and git commit / branch / remote."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.source.name": _script_name(), "mlflow.source.type": "LOCAL", "mlflow.user": user}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
    return tags


def _script_name() -> str:
    """The running script, relative to its checkout (`stages/grpo.py`), as MLflow's UI lists sources."""
    if not sys.argv or sys.argv[0] in ("", "-c", "-"):
        return f"python {sys.argv[0] if sys.argv else ''}".strip()
    script = Path(sys.argv[0]).resolve()
    top = _git("rev-parse", "--show-toplevel")
    if top and script.is_relative_to(Path(top).resolve()):
        return str(script.relative_to(Path(top).resolve()))
    return str(script)


_LOCKS: dict[str, Any] = {}


@contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Hold the file lock `<database>.lock` of a sqlite store (reentrant in one process).

    Serialises what is not safe to race: MLflow creating a fresh database's schema, creating the
    experiment, finding or creating a pipeline's parent run, choosing unique run names. Other stores
    (a tracking server, a SQL server) take no lock here; they serialise on their side.
    """
    from filelock import FileLock, Timeout

    db = sqlite_path(uri or tracking_uri())
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    path = str(db) + ".lock"
    lock = _LOCKS.setdefault(path, FileLock(path, timeout=STORE_LOCK_TIMEOUT_S))
    try:
        lock.acquire()
    except Timeout as e:
        raise TimeoutError(f"waited {STORE_LOCK_TIMEOUT_S:.0f} s for the tracking store lock {path}: another "
                           f"process holds it (a stuck stage?); stop it or delete the lock file") from e
    try:
        yield
    finally:
        lock.release()


def _transient(error: BaseException) -> bool:
    """A sqlite write that met another writer's lock: worth retrying."""
    seen: BaseException | None = error
    for _ in range(6):
        if seen is None:
            return False
        text = str(seen).lower()
        if "database is locked" in text or "database table is locked" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with jittered backoff for up to RETRY_FOR_S on a locked database."""
    deadline, delay = time.monotonic() + RETRY_FOR_S, 0.05
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as e:
            if not _transient(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 2.0)


def _artifact_location(uri: str, name: str) -> str | None:
    """Beside a sqlite database, not in whichever folder the first stage ran (a queued experiment's copy)."""
    db = sqlite_path(uri)
    return (db.parent / "mlruns" / name).as_uri() if db else None


def open_store() -> tuple[Any, str]:
    """(MlflowClient, experiment id) of the configured store and experiment, creating either if new.

    Safe with many processes on a new store: the schema and the experiment are created under the store
    lock, and an experiment created meanwhile elsewhere (RESOURCE_ALREADY_EXISTS) is read back.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, name = tracking_uri(), experiment_name()
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = with_retries(client.get_experiment_by_name, name)  # the first store access creates the schema
        if exp is None:
            try:
                return client, with_retries(client.create_experiment, name,
                                            artifact_location=_artifact_location(uri, name))
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = with_retries(client.get_experiment_by_name, name)
    if exp.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment {name!r} is deleted in {uri}: restore it "
                           f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set "
                           f"MLFLOW_EXPERIMENT_NAME to another name")
    return client, exp.experiment_id


def _name_suffix() -> str:
    return os.environ.get("DVC_EXP_NAME") or time.strftime("%Y%m%d-%H%M%S")


def unique_run_name(client, experiment_id: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first not yet used in the experiment (call under the lock)."""
    from mlflow.entities import ViewType

    quoted = name.replace("'", "")
    found = with_retries(client.search_runs, [experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'",
                         max_results=5000, run_view_type=ViewType.ALL)  # deleted runs keep their names
    taken = {r.info.run_name for r in found}
    if name not in taken:
        return name
    return next(f"{name}-{i}" for i in range(2, len(taken) + 3) if f"{name}-{i}" not in taken)


def _worst(statuses) -> str | None:
    return next((s for s in BAD_STATUSES if s in statuses), None)


def _last_activity(client, run) -> int:
    """Milliseconds of the last metric a run logged (its start when none): the end time of a dead run."""
    last = run.info.start_time or int(time.time() * 1000)
    for key in list(run.data.metrics)[:3]:
        history = with_retries(client.get_metric_history, run.info.run_id, key)
        last = max([last, *(m.timestamp for m in history)])
    return last


def update_parent_status(client, parent_id: str) -> str:
    """Set a pipeline's parent run to the worst status of its children, sticky once FAILED or KILLED.

    RUNNING while a child runs, FINISHED when all finished; returns the status set. Call under the lock.
    """
    parent = with_retries(client.get_run, parent_id)
    children = with_retries(client.search_runs, [parent.info.experiment_id],
                            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)
    statuses = {c.info.status for c in children}
    bad = _worst(statuses | {parent.info.status})
    status = bad or ("RUNNING" if "RUNNING" in statuses else "FINISHED")
    if status == "RUNNING":
        if parent.info.status != "RUNNING":
            with_retries(client.update_run, parent_id, status="RUNNING")
    elif status != parent.info.status or parent.info.end_time is None:
        with_retries(client.set_terminated, parent_id, status=status)
    return status


def mark_dead_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (SIGKILL, out of memory, a crash).

    Their end time is their last logged metric; a pipeline parent with such a child becomes KILLED too.
    Runs of other hosts or containers are left alone (`owner_state`). Returns the run ids.
    """
    found = with_retries(client.search_runs, [experiment_id],
                         filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host_name()}'",
                         max_results=5000)
    dead = []
    for run in found:
        if owner_state(run.data.tags) != "gone":
            continue
        with_retries(client.set_tag, run.info.run_id, "argrpo.ended_by",
                     f"found dead by process {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        with_retries(client.set_terminated, run.info.run_id, status="KILLED", end_time=_last_activity(client, run))
        dead.append(run.info.run_id)
    for run in found:
        parent = run.data.tags.get("mlflow.parentRunId")
        if run.info.run_id in dead and parent and parent not in dead:
            update_parent_status(client, parent)
    return dead


def _pipeline_parent(client, experiment_id: str, pid: str, exp_name: str) -> str:
    """The parent run of pipeline `pid` (found by tag, or created), set RUNNING unless already failed."""
    found = with_retries(client.search_runs, [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'",
                         max_results=1)
    if found:
        run = found[0]
        if run.info.status not in BAD_STATUSES and run.info.status != "RUNNING":
            with_retries(client.update_run, run.info.run_id, status="RUNNING")
        return run.info.run_id
    owner = _pipeline_owner(pid)
    tags = {**source_tags(), PIPELINE_TAG: pid, "dvc_exp_name": exp_name, **owner}
    info = _process(int(owner[PID_TAG])) if owner else None
    if info:
        tags["mlflow.source.name"] = info[1][:500]  # the DVC command line: `dvc repro`, `dvc exp run ...`
    name = unique_run_name(client, experiment_id, exp_name or f"repro-{_name_suffix()}")
    return with_retries(client.create_run, experiment_id, run_name=name, tags=tags).info.run_id


class StageInterrupted(SystemExit):
    """SIGTERM or SIGINT arrived: unwinds like `sys.exit(128 + signal)`, so the process exits non-zero."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


@contextmanager
def exit_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, SIGTERM / SIGINT raise StageInterrupted in the main thread; handlers restored after.

    A second signal while the first unwinds is ignored, so the cleanup that marks the run KILLED
    finishes (a supervisor's SIGKILL still ends it). Outside the main thread this does nothing, as
    Python delivers signals only there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def interrupt(signum: int, frame) -> None:
        if fired:
            return
        fired.append(signum)
        raise StageInterrupted(signum)

    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _status_of(error: BaseException) -> str:
    if isinstance(error, (StageInterrupted, KeyboardInterrupt)):
        return "KILLED"
    if isinstance(error, SystemExit) and error.code in (0, None):
        return "FINISHED"
    return "FAILED"


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def image_to_pil(image: Any):
    """A PIL image from a PIL image, a uint8 numpy array [H, W, 3] / [H, W], or a float torch tensor
    [3, H, W] in [-1, 1]; a batch (numpy [N, H, W, 3], torch [N, 3, H, W]) becomes one grid."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # torch: the library's convention, channels first, floats in [-1, 1]
        x = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
        if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
            raise ValueError(f"image tensor must be [3, H, W] or [N, 3, H, W], got {list(x.shape)}")
        image = x.movedim(-3, -1).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 [H, W, 3] (the dataset's layout), got {image.dtype}")
    if image.ndim == 4:
        image = tile_images(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"numpy image must be [H, W, 3] or [N, H, W, 3], got {list(image.shape)}")
    return Image.fromarray(image)


def tile_images(images):
    """uint8 [N, H, W, C] -> one uint8 grid [rows * (H + 1) + 1, cols * (W + 1) + 1, C], white lines between."""
    import numpy as np

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = images[i]
    return grid


class StageRun:
    """A handle on one MLflow run: metrics with explicit steps, params, tags, images, nested child runs."""

    def __init__(self, client, run_id: str, experiment_id: str, name: str, stage: str, attempt: int = 1):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.name, self.stage, self.attempt = name, stage, attempt
        self.child_status: str | None = None  # FAILED / KILLED once a child run ended so

    @property
    def resumed(self) -> bool:
        """Whether this run was reopened (`resume_run_id`) rather than created."""
        return self.attempt > 1

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log `metrics` at `step` (default: metrics["step"] if present, else 0).

        Keys are MLflow's as given: `reward/composite_mean` stays, so MLflow's UI groups the charts by the
        part before the first '/'. A "step" entry is the step, not a metric.
        """
        from mlflow.entities import Metric

        step = int(metrics.get("step", 0) if step is None else step)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
        for i in range(0, len(batch), 900):  # MLflow takes at most 1,000 metrics a batch
            with_retries(self.client.log_batch, self.run_id, metrics=batch[i : i + 900])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log nested params flattened to dotted keys (`grpo.lr`).

        MLflow forbids changing a logged param: on a resumed run, params already logged with another
        value keep their first value, and the change is recorded in the tag `argrpo.changed_params`.
        """
        from mlflow.entities import Param

        flat = {k: str(v)[:6000] for k, v in _flat(params).items()}
        logged = with_retries(self.client.get_run, self.run_id).data.params
        changed = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
        items = [Param(k, v) for k, v in flat.items() if k not in logged]
        for i in range(0, len(items), 90):
            with_retries(self.client.log_batch, self.run_id, params=items[i : i + 90])
        if changed:
            text = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            self.set_tags({"argrpo.changed_params": text[:5000]})
            print(f"argrpo: run {self.name} resumed with changed params (MLflow keeps the first): {text}",
                  file=sys.stderr)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_image(self, image: Any, key: str, step: int = 0) -> None:
        """Log an image (or a batch, as one grid) under `key` at `step`: MLflow's UI shows a step slider.

        `image`: PIL, uint8 numpy [H, W, 3] / [N, H, W, 3], or float torch [3, H, W] / [N, 3, H, W] in
        [-1, 1]. `key` may hold letters, digits, `_ - . /` and spaces (`samples/class_3`).
        """
        self.client.log_image(self.run_id, image_to_pil(image), key=key, step=int(step), synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with_retries(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    @contextmanager
    def child(self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
              ) -> Iterator[StageRun]:
        """A nested run under this one (one evaluated configuration, one seed), ended with the block.

        An exception in the block marks the child FAILED (KILLED for an interrupt) and propagates; a
        child that ended so makes this run end with the same status even if the stage carries on.
        """
        with store_lock():
            run_name = unique_run_name(self.client, self.experiment_id, f"{name}-{_name_suffix()}")
            all_tags = {**source_tags(), **owner_tags(), "stage": self.stage, CHILD_TAG: name, NAME_TAG: name,
                        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "mlflow.parentRunId": self.run_id,
                        **(tags or {})}
            run = with_retries(self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags)
        handle = StageRun(self.client, run.info.run_id, self.experiment_id, run_name, self.stage)
        if params:
            handle.log_params(params)
        try:
            yield handle
        except BaseException as e:
            status = _status_of(e)
            with_retries(self.client.set_terminated, handle.run_id, status=status)
            if status in BAD_STATUSES:
                self.child_status = _worst({status, self.child_status})
            raise
        status = handle.child_status or "FINISHED"
        with_retries(self.client.set_terminated, handle.run_id, status=status)
        if status in BAD_STATUSES:
            self.child_status = _worst({status, self.child_status})


def _reopen(client, experiment_id: str, run_id: str, parent_id: str | None):
    """Reopen run `run_id` for a resumed stage; None (with a note) when it is not in this experiment."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    try:
        run = with_retries(client.get_run, run_id)
    except MlflowException:
        print(f"argrpo: run {run_id} to resume is not in {tracking_uri()}: opening a new run", file=sys.stderr)
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        print(f"argrpo: run {run_id} to resume is deleted or in another experiment: opening a new run",
              file=sys.stderr)
        return None
    tags = run.data.tags
    if run.info.status == "RUNNING":
        state = owner_state(tags)
        if state == "alive":
            raise RuntimeError(f"run {run_id} ({run.info.run_name}) is still RUNNING in process {tags[PID_TAG]}: "
                               f"two processes cannot continue one run")
        if state == "unknown":  # its process is out of sight (another host or container): take the run over
            print(f"argrpo: run {run.info.run_name} is marked RUNNING by a process this machine cannot see "
                  f"(host {tags.get(HOST_TAG, '?')}, pid {tags.get(PID_TAG, '?')}); resuming it here", file=sys.stderr)
    attempt = int(tags.get(ATTEMPTS_TAG, "1")) + 1
    new_tags = {**owner_tags(), ATTEMPTS_TAG: str(attempt)}
    if parent_id:
        new_tags["mlflow.parentRunId"] = parent_id
    with_retries(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in new_tags.items()])
    with_retries(client.update_run, run_id, status="RUNNING")
    return with_retries(client.get_run, run_id), attempt


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, run_name: str | None = None, *,
              resume_run_id: str | None = None, tags: Mapping[str, str] | None = None,
              handle_signals: bool = True) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (child of the pipeline's parent run when under DVC).

    `stage`: the stage's dvc.yaml name without the matrix part (`grpo`), tagged `stage`; `run_name`
    (default `stage`) gets a suffix, the DVC experiment's name or the start time, unique in the
    experiment; `tags`: extra tags (`variant`, `seed`). `resume_run_id`: reopen that run instead and
    continue it, when it exists in this store and experiment (otherwise a new run opens); steps logged
    again after a resume (those between the checkpoint and the kill) add a second point at their step,
    equal to the first when the resumed loop is deterministic. Before opening, RUNNING runs of
    this host whose process died are marked KILLED (`mark_dead_runs`). With `handle_signals`, SIGTERM
    and SIGINT end the run KILLED and the process with status 128 + signal (`exit_on_signals`).

    Ends FINISHED, FAILED on an exception, KILLED on an interrupt, or the status of a failed child.
    """
    client, experiment_id = open_store()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    pid = pipeline_id()
    with store_lock():
        mark_dead_runs(client, experiment_id)
        parent_id = _pipeline_parent(client, experiment_id, pid, exp_name) if pid else None
        reopened = _reopen(client, experiment_id, resume_run_id, parent_id) if resume_run_id else None
        if reopened:
            run, attempt = reopened
        else:
            base = run_name or stage
            all_tags = {**source_tags(), **owner_tags(), "stage": stage, NAME_TAG: base, "dvc_exp_name": exp_name,
                        ATTEMPTS_TAG: "1", **(tags or {})}
            if pid:
                all_tags["mlflow.parentRunId"] = parent_id
                all_tags[PIPELINE_TAG + ".member"] = pid
            name = unique_run_name(client, experiment_id, f"{base}-{_name_suffix()}")
            run, attempt = with_retries(client.create_run, experiment_id, run_name=name, tags=all_tags), 1
    handle = StageRun(client, run.info.run_id, experiment_id, run.info.run_name, stage, attempt)
    with exit_on_signals() if handle_signals else nullcontext():
        try:
            if reopened and tags:
                handle.set_tags(tags)
            if params:
                handle.log_params(params)
            yield handle
        except BaseException as e:
            status = _status_of(e)
            if isinstance(e, StageInterrupted):
                print(f"argrpo: {e}: marking MLflow run {handle.name} KILLED", file=sys.stderr)
            _end(client, handle.run_id, _worst({status, handle.child_status}) or status, parent_id)
            raise
        _end(client, handle.run_id, handle.child_status or "FINISHED", parent_id)


def _end(client, run_id: str, status: str, parent_id: str | None) -> None:
    with_retries(client.set_terminated, run_id, status=status)
    if parent_id:
        with store_lock():
            update_parent_status(client, parent_id)


def write_run_id(path: str | Path, run_id: str) -> None:
    """Record `run_id` (with the store and experiment) next to a checkpoint, for `read_run_id` on resume."""
    write_json_atomic(path, {"run_id": run_id, "tracking_uri": tracking_uri(), "experiment": experiment_name()})


def read_run_id(path: str | Path) -> str | None:
    """The run id `write_run_id` stored at `path`; None when absent or recorded for another store or experiment."""
    path = Path(path)
    if not path.is_file():
        return None
    data = read_json(path)
    if data.get("tracking_uri") != tracking_uri() or data.get("experiment") != experiment_name():
        return None
    return data.get("run_id") or None


def _client_if_exists():
    """A client on the store, or None when the store is a sqlite file that does not exist (nothing to read)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = with_retries(client.get_experiment_by_name, experiment_name())
    return (client, exp.experiment_id) if exp is not None else None


def runs_table(stage: str | None = None, max_results: int = 200, include_children: bool = False):
    """A pandas table of the tracked stage runs (no pipeline parents), newest first.

    Columns: run_id, run (the stage's name for it), run_name (unique MLflow name), stage, dvc_exp_name,
    status, start_time, end_time (pandas timestamps), parent_run_id, then one column per metric holding
    its last value, named by the metric key (`fid/ema`, `base_cfg.fid`). `stage` filters in the query, so
    `max_results` counts runs of that stage; child runs only with `include_children`.
    """
    import pandas as pd

    opened = _client_if_exists()
    if opened is None:
        return pd.DataFrame()
    client, experiment_id = opened
    query = "tags.stage != ''" if stage is None else f"tags.stage = '{stage}'"
    found = with_retries(client.search_runs, [experiment_id], filter_string=query, max_results=max_results,
                         order_by=["attributes.start_time DESC"])
    rows = []
    for r in found:
        tags = r.data.tags
        if CHILD_TAG in tags and not include_children:
            continue
        rows.append({
            "run_id": r.info.run_id, "run": tags.get(NAME_TAG, r.info.run_name), "run_name": r.info.run_name,
            "stage": tags.get("stage"), "dvc_exp_name": tags.get("dvc_exp_name", ""), "status": r.info.status,
            "start_time": _local_time(r.info.start_time), "end_time": _local_time(r.info.end_time),
            "parent_run_id": tags.get("mlflow.parentRunId"), **r.data.metrics,
        })
    return pd.DataFrame(rows)


def _local_time(ms: int | None):
    import pandas as pd

    return pd.Timestamp(datetime.fromtimestamp(ms / 1000)) if ms else pd.NaT


def tracked_stages() -> set[str]:
    """The stage names the store holds runs of (read from the newest 5,000 runs)."""
    table = runs_table(max_results=5000, include_children=True)
    return set(table["stage"].dropna()) if not table.empty else set()


def last_step(run_id: str, key: str) -> int | None:
    """The highest step at which run `run_id` logged metric `key`; None when it never did."""
    from mlflow.tracking import MlflowClient

    history = with_retries(MlflowClient(tracking_uri=tracking_uri()).get_metric_history, run_id, key)
    return max((m.step for m in history), default=None)


def evaluation_rows(table) -> list[dict[str, Any]]:
    """One row per (evaluate run, configuration) of a `runs_table`: the configuration's EVAL_METRICS.

    Reads metrics logged as `<configuration>.<metric>` or `<configuration>/<metric>`.
    """
    import pandas as pd

    if table.empty:
        return []
    pattern = re.compile(rf"(.+)[./]({'|'.join(EVAL_METRICS)})$")
    rows = []
    for _, r in table[table["stage"] == "evaluate"].iterrows():
        configs: dict[str, dict[str, float]] = {}
        for column, value in r.items():
            match = pattern.fullmatch(str(column))
            if match and isinstance(value, (int, float)) and not pd.isna(value):
                configs.setdefault(match.group(1), {})[match.group(2)] = float(value)
        for config in sorted(configs):
            rows.append({"run_id": r["run_id"], "run": r["run"], "dvc_exp_name": r["dvc_exp_name"],
                         "status": r["status"], "start_time": r["start_time"], "configuration": config,
                         **{m: configs[config].get(m, math.nan) for m in EVAL_METRICS}})
    return rows
