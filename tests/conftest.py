import importlib.util
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

# tiny models on a 2-core machine: one intra-op thread avoids spinning threads fighting each other
torch.set_num_threads(1)

# Offline for every test: offline_site/sitecustomize.py refuses connections that leave the machine. It is
# installed in this process here, and reaches every Python process a test starts through PYTHONPATH.
OFFLINE_SITE = Path(__file__).resolve().parent / "offline_site"
_spec = importlib.util.spec_from_file_location("argrpo_tests_offline_site", OFFLINE_SITE / "sitecustomize.py")
network_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(network_guard)

# libraries that would try the network (hub downloads, usage telemetry, update checks) are told not to
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def offline_pythonpath(current: str | None) -> str:
    parts = [p for p in (current or "").split(os.pathsep) if p]
    return os.pathsep.join([str(OFFLINE_SITE)] + [p for p in parts if p != str(OFFLINE_SITE)])


# set once for the whole session too, so session fixtures and collection-time subprocesses are covered
os.environ["PYTHONPATH"] = offline_pythonpath(os.environ.get("PYTHONPATH"))
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)


_popen_init = subprocess.Popen.__init__


def offline_popen_init(self, *args, env=None, **kwargs):
    """Popen with the guard kept on PYTHONPATH even when a test passes its own environment."""
    if env is not None:
        env = {**OFFLINE_ENV, **env, "PYTHONPATH": offline_pythonpath(env.get("PYTHONPATH"))}
    _popen_init(self, *args, env=env, **kwargs)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test, and every Python process it starts, runs with the network guard (see offline_site)."""
    monkeypatch.setenv("PYTHONPATH", offline_pythonpath(os.environ.get("PYTHONPATH")))
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(subprocess.Popen, "__init__", offline_popen_init)
    monkeypatch.setattr(socket.socket, "connect", network_guard.connect)
    monkeypatch.setattr(socket.socket, "connect_ex", network_guard.connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", network_guard.sendto)
    monkeypatch.setattr(socket, "getaddrinfo", network_guard.getaddrinfo)
    monkeypatch.setattr(socket, "gethostbyname", network_guard.gethostbyname)
    monkeypatch.setattr(socket, "gethostbyname_ex", network_guard.gethostbyname_ex)
    monkeypatch.setattr(socket, "gethostbyaddr", network_guard.gethostbyaddr)
    yield


@pytest.fixture
def offline(monkeypatch):
    """Every network connection is refused, and an attempt fails the test even if it was caught."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network connections attempted: {attempts}"


@pytest.fixture(scope="module")
def report():
    """stages/report.py as a module (its plot-data writer and its checks)."""
    import sys

    stages = str(Path(__file__).resolve().parents[1] / "stages")
    sys.path.insert(0, stages)
    try:
        yield importlib.import_module("report")
    finally:
        sys.path.remove(stages)
