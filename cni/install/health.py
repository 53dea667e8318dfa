"""The health endpoints kubelet probes (/readyz: the entry is in place; /healthz: the watch loop
runs), the status they report, and ``--check``, which asks a running installer's /readyz."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cni.install.settings import Settings

log = logging.getLogger("install-cni")


@dataclass
class Status:
    """What the endpoints report: the outcome of the installer's last pass and when it ran."""

    ready: bool = False
    detail: str = "starting"
    heartbeat: float = field(default_factory=time.monotonic)


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Dual stack: kubelet probes the pod's address, IPv4 or IPv6.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its socket.getfqdn() of the bind address is a reverse DNS
        # lookup, which waits for the resolver's timeout (10 s) where the pod's DNS cannot be
        # reached yet, as on a node whose network this installer is still setting up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _HealthServer6(_HealthServer):
    address_family = socket.AF_INET6


def _bind(address: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """All addresses (IPv4 and IPv6 where the kernel has it) for "", else the one given."""
    if address in ("", "::") or ":" in address:
        try:
            return _HealthServer6((address or "::", port), handler)
        except OSError:
            if address:
                raise
    return _HealthServer((address or "0.0.0.0", port), handler)


def serve_health(status: Status, address: str, port: int, stale_after: float) -> ThreadingHTTPServer:
    """/readyz: 200 while the entry is in place. /healthz: 200 while the watch loop runs (a stuck
    installer is restarted; a missing entry is not a reason to restart it). Both say why."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may sit idle: pods can reach this port

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/readyz":
                ok = status.ready
                body = status.detail
            elif path == "/healthz":
                age = time.monotonic() - status.heartbeat
                ok = age <= stale_after
                body = ("alive; " if ok else f"stuck: no check for {age:.0f}s; ") + status.detail
            else:
                self.send_error(404)
                return
            data = (body + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            log.debug("health: " + format, *args)

    server = _bind(address, port, Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def check(settings: Settings) -> int:
    """``--check``: the running installer's /readyz answer."""
    import urllib.error
    import urllib.request

    host = settings.health_address or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{settings.health_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            print(resp.read().decode().strip())
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode().strip())
    except OSError as e:
        print(f"no answer from {url}: {e}")
    return 1
