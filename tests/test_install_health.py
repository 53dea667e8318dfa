"""install-cni's health server starts without any name lookup. HTTPServer's own server_bind asks
for the bind address's FQDN (a reverse DNS query); in the istio-cni-node pod, whose DNS servers
cannot be reached while the node's network is being set up, that held the installer back by the
resolver's timeout (10 s) before it installed anything (found by tests/test_cri.py)."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import pytest

from cni.install import health


@pytest.mark.parametrize("address", ["", "127.0.0.1"])
def test_health_server_binds_without_a_dns_lookup(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    def no_lookup(*args: Any) -> Any:
        raise AssertionError(f"a name lookup: {args}")

    for name in ("getfqdn", "gethostbyaddr", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, no_lookup)
    status = health.Status(ready=True, detail="entry in place")
    server = health.serve_health(status, address, 0, 30.0)
    try:
        port = server.server_address[1]
        monkeypatch.undo()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            assert r.status == 200 and b"entry in place" in r.read()
    finally:
        server.shutdown()
        server.server_close()
