"""Connection rate through the capture rules: new outbound TCP connections per second from a pod
network namespace, with 0, 1,000 and 10,000 excluded CIDRs, for the iptables backend
(iptables-nft) and for native nftables (lists longer than NFT_SET_THRESHOLD as one set).

Every point is a namespace of its own, set up once: lo, a veth pair (both ends in the namespace)
carrying the pod address and the default route, so that a packet to the destination leaves by a
non-loopback interface, and the classic rules with N excluded CIDRs, planned and rendered by the
project and loaded with ``iptables-nft-restore`` / ``ip6tables-nft-restore`` or ``nft -f -``
(10,000 CIDRs do not fit in one command-line argument). The CIDRs are every other /24 from
10.0.0.0: nft merges adjacent elements of an interval set, and 10,000 adjacent /24s would become
one range. The destination (TEST-NET-1) is in none of them, so each connection's first packet
walks ISTIO_OUTPUT to its end and is redirected to 15001, where the peer (connpeer.py) listens.

Each new connection is a new conntrack entry, and only that first packet consults the nat table.
What would otherwise measure the host instead of the rules: TIME_WAIT (the peer closes with a
reset, so no socket is left), ephemeral ports (the namespace's range is widened to 1024-65535),
and the conntrack table (closed entries stay 10 s by default; the namespace's
``nf_conntrack_tcp_timeout_close`` is set to 1 s, and a point's slices are interleaved with the
others', so it starts each slice with its earlier entries expired). The peer reports the
namespace's conntrack entries, insert failures and drops and its TIME_WAIT sockets after each
slice; the redirect rule's packet counter must have counted every connection."""

from __future__ import annotations

import ipaddress
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from istio_iptables.config import Config
from istio_iptables.nftables import render_nft
from istio_iptables.planner import NFT_SET_THRESHOLD, plan, plan_nft
from istio_iptables.render import render_family
from tests.support.netns import Namespaces

from . import proc
from .fixtures import POD_IPV4

BACKENDS = ("iptables", "nftables")
CIDR_COUNTS = (0, 1_000, 10_000)
DESTINATION = "192.0.2.1"
DESTINATION_PORT = 80
PROXY_PORT = 15001
SLICE_SECONDS = 0.25
WARMUP_SECONDS = 0.2
CLOSE_TIMEOUT = 1
PORT_RANGE = "1024 65535"
PEER = Path(__file__).resolve().parent / "connpeer.py"
_CIDR = re.compile(r"\b10\.\d+\.\d+\.0/24\b")


def spaced_cidrs(count: int) -> tuple[ipaddress.IPv4Network, ...]:
    """``count`` /24 ranges with a gap after each: 10.0.0.0/24, 10.0.2.0/24, ..."""
    return tuple(ipaddress.IPv4Network((0x0A000000 + (2 * i << 8), 24)) for i in range(count))


@dataclass
class Point:
    backend: str
    cidrs: int
    ns: str
    slices: list[dict[str, Any]] = field(default_factory=list)
    load_ms: float = 0.0
    rule_lines: int = 0
    warmup_connections: int = 0
    redirect_counter: int | None = None
    failure: str = ""

    @property
    def key(self) -> str:
        return f"{self.backend}.{self.cidrs}"

    def summary(self) -> dict[str, Any]:
        conns = sum(s["connections"] for s in self.slices)
        secs = sum(s["seconds"] for s in self.slices)
        rates = [s["connections"] / s["seconds"] for s in self.slices if s["seconds"] > 0]
        out: dict[str, Any] = {
            "backend": self.backend,
            "excluded_cidrs": self.cidrs,
            "status": "failed" if self.failure else "ok",
            "load_ms": round(self.load_ms, 1),
            "rule_lines": self.rule_lines,
            "slices": len(self.slices),
            "seconds": round(secs, 3),
            "connections": conns,
            "failures": sum(s["failures"] for s in self.slices),
            "redirect_counter": self.redirect_counter,
            "warmup_connections": self.warmup_connections,
        }
        if self.failure:
            out["reason"] = self.failure
        if secs > 0:
            out.update(
                # The median of the slices: a slice that something else on the machine slowed
                # moves it less than the total (connections / seconds, beside it).
                conn_per_s=round(statistics.median(rates), 1),
                total_conn_per_s=round(conns / secs, 1),
                slice_conn_per_s=[round(r, 1) for r in rates],
                us_per_connection=round(1e6 / statistics.median(rates), 2),
            )
        if self.slices:
            out.update(
                slowest_connect_ms=max(s["slowest_ms"] for s in self.slices),
                max_conntrack_entries=max(s.get("conntrack_entries", 0) for s in self.slices),
                max_time_wait=max(s.get("tcp_time_wait", 0) for s in self.slices),
                **{
                    k: self.slices[-1].get(k, 0)
                    for k in ("conntrack_insert_failed", "conntrack_drop", "conntrack_early_drop")
                },
            )
        return out


class ConnRate:
    """Sets the points up, measures them interleaved, and summarises them."""

    def __init__(self, base: Config, ns: Namespaces, python: str, *, seconds_per_point: float) -> None:
        self.base = base
        self.ns = ns
        self.python = python
        self.rounds = max(1, round(seconds_per_point / SLICE_SECONDS))
        self.points: list[Point] = []

    @staticmethod
    def _nsenter(name: str, *argv: str) -> list[str]:
        return ["nsenter", f"--net={Namespaces.path(name)}", "--", *argv]

    def _prepare(self, name: str) -> None:
        script = (
            "link set lo up\n"
            "link add eth0 type veth peer name eth1\n"
            "link set eth0 up\n"
            "link set eth1 up\n"
            f"addr add {POD_IPV4}/24 dev eth0\n"
            "route add default dev eth0\n"
        )
        r = proc.run(["ip", "-n", name, "-batch", "-"], stdin=script.encode(), timeout=30)
        if not r.ok:
            raise RuntimeError(f"cannot set up the pod interface: {r.describe()}")

    def _sysctls(self, name: str) -> None:
        # After the rules: conntrack's per-namespace settings exist once it is in use there.
        r = proc.run(
            self._nsenter(
                name, "sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={PORT_RANGE}",
                f"net.netfilter.nf_conntrack_tcp_timeout_close={CLOSE_TIMEOUT}",
            ),
            timeout=30,
        )  # fmt: skip
        if not r.ok:
            raise RuntimeError(f"sysctl: {r.describe()}")

    def _load(self, p: Point) -> None:
        cfg = self.base._replace(outbound_ip_ranges_exclude=spaced_cidrs(p.cidrs))
        start = time.perf_counter()
        if p.backend == "nftables":
            loads = [("nft", ["nft", "-f", "-"], render_nft(plan_nft(cfg).rules))]
        else:
            rs = plan(cfg)
            loads = [("iptables-nft-restore", ["iptables-nft-restore", "--noflush"], render_family(rs.v4))]
            if rs.v6 is not None:
                loads.append(
                    ("ip6tables-nft-restore", ["ip6tables-nft-restore", "--noflush"], render_family(rs.v6))
                )
        for what, argv, doc in loads:
            r = proc.run(self._nsenter(p.ns, *argv), stdin=doc.encode(), timeout=120)
            if not r.ok:
                raise RuntimeError(f"{what}: {r.describe()}")
        p.load_ms = (time.perf_counter() - start) * 1000
        listing = self._listing(p, counters=False)
        found = len(_CIDR.findall(listing))
        if found != p.cidrs:
            raise RuntimeError(f"{found} of the {p.cidrs} excluded CIDRs are in the nat table")
        if p.backend == "nftables" and p.cidrs > NFT_SET_THRESHOLD and "ip daddr {" not in listing:
            raise RuntimeError("the excluded CIDRs are not one set")
        p.rule_lines = _rule_lines(p.backend, listing)

    def _listing(self, p: Point, *, counters: bool) -> str:
        if p.backend == "nftables":
            argv = ["nft", "list", "table", "inet", "istio-proxy-nat"]
            if not counters:
                argv.insert(1, "-s")
        else:
            argv = ["iptables-nft-save", "-t", "nat", *(["-c"] if counters else [])]
        r = proc.run(self._nsenter(p.ns, *argv), timeout=60)
        if not r.ok:
            raise RuntimeError(r.describe())
        return r.stdout.decode()

    def _redirect_counter(self, p: Point) -> int | None:
        text = self._listing(p, counters=True)
        if p.backend == "nftables":
            m = re.search(r"counter packets (\d+) bytes \d+ redirect to :" + str(PROXY_PORT), text)
        else:
            m = re.search(r"^\[(\d+):\d+\] -A ISTIO_REDIRECT .*--to-ports " + str(PROXY_PORT), text, re.M)
        return int(m.group(1)) if m else None

    def _slice(self, p: Point, seconds: float) -> dict[str, Any]:
        argv = self._nsenter(p.ns, self.python, "-S", str(PEER), str(seconds), DESTINATION,
                             str(DESTINATION_PORT), str(PROXY_PORT))  # fmt: skip
        r = proc.run(argv, timeout=seconds + 60)
        if not r.ok:
            raise RuntimeError(r.describe())
        doc: dict[str, Any] = json.loads(r.stdout)
        if doc["failures"]:
            raise RuntimeError(f"{doc['failures']} connects failed")
        if doc["accepted"] != doc["connections"]:
            raise RuntimeError(f"{doc['connections']} connections but {doc['accepted']} accepted")
        for k in ("conntrack_insert_failed", "conntrack_drop", "conntrack_early_drop"):
            if doc.get(k):
                raise RuntimeError(f"conntrack {k.split('_', 1)[1]}: {doc[k]} (the table, not the rules)")
        return doc

    def setup(self) -> None:
        for backend in BACKENDS:
            for n in CIDR_COUNTS:
                p = Point(backend, n, self.ns.create_one())
                self.points.append(p)
                try:
                    self._prepare(p.ns)
                    self._load(p)
                    self._sysctls(p.ns)
                except (RuntimeError, OSError, ValueError) as e:
                    p.failure = str(e)

    def run(self, log: Callable[[str], None]) -> None:
        """A warm-up slice per point (it also proves the redirect), then ``rounds`` slices each,
        round-robin with the starting point rotating."""
        for p in self.points:
            if p.failure:
                continue
            try:
                p.warmup_connections = self._slice(p, WARMUP_SECONDS)["connections"]
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                p.failure = str(e)
        for i in range(self.rounds):
            live = [p for p in self.points if not p.failure]
            k = i % len(live) if live else 0
            for p in live[k:] + live[:k]:
                try:
                    p.slices.append(self._slice(p, SLICE_SECONDS))
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    p.failure = str(e)
            log(f"connection rate round {i + 1}/{self.rounds}")
        for p in self.points:
            if p.failure:
                continue
            try:
                p.redirect_counter = self._redirect_counter(p)
            except RuntimeError as e:
                p.failure = str(e)
                continue
            # Every connection is one new conntrack entry, so one trip through the nat table:
            # those of the slices, the warm-up, and each slice's probe.
            made = p.warmup_connections + sum(s["connections"] + s["failures"] for s in p.slices)
            made += len(p.slices) + 1
            if p.redirect_counter != made:
                p.failure = f"the redirect rule counted {p.redirect_counter} packets for {made} connections"

    def teardown(self) -> None:
        self.ns.delete([p.ns for p in self.points])

    def result(self) -> dict[str, Any]:
        points = [p.summary() for p in self.points]
        by = {(pt["backend"], pt["excluded_cidrs"]): pt for pt in points}
        for pt in points:
            zero = by.get((pt["backend"], 0), {})
            if pt.get("conn_per_s") and zero.get("conn_per_s"):
                pt["vs_zero"] = round(pt["conn_per_s"] / zero["conn_per_s"], 3)
        failed = [pt for pt in points if pt["status"] != "ok"]
        return {
            "status": "failed" if failed else "ok",
            **({"reason": f"{failed[0]['backend']} {failed[0]['excluded_cidrs']}: {failed[0]['reason']}"}
               if failed else {}),
            "method": {
                "destination": f"{DESTINATION}:{DESTINATION_PORT}",
                "redirected_to": PROXY_PORT,
                "slice_seconds": SLICE_SECONDS,
                "slices_per_point": self.rounds,
                "warmup_seconds": WARMUP_SECONDS,
                "client": f"{Path(self.python).name} -S {PEER.name} (blocking connect, SO_LINGER 0)",
                "ip_local_port_range": PORT_RANGE,
                "nf_conntrack_tcp_timeout_close": CLOSE_TIMEOUT,
                "nf_conntrack_max": _read_int("/proc/sys/net/netfilter/nf_conntrack_max"),
                "nft_set_threshold": NFT_SET_THRESHOLD,
                "cidrs": "every other /24 from 10.0.0.0/24",
            },
            "points": points,
        }  # fmt: skip


def _rule_lines(backend: str, listing: str) -> int:
    """Rules in the nat table listing (IPv4 only for iptables, both families for nftables)."""
    if backend == "iptables":
        return sum(1 for line in listing.splitlines() if line.startswith("-A "))
    skip = ("table ", "chain ", "type ", "}")
    return sum(1 for line in listing.splitlines() if line.strip() and not line.strip().startswith(skip))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
