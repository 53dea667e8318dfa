"""The pure rule planner: ``plan(config) -> Ruleset``, with Istio's semantics, for IPv4 and IPv6,
for iptables and (``plan_nft``) for native nftables.

One set of planning steps serves both backends. Each step decides which rules exist and in which
order, and writes every rule once in both spellings: iptables arguments and the nft rule body
Istio's nftables code writes for it. The steps run over a list of families: one family for an
iptables plan (each family has its own tables), and IPv4 then IPv6 for nftables, whose ``inet``
tables hold both. So a rule that names addresses is written for each family right after its twin,
a list of addresses is written for IPv4 and then for IPv6, and a rule that names no address is
written once (in nftables it then also acts on IPv6 packets, IPv6 enabled or not). That is exactly
the order in which Istio issues them, and the order (including inserts into built-in chains)
decides the final chain contents in the kernel.
"""

from __future__ import annotations

from .config import Config, InterceptionMode
from .ruleset import Family, FamilyRules, NftRules, PolicyRoute, Rule, Ruleset
from .startup import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

NAT = "nat"
MANGLE = "mangle"
RAW = "raw"

INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"

# Envoy marks its outbound-to-inbound connections with this mark in TPROXY mode.
OUTBOUND_MARK = "1338"
# The istio-agent DNS proxy listens here.
DNS_PROXY_PORT = "15053"

# nftables only, beyond Istio: a list of more than this many ports or CIDRs is matched by one rule
# with an anonymous set (``ip daddr { ... }``, intervals for CIDRs) instead of one rule per item,
# so a new connection's cost stops growing with the list. Up to this many, the rules are Istio's.
NFT_SET_THRESHOLD = 8


def _nft_iface(name: str) -> str:
    """An interface name as nft spells it: iptables' wildcard suffix ``+`` is nft's quoted ``*``
    (``eth+`` matches what ``"eth*"`` does); other names as they are."""
    return f'"{name[:-1]}*"' if name.endswith("+") else name


class _Builder:
    """Collects the rules in order."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def append(self, table: str, chain: str, *args: str, nft: str) -> None:
        self.rules.append(_rule(table, chain, args, None, nft))

    def insert(self, table: str, chain: str, position: int, *args: str, nft: str) -> None:
        self.rules.append(_rule(table, chain, args, position, nft))


def _rule(table: str, chain: str, args: tuple[str, ...], position: int | None, nft: str) -> Rule:
    j = args.index("-j")
    return Rule(table, chain, args[:j], args[j + 1], args[j + 2 :], position, nft)


class _Fam:
    """The values Istio substitutes into a rule it writes once per family."""

    __slots__ = ("family", "ip", "loopback", "passthrough", "exclude_cidrs", "include_cidrs", "dns_servers")

    def __init__(self, cfg: Config, family: Family) -> None:
        v = family.value
        self.family = family
        self.ip = "ip" if family is Family.V4 else "ip6"  # nft's address match
        self.loopback = cfg.host_ipv4_loopback_cidr if family is Family.V4 else "::1/128"
        self.passthrough = family.inbound_passthrough_source
        self.exclude_cidrs = [str(c) for c in cfg.outbound_ip_ranges_exclude if c.version == v]
        self.include_cidrs = [str(c) for c in cfg.outbound_ip_ranges_include.of_version(v)]
        servers = cfg.dns_servers_v4 if family is Family.V4 else cfg.dns_servers_v6
        self.dns_servers = [f"{s}/{family.host_prefixlen}" for s in servers]


class _Plan:
    """Plans the rules of ``families`` (see the module docstring); ``nft`` only changes how long
    lists are written (NFT_SET_THRESHOLD) and which families DNS capture looks at."""

    def __init__(self, cfg: Config, families: Sequence[Family], *, nft: bool = False) -> None:
        self.cfg = cfg
        self.fams = [_Fam(cfg, f) for f in families]
        self.nft = nft
        self.b = _Builder()
        self.tproxy = cfg.interception_mode is InterceptionMode.TPROXY
        # Istio turns DNS capture off when there is nothing to capture.
        self.redirect_dns = cfg.redirect_dns and (
            cfg.capture_all_dns or bool(cfg.dns_servers_v4) or bool(cfg.dns_servers_v6)
        )
        # Whether the DNS jumps are written: iptables asks whether this family has servers; Istio's
        # nftables code asks whether any servers are configured, even for IPv6 when IPv6 is off.
        self.has_dns_servers = (
            bool(cfg.dns_servers_v4 or cfg.dns_servers_v6) if nft else any(f.dns_servers for f in self.fams)
        )

    def rules(self) -> tuple[Rule, ...]:
        self.exclude_interfaces()
        self.kube_virt_interfaces_bypass()
        self.drop_invalid()
        self.base_chains()
        self.inbound()
        self.outbound()
        if self.tproxy:
            self.tproxy_marks()
        return tuple(self.b.rules)

    def items(self, values: Sequence[str]) -> list[tuple[str, str]]:
        """``(iptables value, nft value)`` per item; in nftables a list longer than the threshold is
        one item whose nft value is an anonymous set (its iptables value is unused then)."""
        if self.nft and len(values) > NFT_SET_THRESHOLD:
            return [(values[0], "{ " + ", ".join(values) + " }")]
        return [(v, v) for v in values]

    # -- interfaces -------------------------------------------------------------------------
    def exclude_interfaces(self) -> None:
        for iface in self.cfg.exclude_interfaces:
            self.b.append(
                NAT,
                "PREROUTING",
                "-i",
                iface,
                "-j",
                "RETURN",
                nft=f"iifname {_nft_iface(iface)} counter return",
            )
            self.b.append(
                NAT, "OUTPUT", "-o", iface, "-j", "RETURN", nft=f"oifname {_nft_iface(iface)} counter return"
            )
        if self.tproxy:
            for iface in self.cfg.exclude_interfaces:
                self.b.append(
                    MANGLE,
                    "PREROUTING",
                    "-i",
                    iface,
                    "-j",
                    "RETURN",
                    nft=f"iifname {_nft_iface(iface)} counter return",
                )
                self.b.append(
                    MANGLE,
                    "OUTPUT",
                    "-o",
                    iface,
                    "-j",
                    "RETURN",
                    nft=f"oifname {_nft_iface(iface)} counter return",
                )

    def kube_virt_interfaces_bypass(self) -> None:
        for iface in self.cfg.kube_virt_interfaces:
            self.b.insert(
                NAT,
                "PREROUTING",
                1,
                "-i",
                iface,
                "-j",
                "RETURN",
                nft=f"iifname {_nft_iface(iface)} counter return",
            )

    def drop_invalid(self) -> None:
        if self.cfg.drop_invalid:
            # Istio's nftables rule drops invalid TCP only; its iptables rule any protocol.
            self.b.append(
                MANGLE, "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", DROP,
                nft="meta l4proto tcp ct state invalid counter jump istio-drop",
            )  # fmt: skip
            self.b.append(MANGLE, DROP, "-j", "DROP", nft="counter drop")

    # -- chains shared by inbound and outbound --------------------------------------------
    def base_chains(self) -> None:
        c = self.cfg
        tunnel = c.inbound_tunnel_port
        self.b.append(
            NAT, INBOUND, "-p", "tcp", "--dport", str(tunnel), "-j", "RETURN",
            nft=f"meta l4proto tcp tcp dport {tunnel} counter return",
        )  # fmt: skip
        self.b.append(
            NAT, REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.proxy_port),
            nft=f"meta l4proto tcp counter redirect to :{c.proxy_port}",
        )  # fmt: skip
        self.b.append(
            NAT, IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.inbound_capture_port),
            nft=f"meta l4proto tcp counter redirect to :{c.inbound_capture_port}",
        )  # fmt: skip

    # -- inbound ----------------------------------------------------------------------------
    def inbound(self) -> None:
        c = self.cfg
        if c.inbound_ports.empty:
            return
        if self.tproxy:
            mark = c.tproxy_mark
            self.b.append(
                MANGLE, DIVERT, "-j", "MARK", "--set-mark", str(mark), nft=f"counter meta mark set {mark}"
            )
            self.b.append(MANGLE, DIVERT, "-j", "ACCEPT", nft="counter accept")
            for f in self.fams:
                self.b.append(
                    MANGLE, TPROXY, "!", "-d", f.loopback, "-p", "tcp",
                    "-j", "TPROXY", "--tproxy-mark", f"{mark}/0xffffffff",
                    "--on-port", str(c.inbound_capture_port),
                    nft=f"meta l4proto tcp {f.ip} daddr != {f.loopback} tproxy {f.ip} to"
                    f" :{c.inbound_capture_port} meta mark set {mark} counter accept",
                )  # fmt: skip
        table = MANGLE if self.tproxy else NAT
        self.b.append(
            table, "PREROUTING", "-p", "tcp", "-j", INBOUND, nft="meta l4proto tcp counter jump istio-inbound"
        )
        if c.inbound_ports.wildcard:
            for port, nft_port in self.items([str(p) for p in c.inbound_ports_exclude]):
                self.b.append(
                    table, INBOUND, "-p", "tcp", "--dport", port, "-j", "RETURN",
                    nft=f"meta l4proto tcp tcp dport {nft_port} counter return",
                )  # fmt: skip
            self.capture_inbound((), "")
        else:
            for port, nft_port in self.items([str(p) for p in c.inbound_ports.ports]):
                self.capture_inbound(("--dport", port), f" tcp dport {nft_port}")

    def capture_inbound(self, port_match: tuple[str, ...], nft_port: str) -> None:
        if self.tproxy:
            # Packets of established connections go to lo; new ones are handed to TPROXY.
            self.b.append(
                MANGLE, INBOUND, "-p", "tcp", *port_match,
                "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", DIVERT,
                nft=f"meta l4proto tcp ct state related,established{nft_port} counter jump istio-divert",
            )  # fmt: skip
            self.b.append(
                MANGLE, INBOUND, "-p", "tcp", *port_match, "-j", TPROXY,
                nft=f"meta l4proto tcp{nft_port} counter jump istio-tproxy",
            )  # fmt: skip
        else:
            self.b.append(
                NAT, INBOUND, "-p", "tcp", *port_match, "-j", IN_REDIRECT,
                nft=f"meta l4proto tcp{nft_port} counter jump istio-in-redirect",
            )  # fmt: skip

    # -- outbound ---------------------------------------------------------------------------
    def outbound(self) -> None:
        c = self.cfg
        self.b.append(NAT, "OUTPUT", "-j", OUTPUT, nft="counter jump istio-output")
        # Port exclusions come before the rules that send connections back to self.
        for port, nft_port in self.items([str(p) for p in c.outbound_ports_exclude]):
            self.b.append(
                NAT,
                OUTPUT,
                "-p",
                "tcp",
                "--dport",
                port,
                "-j",
                "RETURN",
                nft=f"tcp dport {nft_port} counter return",
            )
            self.b.append(
                NAT,
                OUTPUT,
                "-p",
                "udp",
                "--dport",
                port,
                "-j",
                "RETURN",
                nft=f"udp dport {nft_port} counter return",
            )
        # Envoy's inbound passthrough cluster binds this source address.
        for f in self.fams:
            self.b.append(
                NAT, OUTPUT, "-o", "lo", "-s", f.passthrough, "-j", "RETURN",
                nft=f"oifname lo {f.ip} saddr {f.passthrough} counter return",
            )  # fmt: skip
        for uid in c.proxy_uids:
            self.proxy_owner("--uid-owner", "skuid", uid, dns_aware_redirect=True)
        for gid in c.proxy_gids:
            self.proxy_owner("--gid-owner", "skgid", gid, dns_aware_redirect=False)
        self.owner_groups()
        if self.redirect_dns:
            self.dns()
        # Envoy-aware applications and container-to-container traffic use localhost.
        for f in self.fams:
            self.b.append(
                NAT, OUTPUT, "-d", f.loopback, "-j", "RETURN", nft=f"{f.ip} daddr {f.loopback} counter return"
            )
        for f in self.fams:
            for cidr, nft_cidr in self.items(f.exclude_cidrs):
                self.b.append(
                    NAT, OUTPUT, "-d", cidr, "-j", "RETURN", nft=f"{f.ip} daddr {nft_cidr} counter return"
                )
        for port, nft_port in self.items([str(p) for p in c.outbound_ports_include]):
            self.b.append(
                NAT, OUTPUT, "-p", "tcp", "--dport", port, "-j", REDIRECT,
                nft=f"tcp dport {nft_port} counter jump istio-redirect",
            )  # fmt: skip
        self.outbound_include()

    def proxy_owner(self, owner_flag: str, nft_owner: str, owner: str, *, dns_aware_redirect: bool) -> None:
        """Rules for one proxy uid or gid: app -> VIP -> Envoy -> Envoy -> app, and no loops."""
        c = self.cfg
        tunnel = str(c.inbound_tunnel_port)
        if self.redirect_dns and dns_aware_redirect:
            port_match: tuple[str, ...] = ("-m", "multiport", "!", "--dports", f"53,{tunnel}")
            nft_port = f"tcp dport != {{ 53, {tunnel} }}"
        else:
            port_match = ("!", "--dport", tunnel)
            nft_port = f"tcp dport != {tunnel}"
        for f in self.fams:
            self.b.append(
                NAT, OUTPUT, "-o", "lo", "!", "-d", f.loopback, "-p", "tcp", *port_match,
                "-m", "owner", owner_flag, owner, "-j", IN_REDIRECT,
                nft=f"oifname lo meta l4proto tcp {f.ip} daddr != {f.loopback} {nft_port} {nft_owner} {owner}"
                " counter jump istio-in-redirect",
            )  # fmt: skip
        # An explicitly included loopback range means app -> app over lo is captured too.
        include_has_loopback = c.outbound_ip_ranges_include.has_loopback
        if not include_has_loopback:
            if self.redirect_dns:
                # TCP DNS to a server on localhost must still reach the DNS capture rules.
                self.b.append(
                    NAT, OUTPUT, "-o", "lo", "-p", "tcp", "!", "--dport", "53",
                    "-m", "owner", "!", owner_flag, owner, "-j", "RETURN",
                    nft=f"oifname lo meta l4proto tcp tcp dport != 53 {nft_owner} != {owner} counter return",
                )  # fmt: skip
            else:
                self.b.append(
                    NAT, OUTPUT, "-o", "lo", "-m", "owner", "!", owner_flag, owner, "-j", "RETURN",
                    nft=f"oifname lo {nft_owner} != {owner} counter return",
                )  # fmt: skip
        # The proxy's own traffic, any protocol and destination, is never captured.
        self.b.append(
            NAT,
            OUTPUT,
            "-m",
            "owner",
            owner_flag,
            owner,
            "-j",
            "RETURN",
            nft=f"{nft_owner} {owner} counter return",
        )

    def owner_groups(self) -> None:
        groups = self.cfg.owner_groups
        if groups.except_:
            for group in groups.values:
                self.b.append(
                    NAT,
                    OUTPUT,
                    "-m",
                    "owner",
                    "--gid-owner",
                    group,
                    "-j",
                    "RETURN",
                    nft=f"skgid {group} counter return",
                )
        else:
            none_of: list[str] = []
            for group in groups.values:
                none_of += ["-m", "owner", "!", "--gid-owner", group]
            nft_none_of = "".join(f"skgid != {group} " for group in groups.values)
            self.b.append(NAT, OUTPUT, *none_of, "-j", "RETURN", nft=f"{nft_none_of}counter return")

    def dns(self) -> None:
        c = self.cfg
        capture_all = c.capture_all_dns
        # raw/OUTPUT jumps unconditionally; nat only when there is something to capture.
        self.b.append(RAW, "OUTPUT", "-j", OUTPUT_DNS, nft="counter jump istio-output-dns")
        if capture_all or self.has_dns_servers:
            self.b.append(NAT, OUTPUT, "-j", OUTPUT_DNS, nft="counter jump istio-output-dns")
        # All TCP rules, then all UDP ones; Istio spells the REDIRECT option differently for each.
        redirect = f"counter redirect to :{DNS_PROXY_PORT}"
        for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
            if capture_all:
                nft_all = "meta l4proto tcp tcp dport 53" if proto == "tcp" else "udp dport 53"
                self.b.append(
                    NAT, OUTPUT_DNS, "-p", proto, "--dport", "53", "-j", "REDIRECT", to_ports, DNS_PROXY_PORT,
                    nft=f"{nft_all} {redirect}",
                )  # fmt: skip
                continue
            for f in self.fams:
                for s in f.dns_servers:
                    self.b.append(
                        NAT, OUTPUT_DNS, "-p", proto, "--dport", "53", "-d", s,
                        "-j", "REDIRECT", to_ports, DNS_PROXY_PORT,
                        nft=f"{f.ip} daddr {s} {proto} dport 53 {redirect}",
                    )  # fmt: skip
        self.dns_conntrack_zones(capture_all)

    def dns_conntrack_zones(self, capture_all: bool) -> None:
        """Proxy <-> upstream DNS in zone 1, app <-> proxy in zone 2, so UDP conntrack entries never clash."""
        owners = [("--uid-owner", "skuid", u) for u in self.cfg.proxy_uids] + [
            ("--gid-owner", "skgid", g) for g in self.cfg.proxy_gids
        ]
        for flag, nft_owner, owner in owners:
            self.b.append(
                RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-m", "owner", flag, owner,
                "-j", "CT", "--zone", "1",
                nft=f"udp dport 53 meta {nft_owner} {owner} counter ct zone set 1",
            )  # fmt: skip
            self.b.append(
                RAW, OUTPUT_DNS, "-p", "udp", "--sport", DNS_PROXY_PORT, "-m", "owner", flag, owner,
                "-j", "CT", "--zone", "2",
                nft=f"udp sport {DNS_PROXY_PORT} meta {nft_owner} {owner} counter ct zone set 2",
            )  # fmt: skip
        if capture_all:
            self.b.append(RAW, "PREROUTING", "-j", INBOUND, nft="counter jump istio-inbound")
            self.b.append(
                RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2",
                nft="udp dport 53 counter ct zone set 2",
            )  # fmt: skip
            self.b.append(
                RAW, INBOUND, "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1",
                nft="udp sport 53 counter ct zone set 1",
            )  # fmt: skip
            return
        if self.has_dns_servers:
            self.b.append(RAW, "PREROUTING", "-j", INBOUND, nft="counter jump istio-inbound")
        for f in self.fams:
            for s in f.dns_servers:
                self.b.append(
                    RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-d", s, "-j", "CT", "--zone", "2",
                    nft=f"udp dport 53 {f.ip} daddr {s} counter ct zone set 2",
                )  # fmt: skip
                self.b.append(
                    RAW, INBOUND, "-p", "udp", "--sport", "53", "-s", s, "-j", "CT", "--zone", "1",
                    nft=f"udp sport 53 {f.ip} saddr {s} counter ct zone set 1",
                )  # fmt: skip

    def outbound_include(self) -> None:
        virt = self.cfg.kube_virt_interfaces
        if self.cfg.outbound_ip_ranges_include.wildcard:
            self.b.append(NAT, OUTPUT, "-j", REDIRECT, nft="counter jump istio-redirect")
            for iface in virt:
                self.b.insert(
                    NAT,
                    "PREROUTING",
                    1,
                    "-i",
                    iface,
                    "-j",
                    REDIRECT,
                    nft=f"iifname {_nft_iface(iface)} counter jump istio-redirect",
                )
            return
        for f in self.fams:
            for cidr, nft_cidr in self.items(f.include_cidrs):
                for iface in virt:
                    self.b.insert(
                        NAT, "PREROUTING", 1, "-i", iface, "-d", cidr, "-j", REDIRECT,
                        nft=f"iifname {_nft_iface(iface)} {f.ip} daddr {nft_cidr}"
                        " counter jump istio-redirect",
                    )  # fmt: skip
                self.b.append(
                    NAT,
                    OUTPUT,
                    "-d",
                    cidr,
                    "-j",
                    REDIRECT,
                    nft=f"{f.ip} daddr {nft_cidr} counter jump istio-redirect",
                )

    # -- TPROXY -----------------------------------------------------------------------------
    def tproxy_marks(self) -> None:
        c = self.cfg
        mark = str(c.tproxy_mark)
        # Save the mark Envoy's original_src listener filter sets as the connection mark.
        self.b.append(
            MANGLE, "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark",
            nft=f"meta l4proto tcp mark {mark} counter ct mark set mark",
        )  # fmt: skip
        # Envoy -> app packets are already marked; do not mark them again.
        self.b.append(
            MANGLE, "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN",
            nft=f"oifname lo meta l4proto tcp mark {mark} counter return",
        )  # fmt: skip
        owners = [("--uid-owner", "skuid", u) for u in c.proxy_uids] + [
            ("--gid-owner", "skgid", g) for g in c.proxy_gids
        ]
        for flag, nft_owner, owner in owners:
            # app -> VIP -> Envoy outbound -(1338)-> Envoy inbound -> app
            for f in self.fams:
                self.b.append(
                    MANGLE, "OUTPUT", "!", "-d", f.loopback, "-p", "tcp", "-o", "lo",
                    "-m", "owner", flag, owner, "-j", "MARK", "--set-mark", OUTBOUND_MARK,
                    nft=f"oifname lo meta l4proto tcp {f.ip} daddr != {f.loopback} {nft_owner} {owner}"
                    f" counter meta mark set {OUTBOUND_MARK}",
                )  # fmt: skip
        # Replies from the workload follow the policy route set up for TPROXY.
        self.b.append(
            MANGLE, "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark,
            "-j", "CONNMARK", "--restore-mark",
            nft=f"meta l4proto tcp ct mark {mark} counter meta mark set ct mark",
        )  # fmt: skip
        self.b.insert(
            MANGLE, INBOUND, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN",
            nft=f"meta l4proto tcp mark {mark} counter return",
        )  # fmt: skip
        # Envoy/agent -> app via the passthrough source address is not captured again.
        for f in self.fams:
            self.b.insert(
                MANGLE, INBOUND, 2, "-p", "tcp", "-s", f.passthrough, "-i", "lo", "-j", "RETURN",
                nft=f"iifname lo meta l4proto tcp {f.ip} saddr {f.passthrough} counter return",
            )  # fmt: skip
        # app -> app by pod IP is not captured.
        self.b.insert(
            MANGLE, INBOUND, 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK,
            "-j", "RETURN",
            nft=f"iifname lo meta l4proto tcp mark != {OUTBOUND_MARK} counter return",
        )  # fmt: skip


def _extras(config: Config) -> tuple[tuple[PolicyRoute, ...], tuple[str, ...]]:
    """The TPROXY policy routes and the loopback addresses, whichever backend writes the rules."""
    families = [Family.V4, Family.V6] if config.enable_ipv6 else [Family.V4]
    routes: tuple[PolicyRoute, ...] = ()
    if config.interception_mode is InterceptionMode.TPROXY and not config.inbound_ports.empty:
        routes = tuple(PolicyRoute(f, config.tproxy_mark, config.tproxy_route_table) for f in families)
    lo_addrs: tuple[str, ...] = ("::6/128",) if config.enable_ipv6 else ()
    return routes, lo_addrs


def plan(config: Config) -> Ruleset:
    """Turn a validated Config into the iptables rules (and TPROXY routes) for IPv4 and, if enabled,
    IPv6."""
    families = [Family.V4, Family.V6] if config.enable_ipv6 else [Family.V4]
    planned = [FamilyRules(f, _Plan(config, [f]).rules()) for f in families]
    routes, lo_addrs = _extras(config)
    return Ruleset(
        v4=planned[0],
        v6=planned[1] if config.enable_ipv6 else None,
        routes=routes,
        loopback_addresses=lo_addrs,
    )


def plan_nft(config: Config) -> NftRules:
    """Turn a validated Config into the native nftables rules: one ``inet`` rule list for both
    families (IPv6 twins only when IPv6 is enabled), with the same routes as ``plan``."""
    families = [Family.V4, Family.V6] if config.enable_ipv6 else [Family.V4]
    routes, lo_addrs = _extras(config)
    return NftRules(_Plan(config, families, nft=True).rules(), routes, lo_addrs)
