"""``--explain`` against the kernel: for generated (configuration, packet) pairs, for the three
backends (iptables-nft, iptables-legacy, native nftables) and both families, the configuration is
applied in a pod namespace, the packet is sent for real (a TCP connect or a UDP datagram from a
socket of that uid/gid, with that source, mark and route, or arriving from the peer through a
veth), and where it lands (the listener on the redirect / TPROXY / DNS port, the listener at its
original destination, or nowhere) must be what both the planned walk and the ``--live`` walk of
what the namespace holds say.

One topology for the whole module (a pod and a peer joined by eth0 and eth1, listeners in both,
and one long-lived client process in each that sends a whole batch of packets at once), reset
between configurations. The generator is seeded: ``EXPLAIN_SEED=N`` repeats a run, and every
failure names its seed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from istio_iptables import explain as x
from istio_iptables import explain_live as el
from istio_iptables.cli import PROG_IPTABLES, parse
from istio_iptables.netns import open_netns
from istio_iptables.packet import parse_packet
from tests.support.netns import NetNS, run
from tests.support.topology import (
    COMMAND_DIR,
    LINKS,
    PYTHON,
    SERVICE_A,
    SERVICE_B,
    V4,
    V6,
    VIRT_VIA_LINK,
    Topology,
)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

BACKENDS = ("nft", "legacy", "nftables")
CONFIGS_PER_BACKEND = int(os.environ.get("EXPLAIN_CONFIGS", "20"))
PROBES_PER_CONFIG = int(os.environ.get("EXPLAIN_PROBES", "20"))
SEED = int(os.environ.get("EXPLAIN_SEED", str(secrets.randbelow(10**9))))
BATCH_TIMEOUT = 1.5

PROXY = 1337
APP = 1000
OTHER = 2000
# Listeners: the proxy (capture ports), the application in the pod, the peer (destinations).
PROXY_TCP = (15001, 15006, 15053)
PROXY_UDP = (15053,)
APP_TCP = (8080, 8081, 15008, 15090, 15021)
APP_UDP = (8080,)
PEER_TCP = (8000, 9000, 53, 7777)
PEER_UDP = (53, 8000)
FAM = {V4: 4, V6: 6}
# Source ports are never reused within a run (no connection meets the TIME_WAIT of an earlier
# one): each backend draws from its own range, so a seed gives the same pairs whichever run.
SPORTS = {b: range(20000 + i * 13000, 33000 + i * 13000) for i, b in enumerate(BACKENDS)}

CIDR_POOL = {
    V4: ["10.20.0.0/16", "10.30.0.1/32", "10.10.0.0/24", "10.11.0.0/24", "10.99.0.0/16", "10.10.0.2/32"],
    V6: ["fd00:20::/32", "fd00:30::1/128", "fd00:10::/64", "fd00:11::/64", "fd00:99::/32", "fd00:10::2/128"],
}


# --------------------------------------------------------------------------- the client agent

_AGENT = r"""
import errno, json, os, select, socket, sys, time
SO_MARK = 36

def finish(results, st, poller, fd, result):
    i, s = st.pop(fd)[:2]
    poller.unregister(fd)
    s.close()
    results[i] = result

def run(batch, timeout):
    results = [None] * len(batch)
    st = {}
    poller = select.poll()
    for i, p in enumerate(batch):
        af = socket.AF_INET if p["family"] == 4 else socket.AF_INET6
        kind = socket.SOCK_STREAM if p["proto"] == "tcp" else socket.SOCK_DGRAM
        try:
            # The owner match reads the credentials the socket is created with (fsuid/fsgid).
            os.setegid(p["gid"])
            os.seteuid(p["uid"])
            try:
                s = socket.socket(af, kind)
            finally:
                os.seteuid(0)
                os.setegid(0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if p["mark"]:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, p["mark"])
            s.bind((p["src"], p["sport"]))
            s.setblocking(False)
            if p["proto"] == "tcp":
                err = s.connect_ex((p["dst"], p["dport"]))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                st[s.fileno()] = [i, s, "connecting", b""]
                poller.register(s, select.POLLOUT)
            else:
                s.connect((p["dst"], p["dport"]))
                s.send(p["token"].encode())
                st[s.fileno()] = [i, s, "reading", b""]
                poller.register(s, select.POLLIN)
        except OSError as e:
            results[i] = {"error": f"{type(e).__name__}: {e}"}
    deadline = time.monotonic() + timeout
    while st:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, ev in poller.poll(left * 1000):
            if fd not in st:
                continue
            i, s, state, buf = st[fd]
            p = batch[i]
            try:
                if state == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send((p["token"] + "\n").encode())
                    st[fd][2] = "reading"
                    poller.modify(fd, select.POLLIN)
                    continue
                chunk = s.recv(65536)
                if p["proto"] == "tcp" and chunk:
                    st[fd][3] = buf + chunk
                    continue
                data = chunk if p["proto"] == "udp" else buf
                if data.strip():
                    finish(results, st, poller, fd, {"reply": json.loads(data.decode())})
                else:
                    finish(results, st, poller, fd, {"error": "closed without a reply"})
            except (OSError, ValueError) as e:
                finish(results, st, poller, fd, {"error": f"{type(e).__name__}: {e}"})
    for fd in list(st):
        finish(results, st, poller, fd, {"error": "no answer (timeout)"})
    return results

for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps(run(req["batch"], req["timeout"])), flush=True)
"""


class Agent:
    """A root process inside a namespace that sends batches of probes (see _AGENT)."""

    def __init__(self, ns: NetNS) -> None:
        argv = ["nsenter", f"--net={ns.path}", "--", PYTHON, "-I", "-S", "-c", _AGENT]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, batch: list[dict[str, Any]], timeout: float = BATCH_TIMEOUT) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"batch": batch, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client agent exited {self.proc.wait()}")
        out: list[dict[str, Any]] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------- topology


@dataclass
class Lab:
    topo: Topology
    pod_agent: Agent
    peer_agent: Agent

    @property
    def pod(self) -> NetNS:
        return self.topo.pod


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topo = Topology.create(links=2, hint="explain")
    agents: list[Agent] = []
    try:
        topo.listen(topo.pod, "proxy", tcp=PROXY_TCP, udp=PROXY_UDP, uid=PROXY, gid=PROXY, transparent=True)
        topo.listen(topo.pod, "app", tcp=APP_TCP, udp=APP_UDP, uid=APP, gid=APP)
        topo.listen(topo.peer, "peer", tcp=PEER_TCP, udp=PEER_UDP)
        agents = [Agent(topo.pod), Agent(topo.peer)]
        yield Lab(topo, agents[0], agents[1])
    finally:
        for a in agents:
            a.close()
        topo.close()


def _in_ns(ns: NetNS, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", f"--net={ns.path}", "--", *argv], **kw)


def reset(ns: NetNS) -> None:
    """No rules of any backend, no policy rules beyond the defaults, no route table 133, no
    conntrack entries; without the commands under test."""
    _in_ns(ns, ["nft", "flush", "ruleset"])  # native tables and iptables-nft's
    for cmd in ("iptables-legacy", "ip6tables-legacy"):
        names = "ip_tables_names" if cmd.startswith("iptables") else "ip6_tables_names"
        tables = _in_ns(ns, ["cat", f"/proc/net/{names}"], check=False).stdout.split()
        if tables:
            doc = "".join(f"*{t}\nCOMMIT\n" for t in tables)
            _in_ns(ns, [f"{cmd}-restore"], input=doc)
    for fam in ("-4", "-6"):
        for line in _in_ns(ns, ["ip", fam, "rule", "show"]).stdout.splitlines():
            prio = line.split(":", 1)[0].strip()
            if prio not in ("0", "32766", "32767"):
                _in_ns(ns, ["ip", fam, "rule", "del", "priority", prio])
        _in_ns(ns, ["ip", fam, "route", "flush", "table", "133"], check=False)
    _in_ns(ns, ["conntrack", "-F"], check=False)
    _in_ns(ns, ["conntrack", "-F", "-f", "ipv6"], check=False)


# --------------------------------------------------------------------------- generation


@dataclass
class Config:
    args: list[str]
    env: dict[str, str]
    mode: str
    mark: int
    kube_virt: tuple[str, ...]

    def argv(self, ns: NetNS, backend: str) -> list[str]:
        chosen = ["--native-nftables"] if backend == "nftables" else ["--force-iptables-binary", backend]
        return [*self.args, "--network-namespace", ns.path, *chosen]

    def shown(self, backend: str) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{env + ' ' if env else ''}istio-iptables {' '.join(self.args)} [{backend}]"


def _subset(rng: random.Random, items: list[Any], p: float = 0.4) -> list[Any]:
    return [i for i in items if rng.random() < p]


def gen_config(rng: random.Random, backend: str) -> Config:
    mode = rng.choice(["REDIRECT", "TPROXY"])
    args = ["-p", "15001", "-z", "15006", "-u", str(PROXY), "-g", str(PROXY), "-m", mode, "--enable-ipv6"]
    pool = CIDR_POOL[V4] + CIDR_POOL[V6]
    include = rng.choices(["*", "", "list"], [5, 1, 4])[0]
    args += ["-i", ",".join(_subset(rng, pool)) if include == "list" else include]
    args += ["-x", ",".join(_subset(rng, pool, 0.2))]
    inbound = rng.choices(["*", "", "list"], [5, 1, 4])[0]
    if inbound == "list":
        args += ["-b", ",".join(str(p) for p in _subset(rng, [8080, 8081, 15090, 15008], 0.5))]
    else:
        args += ["-b", inbound]
        if inbound == "*":
            args += ["-d", ",".join(str(p) for p in _subset(rng, [8081, 15090, 15021], 0.4))]
    args += ["-q", ",".join(str(p) for p in _subset(rng, [9000, 8000], 0.3))]
    args += ["-o", ",".join(str(p) for p in _subset(rng, [9000, 53, 7777], 0.3))]
    if rng.random() < 0.25:
        args += ["-c", "eth1"]
    # iptables' '+' wildcard is not an nft one (see the report): native nftables gets exact names.
    virt_choices = [(), ("eth1",), ("eth+",)] if backend != "nftables" else [(), ("eth1",)]
    virt = rng.choices(virt_choices, [6, 3, 2][: len(virt_choices)])[0]
    if virt:
        args += ["-k", ",".join(virt)]
    mark = 1337
    if mode == "TPROXY" and rng.random() < 0.3:
        mark = 1400
        args += ["-t", str(mark)]
    dns = rng.choices(["none", "servers", "all"], [4, 3, 2])[0]
    if dns == "servers":
        args += ["--redirect-dns", "--dns-servers", f"{LINKS[0].peer_v4},{LINKS[0].peer_v6}"]
    elif dns == "all":
        args += ["--redirect-dns", "--capture-all-dns"]
    if rng.random() < 0.2:
        args.append("--drop-invalid")
    env: dict[str, str] = {}
    groups = rng.random()
    if groups < 0.15:
        env["ISTIO_OUTBOUND_OWNER_GROUPS"] = str(APP)
    elif groups < 0.3:
        env["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"] = str(OTHER)
    if rng.random() < 0.2:
        env["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"] = "127.0.0.0/8"
    return Config(args, env, mode, mark, virt)


@dataclass
class Probe:
    side: str  # pod (out) or peer (in)
    family: str
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    uid: int = 0
    gid: int = 0
    mark: int = 0
    oif: str = ""
    iif: str = ""
    token: str = field(default_factory=lambda: secrets.token_hex(6))

    def description(self) -> str:
        def ep(a: str, p: int) -> str:
            return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"

        d = "out" if self.side == "pod" else "in"
        text = f"{d} {self.proto} {ep(self.src, self.sport)} -> {ep(self.dst, self.dport)}"
        if d == "out":
            text += f" uid={self.uid} gid={self.gid} oif={self.oif}"
            if self.mark:
                text += f" mark={self.mark}"
        else:
            text += f" iif={self.iif}"
        return text

    def request(self) -> dict[str, Any]:
        return {
            "family": FAM[self.family],
            "proto": self.proto,
            "src": self.src,
            "sport": self.sport,
            "dst": self.dst,
            "dport": self.dport,
            "uid": self.uid,
            "gid": self.gid,
            "mark": self.mark,
            "token": self.token,
        }

    @property
    def reachable(self) -> bool:
        """Whether a listener holds the destination: every one a pod process sends to does; an
        arriving packet for a kube-virt range is not for the pod, which does not forward."""
        return self.side == "pod" or not any(self.dst in (v[V4], v[V6]) for v in VIRT_VIA_LINK)


def gen_probe(rng: random.Random, cfg: Config, ports: range, sports: set[int]) -> Probe:
    family = rng.choice([V4, V6])
    proto = rng.choices(["tcp", "udp"], [7, 3])[0]
    sport = rng.choice(ports)
    while sport in sports:
        sport = rng.choice(ports)
    sports.add(sport)
    if rng.random() < 0.6:  # sent by a process in the pod
        uid = rng.choices([APP, PROXY, OTHER], [5, 4, 2])[0]
        gid = rng.choices([uid, PROXY, APP], [6, 2, 1])[0]
        kind = rng.choices(["peer0", "peer1", "service", "loopback", "self"], [4, 2, 2, 2, 3])[0]
        mark = 0
        if kind in ("peer0", "peer1", "service"):
            link = LINKS[1] if kind == "peer1" else LINKS[0]
            dst = link.peer(family) if kind != "service" else rng.choice([SERVICE_A, SERVICE_B])[family]
            src, oif = link.pod(family), link.ifname
            dport = rng.choice(PEER_TCP if proto == "tcp" else PEER_UDP)
        else:
            if kind == "loopback":
                dst = "127.0.0.1" if family == V4 else "::1"
                src = rng.choice([dst, "127.0.0.6" if family == V4 else "::6"])
            else:
                dst = rng.choice(LINKS).pod(family)
                src = rng.choice([dst, "127.0.0.6" if family == V4 else "::6"])
            oif = "lo"
            dport = rng.choice(APP_TCP if proto == "tcp" else APP_UDP)
            if rng.random() < 0.3:
                mark = rng.choice([cfg.mark, 1338, 16])
        return Probe("pod", family, proto, src, sport, dst, dport, uid, gid, mark, oif=oif)
    link_no = rng.choice([0, 1])
    link = LINKS[link_no]
    if proto == "tcp" and cfg.kube_virt and rng.random() < 0.3:
        dst, dport = VIRT_VIA_LINK[link_no][family], 8000
    else:
        dst = link.pod(family)
        dport = rng.choice(APP_TCP if proto == "tcp" else APP_UDP)
    return Probe("peer", family, proto, link.peer(family), sport, dst, dport, iif=link.ifname)


# --------------------------------------------------------------------------- checking


def landed(verdict: x.Outcome, walk: x.Walk, probe: Probe, result: dict[str, Any]) -> str | None:
    """None when the kernel's outcome is what ``verdict`` says; else what differs."""
    reply = result.get("reply")
    where = "nowhere" if reply is None else f"{reply['tag']}:{reply['port']}"
    detail = f"landed {where} ({result})"
    dst = (str(ipaddress.ip_address(probe.dst)), probe.dport)

    def local(r: dict[str, Any]) -> tuple[str, int]:
        return str(ipaddress.ip_address(r["local"][0])), int(r["local"][1])

    if verdict.kind == "unknown":
        return f"verdict unknown; {detail}"
    if verdict.kind == "drop":
        return None if reply is None else detail
    if verdict.kind == "not-captured":
        if not probe.reachable:
            return None if reply is None else detail  # the pod does not forward
        if reply is None or reply["tag"] == "proxy" or local(reply) != dst:
            return detail
        return None
    if reply is None or reply["tag"] != "proxy" or reply["port"] != verdict.port:
        return detail
    redirected = any(e["event"] == "rule" and e.get("action", "").startswith("redirect") for e in walk.events)
    if verdict.kind == "redirect" and probe.proto == "tcp":
        od = reply.get("orig_dst")
        if od is None or (str(ipaddress.ip_address(od[0])), int(od[1])) != dst:
            return f"redirected, but the original destination is {od}; {detail}"
    if verdict.kind == "tproxy" and not redirected and local(reply) != dst:
        return f"tproxy, but the socket's local address is {reply['local']}; {detail}"
    return None


def _models(lab: Lab, cfg: Config, backend: str) -> tuple[dict[int, x.Model], dict[int, x.Model]]:
    parsed = parse(PROG_IPTABLES, cfg.argv(lab.pod, backend), env=cfg.env)
    assert not isinstance(parsed, int), cfg.shown(backend)
    config, opts = parsed
    ns = open_netns(lab.pod.path)
    try:
        planned = {f: el.planned_model(config, opts.native_nftables, f) for f in (4, 6)}
        live = {f: el.live_model(ns, f) for f in (4, 6)}
    finally:
        ns.close()
    return planned, live


def _our_chains(model: x.Model) -> dict[str, Any]:
    sig = model.signature()
    ours = {}
    for table, chains in sig.items():
        kept = {n: c for n, c in chains.items() if n.startswith(("ISTIO_", "istio-")) or c[4]}
        if kept:
            ours[table] = kept
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_planned_and_live_verdicts_match_where_real_packets_land(lab: Lab, backend: str) -> None:
    rng = random.Random(f"{SEED}-{backend}")
    started = time.monotonic()
    failures: list[str] = []
    pairs = 0
    families: set[str] = set()
    verdicts: dict[str, int] = {}
    sports: set[int] = set()
    for n in range(CONFIGS_PER_BACKEND):
        cfg = gen_config(rng, backend)
        reset(lab.pod)
        env = {"PATH": os.environ["PATH"], **cfg.env}
        proc = run([str(COMMAND_DIR / "istio-iptables"), *cfg.argv(lab.pod, backend)], env=env, check=False)
        assert proc.returncode == 0, f"seed {SEED}: {cfg.shown(backend)}: {proc.stderr[-2000:]}"
        planned, live = _models(lab, cfg, backend)
        for fam in (4, 6):
            assert _our_chains(live[fam]) == _our_chains(planned[fam]), (
                f"seed {SEED}, config {n}: the live IPv{fam} rules read differently from the planned ones"
                f" for {cfg.shown(backend)}"
            )
        probes = [gen_probe(rng, cfg, SPORTS[backend], sports) for _ in range(PROBES_PER_CONFIG)]
        out = [p for p in probes if p.side == "pod"]
        inb = [p for p in probes if p.side == "peer"]
        results: dict[str, dict[str, Any]] = {}
        for agent, batch in ((lab.pod_agent, out), (lab.peer_agent, inb)):
            if batch:
                for p, r in zip(batch, agent.send([p.request() for p in batch]), strict=True):
                    results[p.token] = r
        for i, p in enumerate(probes):
            packet = parse_packet(p.description())
            fam = packet.family
            pw = x.explain(planned[fam], packet)
            lw = x.explain(live[fam], packet)
            pairs += 1
            families.add(p.family)
            verdicts[pw.verdict.kind] = verdicts.get(pw.verdict.kind, 0) + 1
            where = f"seed {SEED}, config {n}, probe {i}: {cfg.shown(backend)}\n  packet: {p.description()}"
            if pw.verdict.text != lw.verdict.text:
                failures.append(f"{where}\n  planned: {pw.verdict.text}\n  live: {lw.verdict.text}")
                continue
            wrong = landed(pw.verdict, pw, p, results[p.token])
            if wrong is not None:
                failures.append(
                    f"{where}\n  verdict: {pw.verdict.text}\n  kernel: {wrong}\n{x.render_text(pw)}"
                )
        # The command itself, once per configuration: its last line is the in-process verdict.
        p = probes[0]
        cmd = [
            str(COMMAND_DIR / "istio-iptables"),
            "--network-namespace",
            lab.pod.path,
            "--explain",
            p.description(),
            "--live",
        ]
        shown = run(cmd, env={"PATH": os.environ["PATH"]}).stdout.splitlines()[-1]
        expect = x.explain(live[parse_packet(p.description()).family], parse_packet(p.description()))
        assert shown == f"verdict: {expect.verdict.text}", f"seed {SEED}: {' '.join(cmd)}"
    elapsed = time.monotonic() - started
    print(
        f"explain kernel check [{backend}]: seed {SEED}, {pairs} pairs in {elapsed:.1f}s, verdicts {verdicts}"
    )
    assert not failures, f"{len(failures)} of {pairs} pairs disagree (seed {SEED}):\n\n" + "\n\n".join(
        failures[:8]
    )
    assert families == {V4, V6}
