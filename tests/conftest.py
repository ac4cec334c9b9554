import socket

import pytest
import torch

# tiny models on a 2-core machine: one intra-op thread avoids spinning threads fighting each other
torch.set_num_threads(1)


@pytest.fixture
def offline(monkeypatch):
    """Every network connection is refused, and an attempt fails the test even if it was caught."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network connections attempted: {attempts}"
