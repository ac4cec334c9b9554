"""When a GRPO run may resume from its checkpoint, and in which MLflow run.

A run directory (models/grpo/<run>) keeps its state.pt between attempts (DVC `persist: true`), so a
killed `dvc repro` continues where the last checkpoint left it. A checkpoint is resumed only by the run
that wrote it: `resume.json` beside it holds the fingerprint of everything that determines the run (its
params, the files it starts from, the code) and the MLflow run id the curve is logged to. Any difference,
a missing record or an unreadable state.pt starts the run afresh, saying why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from argrpo.files import write_json_atomic

RECORD = "resume.json"
STATE = "state.pt"
LARGE = 64 << 20  # files above this are identified by size and modification time, not by their bytes


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > LARGE:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(settings: Mapping[str, Any], files: Iterable[str | Path]) -> str:
    """A digest of `settings` (JSON-serialisable) and of `files` (files or folders, read recursively;
    `__pycache__` skipped). Equal digests: the same run."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for item in sorted(Path(f) for f in files):
        paths = sorted(p for p in item.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if item.is_dir() else [item]
        for path in paths:
            h.update(f"{path}\0{_file_digest(path) if path.exists() else 'missing'}\0".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ResumePlan:
    resume: bool  # state.pt in the run directory continues this run
    run_id: str | None  # the MLflow run holding the curve so far (None: open a new one)
    reason: str  # why, in words, for the log


def plan_resume(run_dir: str | Path, digest: str) -> ResumePlan:
    """Decide whether run_dir's checkpoint belongs to the run with fingerprint `digest`; when it does not,
    clear the directory so nothing of another run survives into this one."""
    run_dir = Path(run_dir)
    state, record = run_dir / STATE, run_dir / RECORD
    if not state.exists():
        reason = "no checkpoint"
    else:
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None
        if saved is None:
            reason = f"{state} has no readable {RECORD} beside it"
        elif saved.get("fingerprint") != digest:
            reason = f"{state} was written by a run with other params, inputs or code"
        else:
            try:
                torch.load(state, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated or corrupt: report it and start afresh rather than block every rerun
                reason = f"{state} cannot be read ({type(e).__name__}: {e})"
            else:
                return ResumePlan(True, saved.get("run_id"), f"resuming from {state}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if reason != "no checkpoint":
        print(f"argrpo: {reason}: starting the run afresh", file=sys.stderr)
    return ResumePlan(False, None, reason)


def record_run(run_dir: str | Path, digest: str, run_id: str | None) -> None:
    """Write resume.json: the fingerprint of the run now writing run_dir and its MLflow run id."""
    write_json_atomic(Path(run_dir) / RECORD, {"fingerprint": digest, "run_id": run_id})
