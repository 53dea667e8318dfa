"""A running pod's network namespace, found from the node, and whether our rules are in it.

Finding it, by the pod's IP (what the API tells about a sandbox), the way Istio's repair does:

1. the namespaces the runtime pinned (containerd and CRI-O bind them under /var/run/netns), each
   entered and its addresses read over netlink (istio_iptables/netlink.py);
2. else every process of the node's /proc: each namespace once (by its nsfs inode, however many
   processes share it), and of a namespace holding the IP the oldest process's (the sandbox's
   pause process outlives the containers that come and go).

The namespace is returned open (istio_iptables/netns.py): what is checked and repaired is that
namespace, even if a process exits or a path is reused meanwhile.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import NamedTuple

from istio_iptables import netlink
from istio_iptables.netns import Netns, NetnsError, open_netns

log = logging.getLogger("install-cni")

# Seconds to wait for a namespace's lock while a plugin or another check holds it.
LOCK_WAIT = 10


class Found(NamedTuple):
    ns: Netns
    path: str  # how it was found (a pinned file, or /proc/PID/ns/net)
    how: str  # "pinned" or "proc"


def _addresses(ns: Netns) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {ipaddress.ip_address(a) for a in netlink.in_netns(ns, netlink.local_addresses)}


def _start_time(proc: str, pid: str) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"{proc}/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ")".
    return int(stat.rpartition(b")")[2].split()[19])


def find_pod_netns(ip: str, netns_dirs: tuple[str, ...], proc: str) -> Found | None:
    """The network namespace holding ``ip`` (None: no such namespace on this node)."""
    want = ipaddress.ip_address(ip)
    seen: set[tuple[int, int]] = set()
    try:
        own = open_netns(None)
        seen.add(own.identity())
        own.close()
    except NetnsError:
        pass
    for d in netns_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            found = _check(path, want, seen)
            if found is not None:
                return Found(found, path, "pinned")
    if not proc:
        return None
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError as e:
        log.warning("cannot list the node's processes in %s: %s", proc, e.strerror)
        return None
    # Each namespace once, by its inode, named by its oldest process.
    oldest: dict[tuple[int, int], tuple[int, str]] = {}
    for pid in pids:
        path = f"{proc}/{pid}/ns/net"
        try:
            st = os.stat(path)
            started = _start_time(proc, pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to look at
        ident = (st.st_dev, st.st_ino)
        if ident not in seen and (ident not in oldest or started < oldest[ident][0]):
            oldest[ident] = (started, path)
    matching: list[tuple[int, str, Netns]] = []
    for started, path in oldest.values():
        ns = _check(path, want, set())
        if ns is not None:
            matching.append((started, path, ns))
    if not matching:
        return None
    matching.sort(key=lambda m: m[0])
    for _, _, other in matching[1:]:
        other.close()
    return Found(matching[0][2], matching[0][1], "proc")


def _check(
    path: str, want: ipaddress.IPv4Address | ipaddress.IPv6Address, seen: set[tuple[int, int]]
) -> Netns | None:
    try:
        ns = open_netns(path)
    except NetnsError:
        return None
    try:
        ident = ns.identity()
        if ident in seen:
            ns.close()
            return None
        seen.add(ident)
        if want in _addresses(ns):
            return ns
    except (netlink.NetlinkError, OSError, ValueError):
        pass
    ns.close()
    return None


def capture_rules(ns: Netns) -> list[str]:
    """Where our rules are in the namespace: "nftables" (Istio's inet tables), and per family
    and iptables backend (e.g. "iptables-nft IPv4") those holding an ISTIO chain. Empty: none.
    Holds the namespace's lock while reading, so a plugin's apply is never read half-done."""
    from istio_iptables import backend as backends
    from istio_iptables.apply import table_presence
    from istio_iptables.executor import RealExecutor
    from istio_iptables.nft_apply import OUR_TABLES

    found: list[str] = []
    ns.lock(LOCK_WAIT)
    try:
        with ns.entered():
            try:
                if set(netlink.nft_table_names(netlink.NFPROTO_INET)) & OUR_TABLES:
                    found.append("nftables")
            except netlink.NetlinkError as e:
                log.debug("cannot list the nf_tables tables: %s", e)
            executor = RealExecutor()
            for (family, variant), present in sorted(table_presence().items(), key=str):
                if not present:
                    continue
                b = backends.find(family, variant)
                if b is None:
                    continue
                res = executor.run([b.save], timeout=30)
                if res.ok and any(line.startswith(":ISTIO_") for line in res.stdout.splitlines()):
                    found.append(f"{b.name} IPv{family.value}")
    finally:
        ns.unlock()
    return found
