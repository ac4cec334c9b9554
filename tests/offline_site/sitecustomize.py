"""Tests run offline: refuse every network connection that leaves this machine, in every Python process.

tests/conftest.py puts this folder first on PYTHONPATH, so the processes the tests start (stages run by
DVC, torchrun workers, `python -c` probes) import it at start-up like the test process itself does.
Loopback (127.0.0.0/8, ::1, `localhost`, this host's own name) and unix sockets stay open: DVC, MLflow's
sqlite store and torch.distributed's gloo rendezvous use them. A refused connection raises before any
packet is sent; name lookups of other hosts are refused too, since a DNS query is traffic.
Python-level sockets only: a C extension opening its own sockets is not covered.
"""

import ipaddress
import socket

MESSAGE = "network access refused in tests (only loopback and unix sockets are allowed)"
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo
_real_gethostbyname = socket.gethostbyname
_real_gethostbyname_ex = socket.gethostbyname_ex
_real_gethostbyaddr = socket.gethostbyaddr


def local_host(host) -> bool:
    """Whether `host` (a name, an address, bytes or None) is this machine."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%", 1)[0].strip("[]").lower()
    if host in ("", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"):
        return True
    if host in (socket.gethostname().lower(), socket.gethostname().split(".")[0].lower()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def local_address(family, address) -> bool:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True  # unix, netlink, ...: never leave the machine
    return isinstance(address, tuple) and local_host(address[0])


def refuse(what) -> None:
    raise ConnectionRefusedError(f"{MESSAGE}: {what}")


def connect(self, address):
    if not local_address(self.family, address):
        refuse(f"connect to {address!r}")
    return _real_connect(self, address)


def connect_ex(self, address):
    if not local_address(self.family, address):
        refuse(f"connect to {address!r}")
    return _real_connect_ex(self, address)


def sendto(self, data, *args):
    address = args[-1]
    if not local_address(self.family, address):
        refuse(f"send to {address!r}")
    return _real_sendto(self, data, *args)


def numeric(host) -> bool:
    try:
        ipaddress.ip_address(str(host.decode() if isinstance(host, bytes) else host).split("%", 1)[0])
    except ValueError:
        return False
    return True


def refuse_lookup(host) -> None:
    """A name that would need DNS: fail as an unknown name does (socket.gaierror), before any query."""
    if not (local_host(host) or numeric(host)):
        raise socket.gaierror(socket.EAI_NONAME, f"{MESSAGE}: look up {host!r}")


def getaddrinfo(host, *args, **kwargs):
    refuse_lookup(host)
    return _real_getaddrinfo(host, *args, **kwargs)


def gethostbyname(host):
    refuse_lookup(host)
    return _real_gethostbyname(host)


def gethostbyname_ex(host):
    refuse_lookup(host)
    return _real_gethostbyname_ex(host)


def gethostbyaddr(host):
    refuse_lookup(host)
    if not local_host(host):  # a reverse lookup of an outside address is a DNS query too
        raise socket.herror(1, f"{MESSAGE}: look up {host!r}")
    return _real_gethostbyaddr(host)


def install() -> None:
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.gethostbyaddr = gethostbyaddr


install()

if __name__ == "sitecustomize":
    # this file shadows any sitecustomize of the interpreter or the environment: import that one as well
    import importlib
    import os
    import sys

    me = sys.modules[__name__]
    folder = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != folder]
    del sys.modules["sitecustomize"]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        # the import system reads this entry back when this module's execution ends
        sys.modules.setdefault("sitecustomize", me)
