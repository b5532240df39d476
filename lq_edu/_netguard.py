"""Make any non-loopback network connection raise (used by the test suite).

The course promises to run offline; the tests hold it to that by installing
this guard in the test process and, through ``sitecustomize``, in every
kernel they start. Loopback stays open because Jupyter kernels need it.
"""

from __future__ import annotations

import ipaddress
import socket

_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex
_original_getaddrinfo = socket.getaddrinfo


class NetworkBlockedError(OSError):
    """Raised instead of opening a connection to the outside world."""


def _is_local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(sock: socket.socket, address) -> None:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) else address
    if not _is_local(host):
        raise NetworkBlockedError(f"network access to {address!r} is blocked: lq-edu runs offline")


def _connect(self, address):
    _check(self, address)
    return _original_connect(self, address)


def _connect_ex(self, address):
    _check(self, address)
    return _original_connect_ex(self, address)


def _getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        raise NetworkBlockedError(f"name lookup of {host!r} is blocked: lq-edu runs offline")
    return _original_getaddrinfo(host, *args, **kwargs)


def install() -> None:
    """Block non-loopback connects and name lookups in this process."""
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.getaddrinfo = _getaddrinfo


def uninstall() -> None:
    socket.socket.connect = _original_connect
    socket.socket.connect_ex = _original_connect_ex
    socket.getaddrinfo = _original_getaddrinfo
