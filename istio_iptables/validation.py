"""``--run-validation``: prove with a real connection that outbound capture works, as Istio does.

Inside the target namespace, listeners on loopback at the proxy port and the inbound capture port
wait while a client running as the proxy's uid/gid connects to ``127.0.0.6:PROBE_PORT`` (``::6``
for IPv6). Only the capture rules can bring that connection to a listener; the listener then reads
the original destination (SO_ORIGINAL_DST) and requires the probe port. Failure within
``--probe-timeout`` seconds raises ApplyError with exit code 126 and Istio's explanation.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

from .apply import VALIDATION, ApplyError, open_target
from .config import ApplyOptions, Config
from .netns import Netns, setns

EXIT_CODE = 126

MESSAGE = (
    "iptables validation failed; workload is not ready for Istio.\n"
    "When using Istio CNI, this can occur if a pod is scheduled before the node is ready.\n"
    "\n"
    "If installed with 'cni.repair.deletePods=true', this pod should automatically be deleted and retry.\n"
    "Otherwise, this pod will need to be manually removed so that it is scheduled on a node with istio-cni "
    "running, allowing iptables rules to be established."
)

SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST, at SOL_IPV6
_RETRY = 0.2  # seconds between client attempts


@dataclass(frozen=True)
class Probe:
    """Where to listen, whom to connect to, and as whom."""

    listen: tuple[str, ...]  # loopback address per family, e.g. ("127.0.0.1",)
    ports: tuple[int, ...]  # proxy port, inbound capture port
    probe_ip: str
    probe_port: int
    uid: int | None
    gid: int | None
    timeout: float


def _owner(value: str, lookup: str) -> int:
    if value.isdigit():
        return int(value)
    if lookup == "user":
        return pwd.getpwnam(value).pw_uid
    return grp.getgrnam(value).gr_gid


def probe_for(config: Config, opts: ApplyOptions, *, ipv6: bool = False) -> Probe:
    """The probe Istio runs for this configuration (IPv6 when the pod's address is IPv6)."""
    uid = _owner(config.proxy_uids[0], "user") if config.proxy_uids else None
    gid = _owner(config.proxy_gids[0], "group") if config.proxy_gids else None
    return Probe(
        listen=("::1",) if ipv6 else ("127.0.0.1",),
        ports=(config.proxy_port, config.inbound_capture_port),
        probe_ip="::6" if ipv6 else "127.0.0.6",
        probe_port=opts.iptables_probe_port,
        uid=uid,
        gid=gid,
        timeout=opts.probe_timeout,
    )


def validate(config: Config, opts: ApplyOptions, *, ipv6: bool = False, netns: Netns | None = None) -> None:
    """Run the probe in the target namespace (``netns`` when the caller opened it already, else
    ``opts.network_namespace``); raise ApplyError(MESSAGE, 126) when it fails."""
    ns = netns or open_target(opts.network_namespace)
    try:
        ok, detail = run_probe(probe_for(config, opts, ipv6=ipv6), ns if opts.network_namespace else None)
    finally:
        if netns is None:
            ns.close()
    if not ok:
        print(f"validation failed: {detail}", file=sys.stderr)
        raise ApplyError(MESSAGE, EXIT_CODE, VALIDATION)
    print(f"validation passed: {detail}", file=sys.stderr)


def run_probe(probe: Probe, netns: Netns | None) -> tuple[bool, str]:
    """Fork a child that enters ``netns`` (stays here for None) and runs the probe; (passed,
    what happened)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 2
        try:
            os.close(r)
            if netns is not None:
                setns(netns.fd)
            ok, detail = _serve(probe)
            code = 0 if ok else 1
        except BaseException as e:
            detail = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(w, detail.encode()[:4000])
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + probe.timeout + 5
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return False, "validation timeout"
        else:
            time.sleep(0.02)
    with os.fdopen(r, "rb") as f:
        detail = f.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status) == 0, detail


def _serve(probe: Probe) -> tuple[bool, str]:  # pragma: no cover - runs in the child
    listeners: list[socket.socket] = []
    errors: list[str] = []
    for addr in probe.listen:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        for port in probe.ports:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind((addr, port))
                s.listen(16)
            except OSError as e:
                errors.append(f"listen {addr}:{port}: {e.strerror}")
                s.close()
                continue
            s.setblocking(False)
            listeners.append(s)
    if not listeners:
        return False, "no listener available: " + "; ".join(errors)
    client = os.fork()
    if client == 0:
        _client(probe)
    try:
        deadline = time.monotonic() + probe.timeout
        seen: list[int] = []
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(listeners, [], [], left)
            for s in ready:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                with conn:
                    port = _original_port(conn)
                    seen.append(port)
                    if port == probe.probe_port:
                        where = conn.getsockname()
                        return True, (
                            f"{probe.probe_ip}:{probe.probe_port} was redirected to {where[0]}:{where[1]}"
                        )
        extra = f" (saw original ports {seen})" if seen else ""
        return (
            False,
            f"no connection to {probe.probe_ip}:{probe.probe_port} captured in {probe.timeout}s{extra}",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(client, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(client, 0)


def _client(probe: Probe) -> None:  # pragma: no cover - runs in a grandchild
    """Connect again and again as the proxy's uid/gid (the rules capture only the proxy on lo)."""
    try:
        if os.geteuid() == 0:
            if probe.gid is not None:
                os.setgroups([])
                os.setgid(probe.gid)
            if probe.uid is not None:
                os.setuid(probe.uid)
        fam = socket.AF_INET6 if ":" in probe.probe_ip else socket.AF_INET
        local = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
        deadline = time.monotonic() + probe.timeout
        while time.monotonic() < deadline:
            with socket.socket(fam, socket.SOCK_STREAM) as c:
                c.settimeout(1)
                with contextlib.suppress(OSError):
                    c.bind((local, 0))
                    c.connect((probe.probe_ip, probe.probe_port))
            time.sleep(_RETRY)
    finally:
        os._exit(0)


def _original_port(conn: socket.socket) -> int:
    """The destination port the connection had before NAT (0 when there was no NAT)."""
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        else:
            raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return 0
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port
