"""The development set-up itself: scripts, installed commands, and the namespace helpers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.netns import NetNS, ci_enabled, create_netns, delete_netns, veth_pair

SCRIPTS = ["scripts/setup", "scripts/test", "scripts/build-test-image", ".ci/run"]
CONSOLE_SCRIPTS = ["istio-iptables", "istio-clean-iptables", "istio-cni", "install-cni"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(repo_root: Path, script: str) -> None:
    path = repo_root / script
    assert path.is_file()
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_console_script_installed(venv_bin: Path, name: str) -> None:
    path = venv_bin / name
    assert path.is_file(), f"{path} missing: run scripts/setup"
    assert path.stat().st_mode & 0o111


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("True", True), ("yes", True), ("", False), ("false", False), ("0", False)],
)
def test_ci_enabled(value: str, expected: bool) -> None:
    assert ci_enabled({"CI": value}) is expected
    assert ci_enabled({}) is False


@pytest.mark.kernel
def test_netns_create_and_delete() -> None:
    ns = create_netns("infra")
    try:
        assert Path(ns.path).exists()
        assert "state UNKNOWN" in ns.run(["ip", "link", "show", "lo"]).stdout  # lo is up
    finally:
        delete_netns(ns)
    assert not Path(ns.path).exists()
    delete_netns(ns)  # deleting a missing namespace is not an error


_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.bind((sys.argv[1], 7000))
s.listen(1)
print("ready", flush=True)
c, peer = s.accept()
c.sendall(peer[0].encode())
c.close()
"""

_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], 7000), timeout=10) as c:
    print(c.recv(100).decode())
"""


@pytest.mark.parametrize(("server", "client"), [("10.250.0.1", "10.250.0.2"), ("fd00:250::1", "fd00:250::2")])
def test_veth_pair_carries_tcp(netns: Callable[..., NetNS], server: str, client: str) -> None:
    a, b = netns("a"), netns("b")
    prefix = "/64" if ":" in server else "/24"
    veth_pair(a, b, addrs_a=[server + prefix], addrs_b=[client + prefix])
    srv = a.popen([sys.executable, "-c", _SERVER, server], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "ready"
        out = b.run([sys.executable, "-c", _CLIENT, server]).stdout.strip()
        assert out == client  # the server saw the client's own address: no NAT, a plain link
        assert srv.wait(timeout=10) == 0
    finally:
        srv.kill()
        srv.wait()
