"""The test peer of the connection-rate item, run inside a pod namespace with ``nsenter --net``:
``python -S connpeer.py SECONDS DESTINATION PORT LISTEN_PORT``.

It listens on LISTEN_PORT (the proxy's 15001), forks an acceptor that accepts and closes, then
for SECONDS opens one blocking TCP connection after another to DESTINATION:PORT and closes each
with a reset (SO_LINGER 0: no TIME_WAIT on either side, so no port is held). DESTINATION is
routed out of a non-loopback interface and matched by no exclusion, so each SYN walks the nat
OUTPUT chain to its end and is redirected to the listener; nothing else listens, so a connect
succeeds only through the redirect. A first connect with a time-out proves that before the loop.

Prints one JSON object: connections, failures, seconds (of the loop), accepted (by the acceptor,
the probe left out), slowest_ms (the slowest connect), and the namespace's conntrack and TCP
state after the loop (entries, insert failures and drops, sockets in TIME_WAIT)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time


def _acceptor(listener: socket.socket, report: int) -> None:
    count = 0

    def stop(signum: int, frame: object) -> None:
        os.write(report, str(count).encode())
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    accept, close = listener._accept, os.close  # type: ignore[attr-defined]
    while True:
        fd, _ = accept()
        close(fd)
        count += 1


def _conntrack_stats() -> dict[str, int]:
    """This namespace's conntrack counters (summed over CPUs) and its TIME_WAIT sockets."""
    out: dict[str, int] = {}
    with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        out["conntrack_entries"] = int(f.read())
    with open("/proc/net/stat/nf_conntrack") as f:
        head, *rows = f.read().split("\n")
    names = head.split()
    for key in ("insert_failed", "drop", "early_drop", "clashres"):
        if key in names:
            i = names.index(key)
            out[f"conntrack_{key}"] = sum(int(r.split()[i], 16) for r in rows if r.strip())
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                out["tcp_time_wait"] = int(words[words.index("tw") + 1])
    return out


def main() -> int:
    seconds, dst, port, listen_port = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", listen_port))
    listener.listen(4096)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _acceptor(listener, w)
    os.close(w)
    listener.close()
    addr = (dst, port)
    linger = struct.pack("ii", 1, 0)
    try:
        with socket.create_connection(addr, timeout=2) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    except OSError as e:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        sys.stderr.write(f"connpeer: no connection to {dst}:{port} through the redirect: {e}\n")
        return 1
    new, sol, so_linger, clock = socket.socket, socket.SOL_SOCKET, socket.SO_LINGER, time.perf_counter
    ok = failed = 0
    slowest = 0.0
    start = t = clock()
    end = start + seconds
    while t < end:
        s = new()
        s.setsockopt(sol, so_linger, linger)
        try:
            s.connect(addr)
            ok += 1
        except OSError:
            failed += 1
        s.close()
        t1 = clock()
        if t1 - t > slowest:
            slowest = t1 - t
        t = t1
    elapsed = t - start
    stats = _conntrack_stats()
    time.sleep(0.05)  # the acceptor drains its queue
    os.kill(pid, signal.SIGTERM)
    accepted = int(os.read(r, 64) or b"-1")
    os.waitpid(pid, 0)
    doc = {"connections": ok, "failures": failed, "seconds": elapsed, "accepted": accepted - 1,
           "slowest_ms": round(slowest * 1000, 3), **stats}  # fmt: skip
    sys.stdout.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
