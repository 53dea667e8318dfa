"""``--explain``: walk one packet through a rule model and say where it ends up.

A pure evaluator. The front ends (``explain_rules``: planned rules, iptables-save text, nft rule
text, ``nft -j`` JSON; ``explain_live``: a namespace) build a ``Model``: tables of chains of
rules, each rule a sequence of matches and statements and an optional verdict. ``explain(model,
packet)`` walks the netfilter hooks the packet traverses, base chain by base chain in priority
order, rule by rule, following jumps, gotos and returns, and returns a ``Walk``: every rule
tested, whether it matched and, if not, which match failed, and the verdict.

What the walk assumes (it says so in its output):

- the packet is the first of a new connection: conntrack state NEW (``ctstate
  RELATED,ESTABLISHED`` and ``ct state invalid`` do not match), ct mark 0 until a rule sets it,
  and nat chains are consulted: for a new connection only, and once per kind of NAT (the
  destination in prerouting/output, the source in input/postrouting). A packet sent to a local
  address loops back through ``lo`` and passes the prerouting hook again, where the
  destination NAT is already decided;
- the route decides the output interface: ``oif=`` when given, else ``lo`` for 127.0.0.0/8,
  ``::1``, a destination equal to the source, and (live) the namespace's own addresses; any
  other destination leaves by an interface that is not ``lo`` (a match on another name is
  unknown). REDIRECT in output sends the packet to 127.0.0.1 / ::1, so it loops back too;
- a TPROXY target or statement finds the proxy's transparent listening socket (without one,
  iptables' TPROXY drops the packet and nft's ``tproxy`` ends the rule);
- policy routing by mark is not evaluated.

Where a rule cannot be evaluated (a match or statement not modelled, an owner match without
``uid=``, conntrack state other than NEW/UNTRACKED...), the walk stops there with ``verdict:
unknown (RULE)``: it never guesses.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .packet import Packet

Tri = bool | None
Result = tuple[Tri, str]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MASK32 = 0xFFFFFFFF
# An interface that does not exist at this hook (no input interface in output, no output one in
# prerouting); None is an interface that exists but whose name is not known (not lo).
ABSENT = ""

HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
_LOCALHOST = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}
_LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
_MAX_STEPS = 100_000
_MAX_DEPTH = 64


def interval(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _inside(v: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= v <= hi for lo, hi in ranges)


def normalize(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged intervals: one spelling whatever the syntax (nft merges set elements)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


# --------------------------------------------------------------------------- the packet as it goes


@dataclass
class Ctx:
    """The packet as the walk has changed it so far, at the hook being walked."""

    family: int
    proto: str
    saddr: IPAddress
    sport: int
    daddr: IPAddress | None
    dport: int
    iif: str | None
    oif: str | None
    has_socket: bool
    uid: int | None
    gid: int | None
    mark: int
    ctmark: int = 0
    untracked: bool = False
    hook: str = ""
    daddr_unknown: str = ""

    def addr(self, which: str) -> IPAddress | None:
        return self.saddr if which == "saddr" else self.daddr


# --------------------------------------------------------------------------- matches


class Match:
    """One test a rule makes. ``test`` gives True/False/None (cannot tell) and why."""

    text: str = ""

    def test(self, c: Ctx) -> Result:
        raise NotImplementedError

    def key(self) -> tuple[Any, ...]:
        raise NotImplementedError


_ADDR_LABEL = {"saddr": "source", "daddr": "destination"}


@dataclass(eq=False)
class AddrMatch(Match):
    which: str  # saddr, daddr
    family: int
    ranges: tuple[tuple[int, int], ...]
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        if c.family != self.family:
            return False, f"not an IPv{self.family} packet"
        a = c.addr(self.which)
        if a is None:
            return None, c.daddr_unknown or "the destination is not known here"
        inside = _inside(int(a), self.ranges)
        verb = "is" if inside else "is not"
        return inside != self.negate, f"{_ADDR_LABEL[self.which]} {a} {verb} in it"

    def key(self) -> tuple[Any, ...]:
        return ("addr", self.which, self.family, normalize(self.ranges), self.negate)


@dataclass(eq=False)
class PortMatch(Match):
    which: str  # sport, dport
    proto: str | None  # tcp, udp, th (either), None: checked by another match
    ranges: tuple[tuple[int, int], ...]
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        if self.proto in ("tcp", "udp") and c.proto != self.proto:
            return False, f"not a {self.proto} packet"
        v = c.sport if self.which == "sport" else c.dport
        inside = _inside(v, self.ranges)
        label = "source port" if self.which == "sport" else "destination port"
        return inside != self.negate, f"{label} is {v}"

    def key(self) -> tuple[Any, ...]:
        return ("port", self.which, self.proto, normalize(self.ranges), self.negate)


@dataclass(eq=False)
class ProtoMatch(Match):
    protos: frozenset[str]
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        return (c.proto in self.protos) != self.negate, f"a {c.proto} packet"

    def key(self) -> tuple[Any, ...]:
        return ("proto", tuple(sorted(self.protos)), self.negate)


@dataclass(eq=False)
class FamilyMatch(Match):
    family: int
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        return (c.family == self.family) != self.negate, f"an IPv{c.family} packet"

    def key(self) -> tuple[Any, ...]:
        return ("family", self.family, self.negate)


def iface_matches(pattern: str, name: str, wildcard: str) -> bool:
    if pattern.endswith(wildcard) and not pattern.endswith("\\" + wildcard):
        return name.startswith(pattern[:-1])
    return name == pattern.replace("\\" + wildcard, wildcard)


@dataclass(eq=False)
class IfaceMatch(Match):
    which: str  # iif, oif
    patterns: tuple[str, ...]
    negate: bool = False
    wildcard: str = "+"  # iptables' suffix wildcard; nft's is '*'
    text: str = ""

    def test(self, c: Ctx) -> Result:
        name = c.iif if self.which == "iif" else c.oif
        label = "input interface" if self.which == "iif" else "output interface"
        if name == ABSENT:
            return False, f"there is no {label} at this hook"
        if name is None:
            # Known only not to be lo: a definite answer where every pattern is exactly "lo".
            if all(p == "lo" for p in self.patterns):
                return self.negate, f"the {label} is not lo"
            flag = "iif" if self.which == "iif" else "oif"
            return None, f"the {label} is not known (give {flag}=NAME)"
        inside = any(iface_matches(p, name, self.wildcard) for p in self.patterns)
        return inside != self.negate, f"the {label} is {name}"

    def key(self) -> tuple[Any, ...]:
        pats = tuple(sorted(p[:-1] + "*" if p.endswith(self.wildcard) else p for p in self.patterns))
        return ("iface", self.which, pats, self.negate)


@dataclass(frozen=True)
class Owner:
    kind: str  # uid, gid, socket
    ranges: tuple[tuple[int, int], ...] = ()
    negate: bool = False


@dataclass(eq=False)
class OwnerMatch(Match):
    """iptables' ``-m owner`` (every criterion of one instance: ``xt=True``) or one nft
    ``skuid``/``skgid`` match. Without a socket, xt_owner matches only when every criterion is
    inverted; nft's meta expression ends the rule."""

    criteria: tuple[Owner, ...]
    xt: bool = True
    text: str = ""

    def test(self, c: Ctx) -> Result:
        if not c.has_socket:
            if self.xt and all(o.negate for o in self.criteria):
                return (
                    True,
                    "no socket (a packet not sent by a local process): an inverted owner match matches",
                )
            return False, "no socket (a packet not sent by a local process)"
        unknown = ""
        for o in self.criteria:
            if o.kind == "socket":
                r, why = (not o.negate), "the packet has a socket"
            else:
                v = c.uid if o.kind == "uid" else c.gid
                if v is None:
                    unknown = unknown or f"{o.kind}= not given"
                    continue
                r, why = (_inside(v, o.ranges) != o.negate), f"{o.kind} is {v}"
            if not r:
                return False, why
        if unknown:
            return None, unknown
        return True, ", ".join(
            f"{o.kind} is {c.uid if o.kind == 'uid' else c.gid}" for o in self.criteria if o.kind != "socket"
        )

    def key(self) -> tuple[Any, ...]:
        return ("owner", tuple(sorted((o.kind, normalize(o.ranges), o.negate) for o in self.criteria)))


@dataclass(eq=False)
class MarkMatch(Match):
    which: str  # mark, ctmark
    values: tuple[tuple[int, int], ...]
    mask: int = MASK32
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        v = (c.mark if self.which == "mark" else c.ctmark) & self.mask
        label = "mark" if self.which == "mark" else "ct mark"
        inside = _inside(v, self.values)
        shown = f"{v:#x}" if self.mask == MASK32 else f"{v:#x} (masked with {self.mask:#x})"
        return inside != self.negate, f"the {label} is {shown}"

    def key(self) -> tuple[Any, ...]:
        return ("mark", self.which, normalize(self.values), self.mask, self.negate)


CT_STATES = frozenset({"new", "established", "related", "invalid", "untracked", "snat", "dnat"})


@dataclass(eq=False)
class CtStateMatch(Match):
    states: frozenset[str]
    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        state = "untracked" if c.untracked else "new"
        if self.states & {"snat", "dnat"}:
            return None, "conntrack's SNAT/DNAT states are not modelled"
        return (state in self.states) != self.negate, f"conntrack state {state.upper()} (the first packet)"

    def key(self) -> tuple[Any, ...]:
        return ("ctstate", tuple(sorted(self.states)), self.negate)


@dataclass(eq=False)
class SynMatch(Match):
    """``--syn`` / ``tcp flags syn``: the first packet of a TCP connection is a SYN."""

    negate: bool = False
    text: str = ""

    def test(self, c: Ctx) -> Result:
        if c.proto != "tcp":
            return False, "not a tcp packet"
        return not self.negate, "the first tcp packet is a SYN"

    def key(self) -> tuple[Any, ...]:
        return ("syn", self.negate)


@dataclass(eq=False)
class ConstMatch(Match):
    value: bool
    why: str = ""
    text: str = ""

    def test(self, c: Ctx) -> Result:
        return self.value, self.why

    def key(self) -> tuple[Any, ...]:
        return ("const", self.value)


@dataclass(eq=False)
class UnknownMatch(Match):
    why: str
    text: str = ""

    def test(self, c: Ctx) -> Result:
        return None, self.why

    def key(self) -> tuple[Any, ...]:
        return ("unknown", self.text)


# --------------------------------------------------------------------------- statements


class Action:
    """A statement that changes the packet or its connection and lets the rule go on."""

    text: str = ""

    def apply(self, c: Ctx) -> str:
        """Change ``c``; return what changed, for the walk (empty: nothing worth saying)."""
        raise NotImplementedError

    def key(self) -> tuple[Any, ...]:
        raise NotImplementedError


@dataclass(eq=False)
class SetMark(Action):
    """``new = (old & keep) ^ xor`` on the packet mark or the connection's mark."""

    which: str  # mark, ctmark
    keep: int
    xor: int
    text: str = ""

    def apply(self, c: Ctx) -> str:
        if self.which == "mark":
            c.mark = (c.mark & self.keep) ^ self.xor
            return f"mark set to {c.mark:#x} ({c.mark})"
        c.ctmark = (c.ctmark & self.keep) ^ self.xor
        return f"ct mark set to {c.ctmark:#x} ({c.ctmark})"

    def key(self) -> tuple[Any, ...]:
        return ("setmark", self.which, self.keep & MASK32, self.xor & MASK32)


@dataclass(eq=False)
class CopyMark(Action):
    """CONNMARK --save-mark (to ``ctmark``) or --restore-mark (to ``mark``), with their masks."""

    to: str  # ctmark (save), mark (restore)
    nfmask: int = MASK32
    ctmask: int = MASK32
    text: str = ""

    def apply(self, c: Ctx) -> str:
        if self.to == "ctmark":
            c.ctmark = (c.ctmark & ~self.ctmask & MASK32) ^ (c.mark & self.nfmask)
            return f"ct mark set to {c.ctmark:#x} ({c.ctmark}) from the mark"
        c.mark = (c.mark & ~self.nfmask & MASK32) ^ (c.ctmark & self.ctmask)
        return f"mark set to {c.mark:#x} ({c.mark}) from the ct mark"

    def key(self) -> tuple[Any, ...]:
        return ("copymark", self.to, self.nfmask, self.ctmask)


@dataclass(eq=False)
class SetZone(Action):
    zone: int
    text: str = ""

    def apply(self, c: Ctx) -> str:
        return f"conntrack zone {self.zone} (where the connection is tracked; no change to where it goes)"

    def key(self) -> tuple[Any, ...]:
        return ("zone", self.zone)


@dataclass(eq=False)
class NoTrack(Action):
    text: str = ""

    def apply(self, c: Ctx) -> str:
        c.untracked = True
        return "not tracked: no conntrack entry, so nat is not consulted"

    def key(self) -> tuple[Any, ...]:
        return ("notrack",)


@dataclass(eq=False)
class TproxyStmt(Action):
    """nft's ``tproxy`` statement: assigns the transparent socket and lets the rule go on."""

    port: int
    addr: str | None = None
    text: str = ""

    def apply(self, c: Ctx) -> str:  # the walker records the capture
        return ""

    def key(self) -> tuple[Any, ...]:
        return ("tproxy", self.port, self.addr)


@dataclass(eq=False)
class UnknownAction(Action):
    why: str
    text: str = ""

    def apply(self, c: Ctx) -> str:
        return ""

    def key(self) -> tuple[Any, ...]:
        return ("unknown", self.text)


# --------------------------------------------------------------------------- verdicts and rules


@dataclass(eq=False)
class Verdict:
    """How a rule ends when it matches. kinds: accept, drop, return, jump, goto, redirect,
    tproxy (iptables' TPROXY target: sets the mark, then accept), snat (source NAT, which does
    not change where the packet goes), unknown."""

    kind: str
    chain: str = ""
    ports: tuple[int, int] | None = None  # redirect (None: the packet's own port), tproxy
    addr: str | None = None  # tproxy --on-ip
    keep: int = MASK32  # tproxy --tproxy-mark: new mark = (mark & keep) ^ xor
    xor: int = 0
    why: str = ""

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.chain, self.ports, self.addr, self.keep, self.xor)

    def describe(self) -> str:
        if self.kind in ("jump", "goto"):
            return f"{self.kind} {self.chain}"
        if self.kind == "redirect":
            return "redirect" + ("" if self.ports is None else f" to :{_port_text(self.ports)}")
        if self.kind == "tproxy":
            return f"tproxy to :{_port_text(self.ports or (0, 0))}"
        return self.kind


def _port_text(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


@dataclass(eq=False)
class XRule:
    text: str
    items: tuple[Match | Action, ...]
    verdict: Verdict | None = None

    def key(self) -> tuple[Any, ...]:
        matches = [i.key() for i in self.items if isinstance(i, Match)]
        actions = [i.key() for i in self.items if isinstance(i, Action)]
        return (
            tuple(sorted(_without_implied(matches), key=repr)),
            tuple(actions),
            self.verdict and self.verdict.key(),
        )


def _without_implied(keys: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """Match keys without those another one implies (``meta l4proto tcp`` before ``tcp dport``,
    which ``nft -j`` leaves out), so two spellings of one rule compare equal."""
    out = set(keys)
    for k in keys:
        if k[0] == "port" and k[2] in ("tcp", "udp"):
            out.discard(("proto", (k[2],), False))
        if k[0] == "addr":
            out.discard(("family", k[2], False))
    return out


@dataclass(eq=False)
class Chain:
    name: str
    rules: list[XRule] = field(default_factory=list)
    hook: str | None = None  # set for a base chain
    priority: int = 0
    kind: str = "filter"  # filter, route, nat
    policy: str = "accept"


@dataclass(eq=False)
class Table:
    """``label`` names it in the walk (``nat``, ``inet istio-proxy-nat``); ``families`` are the IP
    families whose packets its base chains see; ``syntax`` is how its rules are shown."""

    label: str
    families: frozenset[int]
    chains: dict[str, Chain]
    syntax: str  # iptables, nft
    source: str = ""  # iptables-nft, iptables-legacy, nft, planned ...
    iptables_name: str = ""  # raw, mangle, nat, filter (iptables tables)

    def show(self, chain: Chain, rule: XRule) -> str:
        """A rule as its whole command: what ``verdict: unknown (RULE)`` names."""
        if self.syntax == "iptables":
            return f"-t {self.iptables_name} {rule.text}"
        return f"{self.label} {chain.name}: {rule.text}"


@dataclass(eq=False)
class Model:
    tables: list[Table]
    description: str
    notes: list[str] = field(default_factory=list)
    # Live: the namespace's own addresses (a destination among them is local).
    local_addresses: frozenset[IPAddress] | None = None

    def base_chains(self, hook: str, family: int) -> list[tuple[Table, Chain]]:
        found = [
            (t, ch)
            for t in self.tables
            if family in t.families
            for ch in t.chains.values()
            if ch.hook == hook
        ]
        return sorted(found, key=lambda tc: tc[1].priority)  # stable: ties keep source order

    def signature(self) -> dict[str, dict[str, Any]]:
        """Tables, chains and rules in a spelling-independent form (tests compare two front ends)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.tables:
            chains = {}
            for ch in t.chains.values():
                if not ch.rules and ch.hook is None:
                    continue
                chains[ch.name] = (ch.hook, ch.priority, ch.kind, ch.policy, [r.key() for r in ch.rules])
            out[t.label] = chains
        return out


# --------------------------------------------------------------------------- the walk


@dataclass
class Outcome:
    kind: str  # redirect, tproxy, not-captured, drop, unknown
    text: str
    port: int | None = None
    mark: int | None = None
    rule: str = ""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "text": self.text}
        if self.port is not None:
            d["port"] = self.port
        if self.mark is not None:
            d["mark"] = self.mark
        if self.rule:
            d["rule"] = self.rule
        return d


@dataclass
class Walk:
    packet: Packet
    rules: str
    assumptions: list[str]
    events: list[dict[str, Any]]
    verdict: Outcome


class _Stop(Exception):
    pass


class _Walker:
    def __init__(self, model: Model, pkt: Packet) -> None:
        self.model = model
        self.pkt = pkt
        self.events: list[dict[str, Any]] = []
        self.assumptions: list[str] = []
        self.redirect: tuple[tuple[int, int], str] | None = None
        self.tproxy: tuple[int, str] | None = None
        self.tproxy_mark: int | None = None
        self.dropped: str | None = None
        self.unknown: str | None = None
        self.nat_decided: dict[str, str] = {}  # "dst"/"src" -> where
        self.nat_used = any(ch.kind == "nat" for _, ch in _all_base(model, pkt.family))
        self.steps = 0

    # -- events
    def emit(self, event: str, depth: int, **data: Any) -> None:
        self.events.append({"event": event, "depth": depth, **data})

    # -- the packet's route
    def _is_local(self, addr: IPAddress) -> bool | None:
        if addr in _LOOPBACK[addr.version]:
            return True
        if self.model.local_addresses is not None:
            return addr in self.model.local_addresses
        if addr == self.pkt.src and self.pkt.direction == "out":
            return True
        return None

    def run(self) -> Walk:
        p = self.pkt
        self.assumptions.append(
            "the first packet of a new connection: conntrack state NEW, ct mark 0; nat chains are"
            " consulted for it only"
        )
        if p.direction == "out":
            if p.uid is None:
                self.assumptions.append(
                    "uid= not given: a match on the sending process's uid cannot be evaluated"
                )
            elif not p.gid_given:
                self.assumptions.append(f"gid={p.gid} (gid= not given: the same as uid=)")
            oif = p.oif
            if oif is not None:
                self.assumptions.append(f"it leaves by {oif} (oif= given)")
            elif self._is_local(p.dst):
                oif = "lo"
                why = (
                    "a loopback address"
                    if p.dst in _LOOPBACK[p.family]
                    else (
                        "the namespace's own address"
                        if self.model.local_addresses is not None
                        else "its own source"
                    )
                )
                self.assumptions.append(f"it leaves by lo: the destination {p.dst} is {why}")
            else:
                self.assumptions.append(
                    f"it leaves by an interface other than lo (the route to {p.dst}; give oif=NAME to"
                    " test interface names)"
                )
            c = Ctx(
                p.family, p.proto, p.src, p.sport, p.dst, p.dport, ABSENT, oif, True, p.uid, p.gid, p.mark
            )
        else:
            if p.iif is not None:
                self.assumptions.append(f"it arrives on {p.iif} (iif= given)")
            else:
                self.assumptions.append(
                    "it arrives on an interface other than lo (give iif=NAME to test names)"
                )
            c = Ctx(
                p.family, p.proto, p.src, p.sport, p.dst, p.dport, p.iif, ABSENT, False, None, None, p.mark
            )
        if p.mark:
            self.assumptions.append(f"mark {p.mark:#x} ({p.mark}) on the packet from the start (mark= given)")
        self.assumptions.append(
            "a TPROXY rule finds the proxy's transparent socket; policy routing by mark is not evaluated"
        )
        with contextlib.suppress(_Stop):
            self._walk(c)
        return Walk(p, self.model.description, self.assumptions, self.events, self._outcome())

    def _walk(self, c: Ctx) -> None:
        p = self.pkt
        if p.direction == "out":
            self.hook("output", c, "sent by a local process", always=True)
            loops = c.oif == "lo" or self.redirect is not None
            if self.redirect is not None and c.oif != "lo":
                self.emit(
                    "note",
                    0,
                    text="REDIRECT changed the destination to this host: the packet loops back through lo",
                )
            c.oif = "lo" if loops else c.oif
            self.hook("postrouting", c, "")
            if loops:
                back = Ctx(**{**c.__dict__, "iif": "lo", "oif": ABSENT, "has_socket": False})
                self.hook("prerouting", back, "looped back through lo: the destination is local", always=True)
                self.hook("input", back, "delivered locally")
            return
        self.hook("prerouting", c, f"arriving on {p.iif or 'an interface'}", always=True)
        local: bool | None = (
            True if (self.redirect or self.tproxy) else (None if c.daddr is None else self._is_local(c.daddr))
        )
        if local:
            c.oif = ABSENT
            self.hook("input", c, "delivered locally")
        elif local is False:
            c.oif = None
            self.hook("forward", c, "forwarded: the destination is not local")
            self.hook("postrouting", c, "")
        elif any(self._has_rules(h, c.family) for h in ("input", "forward")):
            self.emit(
                "note", 0, text=f"not walked: input/forward (whether {c.daddr} is local is not known here)"
            )

    def _has_rules(self, hook: str, family: int) -> bool:
        return any(ch.rules or ch.policy != "accept" for _, ch in self.model.base_chains(hook, family))

    def hook(self, hook: str, c: Ctx, note: str, *, always: bool = False) -> None:
        c.hook = hook
        chains = self.model.base_chains(hook, c.family)
        if not always and not any(ch.rules or ch.policy != "accept" for _, ch in chains):
            self._nat_decided(hook, c)  # the kernel passes the hook all the same
            return
        self.emit("hook", 0, hook=hook, note=note)
        if not chains:
            self.emit("note", 1, text="no chains at this hook")
        manip = "dst" if hook in ("prerouting", "output") else "src"
        for table, chain in chains:
            base = {"table": table.label, "chain": chain.name, "priority": chain.priority, "type": chain.kind}
            if chain.kind == "nat":
                if c.untracked:
                    self.emit("skip", 1, **base, reason="not consulted: the packet is not tracked")
                    continue
                if manip in self.nat_decided:
                    self.emit("skip", 1, **base, reason=f"not consulted: {self.nat_decided[manip]}")
                    continue
            self.emit("chain", 1, **base, base=True, policy=chain.policy)
            self.run_chain(table, chain, c)
            if self.dropped is not None:
                raise _Stop
        if self.tproxy is not None and self.tproxy_mark is None:
            self.tproxy_mark = c.mark  # what routing sees after this hook
        self._nat_decided(hook, c)

    def _nat_decided(self, hook: str, c: Ctx) -> None:
        """After a hook, NAT of its kind is decided for the connection (a null binding when no rule
        did NAT), wherever any nat chain exists: later nat chains of that kind are not consulted."""
        manip = "dst" if hook in ("prerouting", "output") else "src"
        if manip not in self.nat_decided and self.nat_used and not c.untracked:
            which = "destination" if manip == "dst" else "source"
            self.nat_decided[manip] = f"the connection's {which} NAT was decided at the {hook} hook"

    def run_chain(self, table: Table, base: Chain, c: Ctx) -> None:
        # Frames: [chain, next rule index]; a goto replaces the top frame, so its RETURN goes
        # back to the chain that jumped.
        stack: list[list[Any]] = [[base, 0]]
        while stack:
            self.steps += 1
            if self.steps > _MAX_STEPS or len(stack) > _MAX_DEPTH:
                self._unknown(table, base, None, "the chains loop (or nest too deep) to follow")
            frame = stack[-1]
            chain: Chain = frame[0]
            depth = len(stack) + 1
            if frame[1] >= len(chain.rules):
                stack.pop()
                if stack:
                    self.emit(
                        "end",
                        depth,
                        table=table.label,
                        chain=chain.name,
                        outcome=f"end of chain: back to {stack[-1][0].name}",
                    )
                    continue
                self._policy(table, chain, c)
                return
            index = frame[1]
            rule = chain.rules[index]
            frame[1] = index + 1
            res, why, changes = self.eval_rule(rule, c, table.show(chain, rule))
            info = {"table": table.label, "chain": chain.name, "number": index + 1, "rule": rule.text}
            if res is False:
                # nft statements before the failing match have run all the same.
                self.emit("rule", depth, **info, result="no match", failed=why, changes=changes)
                continue
            if res is None:
                self.emit("rule", depth, **info, result="unknown", failed=why)
                self._unknown(table, chain, rule, why)
            v = rule.verdict
            action = v.describe() if v is not None else "continue"
            if v is not None and v.kind == "unknown":
                self.emit("rule", depth, **info, result="unknown", failed=v.why)
                self._unknown(table, chain, rule, v.why)
            ends = ""
            if v is not None and v.kind in ("redirect", "tproxy", "snat"):
                ends = self._capture(table, chain, rule, v, c, base, changes)
            self.emit("rule", depth, **info, result="match", action=action, changes=changes)
            if v is None:
                continue
            if v.kind in ("jump", "goto"):
                target = table.chains.get(v.chain)
                if target is None:
                    self._unknown(table, chain, rule, f"no chain {v.chain} in {table.label}")
                if v.kind == "jump":
                    stack.append([target, 0])
                else:
                    stack[-1] = [target, 0]
                self.emit("enter", depth if v.kind == "jump" else depth - 1, table=table.label, chain=v.chain)
                continue
            if v.kind == "return":
                stack.pop()
                if stack:
                    self.emit(
                        "end",
                        depth,
                        table=table.label,
                        chain=chain.name,
                        outcome=f"return to {stack[-1][0].name}",
                    )
                    continue
                self._policy(table, base, c)
                return
            if v.kind == "accept":
                ends = "accepted"
            elif v.kind == "drop":
                self.dropped = table.show(chain, rule)
                ends = "dropped"
            elif not ends:
                self._unknown(table, chain, rule, f"verdict {v.kind} not modelled")
            self.emit(
                "end", 2, table=table.label, chain=base.name, outcome=f"{table.label} {base.name}: {ends}"
            )
            return

    def _policy(self, table: Table, chain: Chain, c: Ctx) -> None:
        outcome = f"{table.label} {chain.name}: end of chain, policy {chain.policy}"
        if chain.policy == "drop":
            self.dropped = f"{table.label} {chain.name} policy drop"
            outcome += ": dropped"
        self.emit("end", 2, table=table.label, chain=chain.name, outcome=outcome)

    def _capture(
        self, table: Table, chain: Chain, rule: XRule, v: Verdict, c: Ctx, base: Chain, changes: list[str]
    ) -> str:
        """Apply a REDIRECT, TPROXY or source NAT verdict to ``c``; returns how the base chain ends."""
        shown = table.show(chain, rule)
        if v.kind == "snat":
            if c.hook not in ("postrouting", "input"):
                self._unknown(table, chain, rule, "source NAT outside postrouting/input")
            return "accepted (source NAT: where the packet goes does not change)"
        if v.kind == "tproxy":
            if c.hook != "prerouting":
                self._unknown(table, chain, rule, "TPROXY outside prerouting")
            c.mark = (c.mark & v.keep) ^ v.xor
            port = (v.ports or (c.dport, c.dport))[0]
            self.tproxy = (port, shown)
            changes.append(f"handed to the transparent socket on :{port}, mark {c.mark:#x} ({c.mark})")
            return "accepted"
        if base.kind != "nat" or c.hook not in ("prerouting", "output"):
            self._unknown(table, chain, rule, "REDIRECT outside a nat prerouting/output chain")
        port = (v.ports or (c.dport, c.dport))[0]
        self.redirect = (v.ports or (c.dport, c.dport), shown)
        if c.hook == "output":
            c.daddr = _LOCALHOST[c.family]
            where = f"{c.daddr}:{port}" if c.family == 4 else f"[{c.daddr}]:{port}"
        else:
            c.daddr = None
            c.daddr_unknown = "the destination is now the primary address of the input interface (REDIRECT)"
            where = f"the input interface's primary address, port {port}"
        c.dport = port
        changes.append(f"destination now {where}")
        self.nat_decided["dst"] = f"the destination NAT was done (REDIRECT) at the {c.hook} hook"
        return "accepted (destination NAT done)"

    def _unknown(self, table: Table, chain: Chain, rule: XRule | None, why: str) -> None:
        self.unknown = table.show(chain, rule) if rule is not None else f"{table.label} {chain.name}"
        self.emit("stop", 0, text=f"cannot evaluate: {why}", rule=self.unknown)
        raise _Stop

    def eval_rule(self, rule: XRule, c: Ctx, shown: str) -> tuple[Tri, str, list[str]]:
        unknown = ""
        skipped = ""  # a statement after an unknown match: whether it ran is not known
        changes: list[str] = []
        for item in rule.items:
            if isinstance(item, Match):
                r, why = item.test(c)
                label = item.text or "match"
                if r is False:
                    if skipped:
                        return None, f"{unknown}; so whether {skipped} ran is not known", changes
                    return False, f"{label}: {why}", changes
                if r is None and not unknown:
                    unknown = f"{label}: {why}"
                continue
            if unknown:
                skipped = skipped or item.text or "a statement"
                continue
            if isinstance(item, UnknownAction):
                unknown = f"{item.text}: {item.why}"
                continue
            if isinstance(item, TproxyStmt):
                if c.hook != "prerouting":
                    unknown = f"{item.text}: tproxy outside prerouting"
                    continue
                self.tproxy = (item.port, shown)
                changes.append(f"handed to the transparent socket on :{item.port}")
                continue
            said = item.apply(c)
            if said:
                changes.append(said)
        if unknown:
            return None, unknown, changes
        return True, "", changes

    def _outcome(self) -> Outcome:
        if self.unknown is not None:
            return Outcome("unknown", f"unknown ({self.unknown})", rule=self.unknown)
        if self.dropped is not None:
            return Outcome("drop", "drop", rule=self.dropped)
        if self.tproxy is not None:
            mark = self.pkt.mark if self.tproxy_mark is None else self.tproxy_mark
            return Outcome(
                "tproxy",
                f"tproxy to :{self.tproxy[0]} mark {mark}",
                port=self.tproxy[0],
                mark=mark,
                rule=self.tproxy[1],
            )
        if self.redirect is not None:
            ports, rule = self.redirect
            return Outcome("redirect", f"redirect to :{_port_text(ports)}", port=ports[0], rule=rule)
        return Outcome("not-captured", "not captured")


def _all_base(model: Model, family: int) -> list[tuple[Table, Chain]]:
    return [tc for hook in HOOKS for tc in model.base_chains(hook, family)]


def explain(model: Model, packet: Packet) -> Walk:
    """Walk ``packet`` through ``model``."""
    return _Walker(model, packet).run()


# --------------------------------------------------------------------------- output


def render_text(walk: Walk) -> str:
    out = [f"packet: {walk.packet.describe()}", f"rules: {walk.rules}", "assuming:"]
    out += [f"  - {a}" for a in walk.assumptions]
    for e in walk.events:
        pad = "  " * e["depth"]
        kind = e["event"]
        if kind == "hook":
            note = f" ({e['note']})" if e["note"] else ""
            out.append(f"hook {e['hook']}{note}:")
        elif kind == "chain":
            head = f"{pad}{e['table']} {e['chain']}"
            out.append(f"{head} (priority {e['priority']}, type {e['type']}, policy {e['policy']})")
        elif kind == "skip":
            out.append(
                f"{pad}{e['table']} {e['chain']} (priority {e['priority']}, type {e['type']}): {e['reason']}"
            )
        elif kind == "enter":
            out.append(f"{pad}{e['chain']}:")
        elif kind == "rule":
            out.append(f"{pad}{e['number']:>2}. {e['rule']}")
            if e["result"] == "match":
                extra = "".join(f"; {ch}" for ch in e.get("changes") or ())
                out.append(f"{pad}    match: {e['action']}{extra}")
            elif e["result"] == "no match":
                extra = "".join(f"; before that: {ch}" for ch in e.get("changes") or ())
                out.append(f"{pad}    no match: {e['failed']}{extra}")
            else:
                out.append(f"{pad}    cannot tell: {e['failed']}")
        elif kind == "end":
            out.append(f"{pad}{e['outcome']}")
        elif kind in ("note", "stop"):
            out.append(f"{pad}{e['text']}")
    out.append(f"verdict: {walk.verdict.text}")
    return "\n".join(out) + "\n"


def as_json(walk: Walk) -> dict[str, Any]:
    p = walk.packet
    packet = {
        "direction": p.direction,
        "protocol": p.proto,
        "family": f"ipv{p.family}",
        "source": {"address": str(p.src), "port": p.sport},
        "destination": {"address": str(p.dst), "port": p.dport},
        "uid": p.uid,
        "gid": p.gid,
        "oif": p.oif,
        "iif": p.iif,
        "mark": p.mark,
    }
    return {
        "packet": packet,
        "rules": walk.rules,
        "assumptions": walk.assumptions,
        "walk": walk.events,
        "verdict": walk.verdict.as_dict(),
    }


def render_json(walk: Walk) -> str:
    import json

    return json.dumps(as_json(walk), indent=2) + "\n"
