"""What the plugin tells install-cni's agent about each ADD and DEL, for the node's metrics: one
unix datagram of a few bytes, sent without waiting to the socket the agent binds on the node.

The record is ``istio-cni 1 COMMAND RESULT SECONDS`` (RESULT ``success`` or ``fail``, SECONDS the
time the plugin spent on the call). The socket's path comes from the plugin's entry
(``stats_socket``, which install-cni writes) or is DEFAULT_SOCKET. Nothing here may fail or
delay a pod start: the socket is non-blocking, and every error (no agent listening, its
queue full, no such directory) is swallowed. Only ``_socket`` is imported (the C module;
``socket`` would bring enum and selectors).
"""

from __future__ import annotations

from istio_iptables.startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

# Istio's CNI agent run directory on the node (CNI_AGENT_RUN_DIR), and our socket's name in it.
DEFAULT_RUN_DIR = "/var/run/istio-cni"
SOCKET_NAME = "plugin-stats.sock"
DEFAULT_SOCKET = f"{DEFAULT_RUN_DIR}/{SOCKET_NAME}"
CONF_KEY = "stats_socket"
RECORD_PREFIX = "istio-cni 1 "
COMMANDS = ("ADD", "DEL")


def record(command: str, code: int, seconds: float, raw: Any = None) -> None:
    """Sends one record for an ADD or DEL (other commands are not counted); never raises."""
    if command not in COMMANDS:
        return
    try:
        path = raw.get(CONF_KEY) if isinstance(raw, dict) else None
        if not isinstance(path, str) or not path or "\0" in path:
            path = DEFAULT_SOCKET
        import _socket

        sock = _socket.socket(
            _socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC
        )
        try:
            result = "success" if code == 0 else "fail"
            sock.sendto(f"{RECORD_PREFIX}{command} {result} {seconds:.6f}".encode("ascii"), path)
        finally:
            sock.close()
    except Exception:  # noqa: BLE001, S110 - metrics must never fail a pod start
        pass
