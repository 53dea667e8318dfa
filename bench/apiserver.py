"""A small HTTPS Kubernetes API stand-in for the benchmark: ``GET /api/v1/namespaces/NS/pods/NAME``
with bearer-token auth, one thread per connection (the TLS handshake runs in that thread).

Run as ``python -m bench.apiserver --cert C --key K --token-file T --pods PODS.json``; it prints
its port on the first line of stdout and serves until terminated. A name found in PODS.json gets
that Pod; any other name gets the ``default`` Pod under that name."""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_POD_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/?]+)\Z")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    tls: ssl.SSLContext
    token: str
    pods: dict[str, Any]

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": message, "reason": reason, "code": code})  # fmt: skip

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._status(401, "Unauthorized", "Unauthorized")
            return
        m = _POD_PATH.match(self.path)
        if not m:
            self._status(404, "NotFound", f"the server could not find the requested resource {self.path}")
            return
        namespace, name = m.groups()
        pod = self.server.pods.get(name)
        if pod is None:
            pod = copy.deepcopy(self.server.pods["default"])
            pod["metadata"]["name"] = name
        pod = {**pod, "metadata": {**pod["metadata"], "namespace": namespace}}
        self._send(200, pod)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.apiserver")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--pods", required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    server.tls = tls
    with open(args.token_file) as f:
        server.token = f.read().strip()
    with open(args.pods) as f:
        server.pods = json.load(f)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
