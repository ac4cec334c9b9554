"""The test suite is offline: connections leaving the machine are refused here and in child processes."""

import os
import socket
import subprocess
import sys
import time

import pytest

# example.com's address: never contacted, the guard raises before connect() reaches the kernel
OUTSIDE = ("93.184.216.34", 80)
# a child checks the guard is in place before it tries, so a broken guard fails the test without traffic
CHECK_GUARD = ("import socket, sys\n"
               "if not socket.socket.connect.__code__.co_filename.endswith('offline_site/sitecustomize.py'):\n"
               "    sys.exit('network guard not installed')\n")


def guarded() -> bool:
    return socket.socket.connect.__code__.co_filename.endswith("offline_site/sitecustomize.py")


def test_this_process_refuses_outside_connections_and_lookups():
    assert guarded() and socket.create_connection.__module__ == "socket"
    with pytest.raises(ConnectionRefusedError, match="network access refused in tests"):
        socket.create_connection(OUTSIDE, timeout=30)
    with pytest.raises(ConnectionRefusedError, match="network access refused in tests"):
        socket.socket().connect(OUTSIDE)
    with pytest.raises(socket.gaierror, match="look up 'example.com'"):  # no DNS query either
        socket.getaddrinfo("example.com", 443)
    with pytest.raises(socket.herror, match="look up '93.184.216.34'"):
        socket.gethostbyaddr(OUTSIDE[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(ConnectionRefusedError):
        udp.sendto(b"x", ("8.8.8.8", 53))


def test_loopback_and_unix_sockets_still_work(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=10):
            conn, _ = server.accept()
            conn.close()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.sock"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s.sock"))


def test_a_child_process_refuses_outside_connections_fast_and_keeps_loopback():
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0].endswith("offline_site")
    probe = (CHECK_GUARD +
             "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
             "socket.create_connection(srv.getsockname(), timeout=10).close()\n"  # loopback: allowed
             "print('loopback ok', flush=True)\n"
             f"s = socket.socket(); s.settimeout(30); s.connect({OUTSIDE!r})\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30  # refused at once, not a 30 s connect timeout
    assert "loopback ok" in done.stdout
    assert done.returncode != 0 and "network access refused in tests" in done.stderr, done.stderr


def test_a_child_started_with_its_own_environment_keeps_the_guard():
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/somewhere/else"}  # as tests that build an env do
    probe = CHECK_GUARD + f"socket.socket().connect({OUTSIDE!r})\n"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "network access refused in tests" in done.stderr, done.stderr
