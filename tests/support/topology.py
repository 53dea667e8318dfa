"""A pod and a peer network namespace joined by veth pairs, processes that listen and connect
inside them as a chosen uid/gid, and the one place that applies and removes the capture rules.

Every listener answers each connection or datagram with what it saw (its tag and port, the
peer address, the local address and, for TCP, the original destination), so a single client
call tells which path a packet took. Listeners also report the same line to the test over a pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import NetNS, create_netns, delete_netns, run, veth_pair

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_DIR = REPO_ROOT / ".venv" / "bin"
# Unprivileged test processes need an interpreter every uid can execute (not one under /root).
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"

V4, V6 = "v4", "v6"
FAMILIES = (V4, V6)
# Istio's --force-iptables-binary values, and the native nftables backend (--native-nftables).
IPTABLES_BACKENDS = ("nft", "legacy")
NFTABLES = "nftables"
BACKENDS = (*IPTABLES_BACKENDS, NFTABLES)
REDIRECT, TPROXY = "REDIRECT", "TPROXY"
MODES = (REDIRECT, TPROXY)

PROXY_UID = PROXY_GID = 1337
APP_UID = APP_GID = 1000

# Ports: the proxy's listeners, the application's (inside the pod) and the peer's.
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
DNS_CAPTURE_PORT = 15053
APP_PORT = 8080
APP_PORT_2 = 8081
PEER_PORT = 8000
PEER_PORT_2 = 9000
DNS_PORT = 53

TPROXY_MARK = 1337
TPROXY_TABLE = 133

# Flags every traffic test passes: Istio's ports and proxy ids, spelled out, and both families.
BASE_ARGS = ("-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "--enable-ipv6")

LOOPBACK = {V4: "127.0.0.1", V6: "::1"}
PASSTHROUGH_SOURCE = {V4: "127.0.0.6", V6: "::6"}
# Extra addresses held by the peer, outside the link subnets: "services" for CIDR options.
SERVICE_A = {V4: "10.20.0.1", V6: "fd00:20::1"}
SERVICE_B = {V4: "10.30.0.1", V6: "fd00:30::1"}
# Ranges the peer routes through the pod, one via each link (for --kube-virt-interfaces).
VIRT_RANGE = {V4: "10.99.0.0/16", V6: "fd00:99::/32"}
VIRT_VIA_LINK = ({V4: "10.99.1.5", V6: "fd00:99:1::5"}, {V4: "10.99.2.5", V6: "fd00:99:2::5"})
_VIRT_NET_VIA_LINK = ({V4: "10.99.1.0/24", V6: "fd00:99:1::/64"}, {V4: "10.99.2.0/24", V6: "fd00:99:2::/64"})


@dataclass(frozen=True)
class Link:
    """One veth pair: ``ifname`` on both sides, with fixed addresses (each topology is isolated)."""

    ifname: str
    pod_v4: str
    peer_v4: str
    pod_v6: str
    peer_v6: str

    def pod(self, family: str) -> str:
        return self.pod_v4 if family == V4 else self.pod_v6

    def peer(self, family: str) -> str:
        return self.peer_v4 if family == V4 else self.peer_v6


LINKS = (
    Link("eth0", "10.10.0.1", "10.10.0.2", "fd00:10::1", "fd00:10::2"),
    Link("eth1", "10.11.0.1", "10.11.0.2", "fd00:11::1", "fd00:11::2"),
)

Addr = tuple[str, int]


# --------------------------------------------------------------------------- listeners and clients

_LISTENER = r"""
import json, selectors, socket, struct, sys
cfg = json.loads(sys.argv[1])
ANY = {"v4": (socket.AF_INET, "0.0.0.0"), "v6": (socket.AF_INET6, "::")}

def orig_dst(conn, fam):
    try:
        if fam == "v4":
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]]
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]]
    except OSError:
        return None

sel = selectors.DefaultSelector()
for fam in cfg["families"]:
    af, any_addr = ANY[fam]
    for proto in ("tcp", "udp"):
        for port in cfg[proto]:
            s = socket.socket(af, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if cfg["transparent"]:
                if af == socket.AF_INET:
                    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
            if proto == "udp":
                # Learn each datagram's destination address, to answer from that same address.
                if af == socket.AF_INET:
                    s.setsockopt(socket.SOL_IP, 8, 1)  # IP_PKTINFO
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, 49, 1)  # IPV6_RECVPKTINFO
            s.bind((any_addr, port))
            if proto == "tcp":
                s.listen(128)
            sel.register(s, selectors.EVENT_READ, (fam, proto, port))
print(json.dumps({"ready": True}), flush=True)

while True:
    for key, _ in sel.select():
        s = key.fileobj
        fam, proto, port = key.data
        ev = {"tag": cfg["tag"], "proto": proto, "family": fam, "port": port}
        if proto == "tcp":
            try:
                conn, peer = s.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while not data.endswith(b"\n") and len(data) < 512:
                        chunk = conn.recv(512)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                ev.update(token=data.decode(errors="replace").strip(), peer=list(peer[:2]),
                          local=list(conn.getsockname()[:2]), orig_dst=orig_dst(conn, fam))
                try:
                    conn.sendall((json.dumps(ev) + "\n").encode())
                except OSError:
                    pass
        else:
            try:
                data, anc, _, peer = s.recvmsg(2048, 256)
            except OSError:
                continue
            local, reply_anc = s.getsockname()[0], []
            for level, kind, cdata in anc:
                if fam == "v4" and (level, kind) == (socket.SOL_IP, 8):
                    local = socket.inet_ntop(socket.AF_INET, cdata[8:12])
                    reply_anc = [(level, kind, struct.pack("i", 0) + cdata[8:12] + bytes(4))]
                elif fam == "v6" and (level, kind) == (socket.IPPROTO_IPV6, 50):
                    local = socket.inet_ntop(socket.AF_INET6, cdata[:16])
                    reply_anc = [(level, kind, cdata[:16] + struct.pack("i", 0))]
            ev.update(token=data.decode(errors="replace").strip(), peer=list(peer[:2]),
                      local=[local, port], orig_dst=None)
            try:
                s.sendmsg([json.dumps(ev).encode()], reply_anc, 0, peer)
            except OSError:
                pass
        print(json.dumps(ev), flush=True)
"""

_CLIENT = r"""
import json, socket, sys
c = json.loads(sys.argv[1])
af = socket.AF_INET if c["family"] == "v4" else socket.AF_INET6
out = {"reply": None, "error": None, "local": None}
try:
    s = socket.socket(af, socket.SOCK_STREAM if c["proto"] == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(c["timeout"])
    if c["src"]:
        s.bind((c["src"], 0))
    s.connect((c["dst"], c["port"]))
    out["local"] = list(s.getsockname()[:2])
    if c["proto"] == "tcp":
        s.sendall((c["token"] + "\n").encode())
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    else:
        s.send(c["token"].encode())
        buf = s.recv(4096)
    if buf.strip():
        out["reply"] = json.loads(buf.decode())
    else:
        out["error"] = "connection closed without a reply"
except (OSError, ValueError) as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _addr(v: Any) -> Addr | None:
    return None if v is None else (str(v[0]), int(v[1]))


@dataclass(frozen=True)
class Seen:
    """What a listener saw for one connection or datagram."""

    tag: str
    proto: str
    family: str
    port: int  # the port the listener bound (15001, 15006, an app port, ...)
    token: str
    peer: Addr
    local: Addr
    orig_dst: Addr | None  # SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST (TCP only)

    @property
    def where(self) -> str:
        return f"{self.tag}:{self.port}"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Seen:
        return cls(
            tag=d["tag"],
            proto=d["proto"],
            family=d["family"],
            port=int(d["port"]),
            token=d.get("token", ""),
            peer=_addr(d["peer"]) or ("", 0),
            local=_addr(d["local"]) or ("", 0),
            orig_dst=_addr(d.get("orig_dst")),
        )


@dataclass(frozen=True, repr=False)
class Outcome:
    """The result of one client call: who answered (``seen``), or why nobody did (``error``)."""

    request: str
    seen: Seen | None
    error: str | None
    client_local: Addr | None

    @property
    def where(self) -> str:
        """``"proxy:15001"``, ``"peer:8000"``, ``"app:8080"``, ... or ``"nowhere"``."""
        return self.seen.where if self.seen else "nowhere"

    def __repr__(self) -> str:
        if self.seen is None:
            return f"{self.request}: no answer ({self.error})"
        s = self.seen
        return (
            f"{self.request}: answered by {s.where} (peer={s.peer}, local={s.local}, orig_dst={s.orig_dst}, "
            f"client_local={self.client_local})"
        )


def _ns_argv(ns: NetNS, argv: Sequence[str], uid: int, gid: int, caps: Sequence[str] = ()) -> list[str]:
    """argv run inside ns (nsenter: only the network namespace changes) as uid/gid, no supplementary
    groups; ``caps`` (e.g. ``net_admin``) are kept as ambient capabilities across the uid change."""
    out = ["nsenter", f"--net={ns.path}", "--"]
    if uid or gid or caps:
        out += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if caps:
            spec = ",".join(f"+{c}" for c in caps)
            out += [f"--inh-caps={spec}", f"--ambient-caps={spec}"]
    return out + list(argv)


class Listener:
    """A process listening on TCP/UDP ports (IPv4 and IPv6 wildcard addresses) inside a namespace."""

    def __init__(
        self,
        ns: NetNS,
        tag: str,
        *,
        tcp: Sequence[int] = (),
        udp: Sequence[int] = (),
        uid: int = 0,
        gid: int = 0,
        transparent: bool = False,
        families: Sequence[str] = FAMILIES,
        ready_timeout: float = 10.0,
    ) -> None:
        self.ns, self.tag = ns, tag
        cfg = {
            "tag": tag,
            "tcp": list(tcp),
            "udp": list(udp),
            "transparent": transparent,
            "families": list(families),
        }
        # IP_TRANSPARENT needs CAP_NET_ADMIN, as Envoy has in TPROXY mode.
        caps = ("net_admin",) if transparent and uid else ()
        argv = _ns_argv(ns, [PYTHON, "-I", "-S", "-c", _LISTENER, json.dumps(cfg)], uid, gid, caps)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._events: queue.Queue[Seen | None] = queue.Queue()
        self._ready: queue.Queue[bool] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready = self._ready.get(timeout=ready_timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"listener {tag} did not get ready in {ready_timeout}s") from None
        if not ready:
            self.proc.wait()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.close()
            raise RuntimeError(f"listener {tag} exited {self.proc.returncode}: {err}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            d = json.loads(line)
            if d.get("ready"):
                self._ready.put(True)
            else:
                self._events.put(Seen.from_json(d))
        self._ready.put(False)  # exited: wake a waiter rather than let it time out
        self._events.put(None)

    def seen(self, token: str, timeout: float = 2.0) -> Seen | None:
        """The report for ``token`` from this listener's pipe (skipping other reports), or None."""
        with contextlib.suppress(queue.Empty):
            while True:
                ev = self._events.get(timeout=timeout)
                if ev is None:
                    return None
                if ev.token == token:
                    return ev
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def _token() -> str:
    return secrets.token_hex(6)


def connect(
    ns: NetNS,
    dst: str,
    port: int,
    *,
    family: str,
    uid: int = APP_UID,
    gid: int | None = None,
    src: str | None = None,
    proto: str = "tcp",
    timeout: float = 1.0,
) -> Outcome:
    """From inside ns, as uid/gid (gid defaults to uid), connect (TCP) or send (UDP) to dst:port,
    optionally from source address ``src``; return who answered."""
    gid = uid if gid is None else gid
    token = _token()
    cfg = {
        "family": family,
        "proto": proto,
        "dst": dst,
        "port": port,
        "src": src,
        "timeout": timeout,
        "token": token,
    }
    argv = _ns_argv(ns, [PYTHON, "-I", "-S", "-c", _CLIENT, json.dumps(cfg)], uid, gid)
    p = run(argv, timeout=timeout * 3 + 10)
    d = json.loads(p.stdout)
    shown_dst = f"[{dst}]" if ":" in dst else dst
    request = f"{proto} {shown_dst}:{port} as {uid}:{gid}" + (f" from {src}" if src else "")
    seen = Seen.from_json(d["reply"]) if d["reply"] else None
    return Outcome(request, seen, d["error"], _addr(d["local"]))


# --------------------------------------------------------------------------- rules

# The commands read many settings from the environment; only what a test passes may count.
_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")


def _command_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    out.update(env or {})
    return out


def _command(name: str, ns: NetNS, args: Sequence[str], backend: str) -> list[str]:
    chosen = ["--native-nftables"] if backend == NFTABLES else ["--force-iptables-binary", backend]
    return [str(COMMAND_DIR / name), *args, "--network-namespace", ns.path, *chosen]


def apply_rules(
    ns: NetNS, args: Sequence[str], backend: str, *, env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``istio-iptables ARGS --network-namespace NS`` with ``--force-iptables-binary BACKEND``
    (``nft`` or ``legacy``, Istio's values) or, for ``nftables``, ``--native-nftables``; with no
    environment but ``env`` (and PATH, HOME, locale)."""
    return run(_command("istio-iptables", ns, args, backend), check=check, env=_command_env(env), timeout=60)


def clean_rules(
    ns: NetNS, args: Sequence[str], backend: str, *, env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``istio-clean-iptables ARGS`` in ns with the given backend."""
    return run(
        _command("istio-clean-iptables", ns, args, backend), check=check, env=_command_env(env), timeout=60
    )


def _save_cmd(backend: str, family: str) -> str:
    return f"{'ip' if family == V4 else 'ip6'}tables-{backend}-save"


def rules_text(ns: NetNS, backend: str, family: str) -> str:
    """The namespace's rules of one backend and family, comparable between two moments.

    For an iptables backend: its save output without comments or counters, and no table that
    holds nothing but empty built-in chains with ACCEPT policy (the nft backend may leave such
    tables behind; they filter nothing). For ``nftables``: nft_ruleset(ns, family) without the
    tables iptables-nft keeps (those are the ``nft`` backend's)."""
    if backend == NFTABLES:
        return nft_ruleset(ns, family, native_only=True)
    raw = run(_ns_argv(ns, [_save_cmd(backend, family)], 0, 0)).stdout
    out: list[str] = []
    table: list[str] = []
    meaningful = False
    for line in raw.splitlines():
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s*\[\d+:\d+\]$", "", line)
        if line.startswith("*"):
            table, meaningful = [line], False
        elif line == "COMMIT":
            if meaningful:
                out += [*table, line]
        else:
            table.append(line)
            builtin_accept = re.match(r"^:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT$", line)
            meaningful = meaningful or not builtin_accept
    return "\n".join(out) + ("\n" if out else "")


# The nf_tables tables iptables-nft works in (and iptables-nft-save shows).
_IPTABLES_NFT_TABLES = frozenset(
    (family, table) for family in ("ip", "ip6") for table in ("filter", "nat", "mangle", "raw", "security")
)


@dataclass
class _NftChain:
    spec: str | None = None  # a base chain's "type ... hook ... priority ...; policy ...;"
    rules: list[str] = field(default_factory=list)


@dataclass
class _NftTable:
    chains: dict[str, _NftChain] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)  # sets, maps, flags...: kept as listed


def _nft_tables(ns: NetNS) -> dict[tuple[str, str], _NftTable]:
    """``nft list ruleset`` read back into tables, keyed by (family, name), counter values dropped."""
    raw = run(_ns_argv(ns, ["nft", "list", "ruleset"], 0, 0)).stdout
    tables: dict[tuple[str, str], _NftTable] = {}
    table: _NftTable | None = None
    chain: _NftChain | None = None
    block = ""  # the header of the open non-chain block (a set, a map, ...)
    for line in raw.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        depth = len(line) - len(line.lstrip("\t"))
        text = re.sub(r"\bcounter packets \d+ bytes \d+", "counter", text)
        if depth == 0:
            if text.startswith("table "):
                _, family, name = text.split()[:3]
                table = tables.setdefault((family, name), _NftTable())
            chain, block = None, ""
            continue
        assert table is not None, f"unexpected nft output line: {line!r}"
        if depth == 1:
            chain, block = None, ""
            if text.startswith("chain ") and text.endswith("{"):
                chain = table.chains.setdefault(text.split()[1], _NftChain())
            elif text.endswith("{"):
                block = text[:-1].strip()
                table.other.append(block)
            elif text != "}":
                table.other.append(text)
        elif chain is not None:
            if depth == 2 and text.startswith("type ") and not chain.rules:
                chain.spec = text
            else:
                chain.rules.append(text)
        else:
            table.other.append(f"{block}: {text}")
    return tables


def _rule_families(rule: str) -> set[str]:
    """The families whose packets an ``inet`` rule can match: a rule that names the IPv4 or IPv6
    header (``ip daddr``, ``tproxy ip6 to``, ``meta nfproto ipv4``) matches only that family's."""
    words = re.sub(r'"[^"]*"', '""', rule).split()
    out = set()
    if "ip" in words or "ipv4" in words:
        out.add(V4)
    if "ip6" in words or "ipv6" in words:
        out.add(V6)
    return out or set(FAMILIES)


def nft_ruleset(ns: NetNS, family: str | None = None, *, native_only: bool = False) -> str:
    """The namespace's nftables ruleset, comparable between two moments: one line per table,
    chain and rule (``table inet T``, ``chain inet T C { type ... }``, ``rule inet T C EXPR``),
    without counter values. Tables and chains are sorted by name (their order means nothing:
    hooks run by priority), rules stay in order. In the tables iptables-nft keeps, empty base
    chains with accept policy, and a table left with nothing else, are left out, as rules_text
    does for iptables-nft-save.

    ``native_only``: without iptables-nft's tables at all. ``family``: only what applies to that
    family's packets: ``ip`` tables for IPv4, ``ip6`` tables for IPv6, and in other tables the
    rules that do not name the other family's header."""
    out: list[str] = []
    for (fam, name), table in sorted(_nft_tables(ns).items()):
        iptables_nft = (fam, name) in _IPTABLES_NFT_TABLES
        if iptables_nft and native_only:
            continue
        if family is not None and fam in ("ip", "ip6") and fam != ("ip" if family == V4 else "ip6"):
            continue
        chains = {
            cname: c
            for cname, c in table.chains.items()
            if not (iptables_nft and not c.rules and c.spec is not None and c.spec.endswith("policy accept;"))
        }
        if iptables_nft and not chains and not table.other:
            continue
        out.append(f"table {fam} {name}")
        out += [f"{fam} {name} {item}" for item in table.other]
        for cname, c in sorted(chains.items()):
            out.append(f"chain {fam} {name} {cname}" + (f" {{ {c.spec} }}" if c.spec else ""))
            out += [
                f"rule {fam} {name} {cname} {r}"
                for r in c.rules
                if family is None or family in _rule_families(r)
            ]
    return "".join(ln + "\n" for ln in out)


# How nft_ruleset shows a rule of Istio's outbound chain in the native tables.
_ISTIO_OUTPUT_NFT = "rule inet istio-proxy-nat istio-output "


def has_istio_rules(ns: NetNS, backend: str, family: str) -> bool:
    """Whether ``backend`` holds Istio's outbound chain for ``family``: for an iptables backend
    ISTIO_OUTPUT in that family's tables; for ``nftables``, where one ``inet`` table serves both
    families, a rule of istio-output that only this family's packets match."""
    text = rules_text(ns, backend, family)
    if backend != NFTABLES:
        return "ISTIO_OUTPUT" in text
    return any(
        ln.startswith(_ISTIO_OUTPUT_NFT) and _rule_families(ln[len(_ISTIO_OUTPUT_NFT) :]) == {family}
        for ln in text.splitlines()
    )


def all_rules_text(ns: NetNS) -> dict[tuple[str, str], str]:
    """rules_text for every (backend, family)."""
    return {(b, f): rules_text(ns, b, f) for b in BACKENDS for f in FAMILIES}


def policy_rules(ns: NetNS, family: str) -> list[str]:
    """``ip rule`` lines other than the three every namespace starts with."""
    out = run(_ns_argv(ns, ["ip", "-4" if family == V4 else "-6", "rule", "show"], 0, 0)).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    defaults = (
        "0:\tfrom all lookup local",
        "32766:\tfrom all lookup main",
        "32767:\tfrom all lookup default",
    )
    return [ln for ln in lines if ln not in defaults]


def route_table(ns: NetNS, family: str, table: int = TPROXY_TABLE) -> list[str]:
    """Routes in ``table`` (none when the table does not exist)."""
    argv = _ns_argv(ns, ["ip", "-4" if family == V4 else "-6", "route", "show", "table", str(table)], 0, 0)
    out = run(argv, check=False)
    if out.returncode and "does not exist" not in out.stderr:
        raise RuntimeError(f"{argv} exited {out.returncode}: {out.stderr}")
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]


def reset_rules(ns: NetNS) -> None:
    """Removes every iptables rule (both backends, both families) and every nftables table, every
    policy rule beyond the defaults and table 133, and forgets conntrack state, without using the
    commands under test."""
    for family in FAMILIES:
        tables = [
            ln[1:].strip() for ln in rules_text(ns, "legacy", family).splitlines() if ln.startswith("*")
        ]
        if tables:
            restore = _save_cmd("legacy", family).replace("-save", "-restore")
            # Without --noflush, restoring an empty table empties it and deletes its chains.
            doc = "".join(f"*{t}\nCOMMIT\n" for t in tables)
            run(_ns_argv(ns, [restore], 0, 0), input=doc)
    # Every nf_tables table goes: the native backend's, iptables-nft's and anyone else's.
    run(_ns_argv(ns, ["nft", "flush", "ruleset"], 0, 0))
    for family in FAMILIES:
        fam = "-4" if family == V4 else "-6"
        for line in policy_rules(ns, family):
            prio = line.split(":", 1)[0]
            run(_ns_argv(ns, ["ip", fam, "rule", "del", "priority", prio], 0, 0))
        run(_ns_argv(ns, ["ip", fam, "route", "flush", "table", str(TPROXY_TABLE)], 0, 0), check=False)
        run(_ns_argv(ns, ["conntrack", "-F", "-f", "ipv4" if family == V4 else "ipv6"], 0, 0), check=False)


def namespace_state(ns: NetNS) -> str:
    """Everything the commands may change, as one text comparable between two moments or two
    namespaces (pytest shows a line diff): the rules of both iptables backends and families, the
    whole nftables ruleset (iptables-nft's tables too: their save output does not show every
    native rule), the policy rules and the TPROXY route table."""
    parts: list[str] = []
    for backend in IPTABLES_BACKENDS:
        for family in FAMILIES:
            parts.append(f"### {_save_cmd(backend, family)}\n{rules_text(ns, backend, family)}")
    parts.append(f"### nft list ruleset\n{nft_ruleset(ns)}")
    for family in FAMILIES:
        parts.append(f"### ip rule ({family})\n" + "".join(ln + "\n" for ln in policy_rules(ns, family)))
        table = route_table(ns, family)
        parts.append(f"### ip route table {TPROXY_TABLE} ({family})\n" + "".join(ln + "\n" for ln in table))
    return "".join(parts)


# Someone else's nftables tables: an inet one with base chains on the hooks ours use (nat output and
# prerouting, prerouting at mangle priority) and more, and a user chain; and ip and ip6 tables.
_FOREIGN_NFT = """
table inet foreign {
    chain nat-output {
        type nat hook output priority -100; policy accept;
        tcp dport 7777 counter return
    }
    chain FOREIGN {
        tcp dport 7778 return
    }
    chain nat-prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump FOREIGN
    }
    chain mangle-prerouting {
        type filter hook prerouting priority -150; policy accept;
        tcp dport 7777 return
    }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 7777 accept
    }
}
table ip foreign {
    chain output {
        type filter hook output priority 0; policy accept;
        ip daddr 10.77.0.0/16 tcp dport 7777 counter accept
    }
}
table ip6 foreign {
    chain output {
        type filter hook output priority 0; policy accept;
        ip6 daddr fd00:77::/32 tcp dport 7777 counter accept
    }
}
"""


def add_foreign_rules(ns: NetNS, backend: str) -> None:
    """Rules someone else put in the namespace before us: in built-in chains of nat, mangle and
    filter, a user chain of their own, and a policy rule; for both families. For ``nftables``,
    iptables-nft rules (as a node's other software may hold) and tables of their own (_FOREIGN_NFT)."""
    iptables = "nft" if backend == NFTABLES else backend
    for family in FAMILIES:
        cmd = f"{'ip' if family == V4 else 'ip6'}tables-{iptables}"
        for argv in (
            ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
            ["-t", "nat", "-N", "FOREIGN"],
            ["-t", "nat", "-A", "FOREIGN", "-p", "tcp", "--dport", "7778", "-j", "RETURN"],
            ["-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN"],
            ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
            ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "ACCEPT"],
        ):
            run(_ns_argv(ns, [cmd, "-w", "5", *argv], 0, 0))
        fam = "-4" if family == V4 else "-6"
        run(
            _ns_argv(
                ns, ["ip", fam, "rule", "add", "fwmark", "0x99", "lookup", "99", "priority", "1000"], 0, 0
            )
        )
    if backend == NFTABLES:
        run(_ns_argv(ns, ["nft", "-f", "-"], 0, 0), input=_FOREIGN_NFT)


def has_address(ns: NetNS, ifname: str, address: str) -> bool:
    out = run(_ns_argv(ns, ["ip", "-o", "addr", "show", "dev", ifname], 0, 0)).stdout
    return any(f" {address}/" in ln for ln in out.splitlines())


# --------------------------------------------------------------------------- topology

_open: set[Topology] = set()


@atexit.register
def _close_leftovers() -> None:
    for topo in list(_open):
        topo.close()


@dataclass(eq=False)
class Topology:
    """A pod namespace and a peer namespace joined by ``links`` veth pairs (eth0, eth1, ...).

    The pod's default routes go via the peer on eth0. The peer also holds SERVICE_A/SERVICE_B
    and routes VIRT_VIA_LINK[i] through the pod over link i. Names are random; close() (or the
    context manager, or process exit) kills what runs inside and deletes both namespaces.
    """

    pod: NetNS
    peer: NetNS
    links: tuple[Link, ...]
    listeners: list[Listener] = field(default_factory=list)
    applied: tuple[Any, ...] | None = None

    @classmethod
    def create(cls, links: int = 1, hint: str = "traffic") -> Topology:
        pod = create_netns(f"{hint}-pod")
        try:
            peer = create_netns(f"{hint}-peer")
        except BaseException:
            delete_netns(pod)
            raise
        topo = cls(pod, peer, LINKS[:links])
        _open.add(topo)
        try:
            topo._build()
        except BaseException:
            topo.close()
            raise
        return topo

    def _build(self) -> None:
        for ns in (self.pod, self.peer):
            for key in ("all", "default"):
                run(_ns_argv(ns, ["sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"], 0, 0))
        for i, link in enumerate(self.links):
            veth_pair(
                self.pod,
                self.peer,
                ifname_a=link.ifname,
                ifname_b=link.ifname,
                addrs_a=[f"{link.pod_v4}/24", f"{link.pod_v6}/64"],
                addrs_b=[f"{link.peer_v4}/24", f"{link.peer_v6}/64"],
            )
            for fam in FAMILIES:
                self.peer.run(["ip", "route", "add", _VIRT_NET_VIA_LINK[i][fam], "via", link.pod(fam)])
        eth0 = self.links[0]
        self.pod.run(["ip", "-4", "route", "add", "default", "via", eth0.peer_v4])
        self.pod.run(["ip", "-6", "route", "add", "default", "via", eth0.peer_v6])
        for svc in (SERVICE_A, SERVICE_B):
            self.peer.run(["ip", "addr", "add", f"{svc[V4]}/32", "dev", "lo"])
            self.peer.run(["ip", "addr", "add", f"{svc[V6]}/128", "dev", "lo", "nodad"])

    def close(self) -> None:
        for lst in self.listeners:
            with contextlib.suppress(Exception):
                lst.close()
        self.listeners.clear()
        delete_netns(self.pod)
        delete_netns(self.peer)
        _open.discard(self)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # addresses
    def pod_ip(self, family: str, link: int = 0) -> str:
        return self.links[link].pod(family)

    def peer_ip(self, family: str, link: int = 0) -> str:
        return self.links[link].peer(family)

    # processes
    def listen(self, ns: NetNS, tag: str, **kwargs: Any) -> Listener:
        lst = Listener(ns, tag, **kwargs)
        self.listeners.append(lst)
        return lst

    def start_mesh(self) -> None:
        """The usual cast: the proxy (uid/gid 1337, transparent so TPROXY can deliver to it) on
        15001/15006 and 15053 (TCP and UDP), the application (uid/gid 1000) on 8080 and 8081,
        and the peer on 8000, 9000 and 53 (TCP and UDP)."""
        self.proxy = self.listen(
            self.pod,
            "proxy",
            tcp=[OUTBOUND_CAPTURE_PORT, INBOUND_CAPTURE_PORT, DNS_CAPTURE_PORT],
            udp=[DNS_CAPTURE_PORT],
            uid=PROXY_UID,
            gid=PROXY_GID,
            transparent=True,
        )
        self.app = self.listen(self.pod, "app", tcp=[APP_PORT, APP_PORT_2], uid=APP_UID, gid=APP_GID)
        self.peer_listener = self.listen(
            self.peer, "peer", tcp=[PEER_PORT, PEER_PORT_2, DNS_PORT], udp=[DNS_PORT]
        )

    def from_pod(self, dst: str, port: int, *, family: str, **kwargs: Any) -> Outcome:
        return connect(self.pod, dst, port, family=family, **kwargs)

    def from_peer(self, dst: str, port: int, *, family: str, **kwargs: Any) -> Outcome:
        kwargs.setdefault("uid", 0)
        return connect(self.peer, dst, port, family=family, **kwargs)

    # rules
    def apply(
        self, args: Sequence[str], backend: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str] | None:
        """Makes the pod hold exactly the rules of this configuration: a no-op when it already
        does (so parametrized tests can share one apply), otherwise reset_rules then apply_rules."""
        key = (tuple(args), backend, tuple(sorted((env or {}).items())))
        if self.applied == key:
            return None
        self.applied = None
        reset_rules(self.pod)
        proc = apply_rules(self.pod, args, backend, env=env)
        self.applied = key
        return proc

    def forget_applied(self) -> None:
        self.applied = None


@contextlib.contextmanager
def topology(links: int = 1, mesh: bool = True, hint: str = "traffic") -> Iterator[Topology]:
    """Topology.create(...), with the mesh listeners started when ``mesh``; closed on exit."""
    topo = Topology.create(links, hint)
    try:
        if mesh:
            topo.start_mesh()
        yield topo
    finally:
        topo.close()
