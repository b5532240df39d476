"""Nothing in the suite or in a notebook kernel may reach the network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from lq_edu._netguard import NetworkBlockedError


def test_outbound_connection_is_blocked():
    with pytest.raises(NetworkBlockedError, match="blocked"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_name_lookup_is_blocked():
    with pytest.raises(NetworkBlockedError):
        socket.getaddrinfo("huggingface.co", 443)


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()


def test_child_processes_are_guarded_too():
    """Kernels are child processes: the guard reaches them through sitecustomize."""
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('93.184.216.34', 80), timeout=1)\n"
        "    print('CONNECTED')\n"
        "except OSError as err:\n"
        "    print(type(err).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), check=True)
    assert out.stdout.strip() == "NetworkBlockedError"


def test_hf_libraries_are_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
