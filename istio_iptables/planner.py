"""The pure rule planner: ``plan(config) -> Ruleset``, with Istio's semantics, for IPv4 and IPv6.

Each family is planned by the same steps with the family as a parameter. Steps append rules in
the exact order Istio issues them, because that order (including ``-I ... 1`` inserts into
built-in chains) decides the final chain contents in the kernel.
"""

from __future__ import annotations

from .config import Config, InterceptionMode
from .lean import TYPE_CHECKING
from .ruleset import Family, FamilyRules, PolicyRoute, Rule, Ruleset

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address

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


class _Builder:
    """Collects the rules of one family in order."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def append(self, table: str, chain: str, *args: str) -> None:
        self.rules.append(_rule(table, chain, args, None))

    def insert(self, table: str, chain: str, position: int, *args: str) -> None:
        self.rules.append(_rule(table, chain, args, position))


def _rule(table: str, chain: str, args: tuple[str, ...], position: int | None) -> Rule:
    j = args.index("-j")
    return Rule(table, chain, args[:j], args[j + 1], args[j + 2 :], position)


class _FamilyPlan:
    """Plans one family. Attributes are the per-family values Istio substitutes into shared rules."""

    def __init__(self, cfg: Config, family: Family) -> None:
        self.cfg = cfg
        self.family = family
        self.b = _Builder()
        v = family.value
        self.loopback = cfg.host_ipv4_loopback_cidr if family is Family.V4 else "::1/128"
        self.passthrough = family.inbound_passthrough_source
        self.exclude_cidrs = [c for c in cfg.outbound_ip_ranges_exclude if c.version == v]
        self.include = cfg.outbound_ip_ranges_include
        self.include_cidrs = self.include.of_version(v)
        servers: tuple[IPv4Address, ...] | tuple[IPv6Address, ...]
        servers = cfg.dns_servers_v4 if family is Family.V4 else cfg.dns_servers_v6
        self.dns_servers = [f"{s}/{family.host_prefixlen}" for s in servers]
        self.tproxy = cfg.interception_mode is InterceptionMode.TPROXY
        # Istio turns DNS capture off when there is nothing to capture.
        self.redirect_dns = cfg.redirect_dns and (
            cfg.capture_all_dns or bool(cfg.dns_servers_v4) or bool(cfg.dns_servers_v6)
        )

    def plan(self) -> FamilyRules:
        self.exclude_interfaces()
        self.kube_virt_interfaces_bypass()
        self.drop_invalid()
        self.base_chains()
        self.inbound()
        self.outbound()
        if self.tproxy:
            self.tproxy_marks()
        return FamilyRules(self.family, tuple(self.b.rules))

    # -- interfaces -------------------------------------------------------------------------
    def exclude_interfaces(self) -> None:
        for iface in self.cfg.exclude_interfaces:
            self.b.append(NAT, "PREROUTING", "-i", iface, "-j", "RETURN")
            self.b.append(NAT, "OUTPUT", "-o", iface, "-j", "RETURN")
        if self.tproxy:
            for iface in self.cfg.exclude_interfaces:
                self.b.append(MANGLE, "PREROUTING", "-i", iface, "-j", "RETURN")
                self.b.append(MANGLE, "OUTPUT", "-o", iface, "-j", "RETURN")

    def kube_virt_interfaces_bypass(self) -> None:
        for iface in self.cfg.kube_virt_interfaces:
            self.b.insert(NAT, "PREROUTING", 1, "-i", iface, "-j", "RETURN")

    def drop_invalid(self) -> None:
        if self.cfg.drop_invalid:
            self.b.append(MANGLE, "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", DROP)
            self.b.append(MANGLE, DROP, "-j", "DROP")

    # -- chains shared by inbound and outbound --------------------------------------------
    def base_chains(self) -> None:
        c = self.cfg
        self.b.append(NAT, INBOUND, "-p", "tcp", "--dport", str(c.inbound_tunnel_port), "-j", "RETURN")
        self.b.append(NAT, REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.proxy_port))
        self.b.append(
            NAT, IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.inbound_capture_port)
        )

    # -- inbound ----------------------------------------------------------------------------
    def inbound(self) -> None:
        c = self.cfg
        if c.inbound_ports.empty:
            return
        if self.tproxy:
            self.b.append(MANGLE, DIVERT, "-j", "MARK", "--set-mark", str(c.tproxy_mark))
            self.b.append(MANGLE, DIVERT, "-j", "ACCEPT")
            self.b.append(
                MANGLE, TPROXY, "!", "-d", self.loopback, "-p", "tcp",
                "-j", "TPROXY", "--tproxy-mark", f"{c.tproxy_mark}/0xffffffff",
                "--on-port", str(c.inbound_capture_port),
            )  # fmt: skip
        table = MANGLE if self.tproxy else NAT
        self.b.append(table, "PREROUTING", "-p", "tcp", "-j", INBOUND)
        if c.inbound_ports.wildcard:
            for port in c.inbound_ports_exclude:
                self.b.append(table, INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
            self.capture_inbound(())
        else:
            for port in c.inbound_ports.ports:
                self.capture_inbound(("--dport", str(port)))

    def capture_inbound(self, port_match: tuple[str, ...]) -> None:
        if self.tproxy:
            # Packets of established connections go to lo; new ones are handed to TPROXY.
            self.b.append(
                MANGLE, INBOUND, "-p", "tcp", *port_match,
                "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", DIVERT,
            )  # fmt: skip
            self.b.append(MANGLE, INBOUND, "-p", "tcp", *port_match, "-j", TPROXY)
        else:
            self.b.append(NAT, INBOUND, "-p", "tcp", *port_match, "-j", IN_REDIRECT)

    # -- outbound ---------------------------------------------------------------------------
    def outbound(self) -> None:
        c = self.cfg
        self.b.append(NAT, "OUTPUT", "-j", OUTPUT)
        # Port exclusions come before the rules that send connections back to self.
        for port in c.outbound_ports_exclude:
            self.b.append(NAT, OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
            self.b.append(NAT, OUTPUT, "-p", "udp", "--dport", str(port), "-j", "RETURN")
        # Envoy's inbound passthrough cluster binds this source address.
        self.b.append(NAT, OUTPUT, "-o", "lo", "-s", self.passthrough, "-j", "RETURN")
        for uid in c.proxy_uids:
            self.proxy_owner("--uid-owner", uid, dns_aware_redirect=True)
        for gid in c.proxy_gids:
            self.proxy_owner("--gid-owner", gid, dns_aware_redirect=False)
        self.owner_groups()
        if self.redirect_dns:
            self.dns()
        # Envoy-aware applications and container-to-container traffic use localhost.
        self.b.append(NAT, OUTPUT, "-d", self.loopback, "-j", "RETURN")
        for cidr in self.exclude_cidrs:
            self.b.append(NAT, OUTPUT, "-d", str(cidr), "-j", "RETURN")
        for port in c.outbound_ports_include:
            self.b.append(NAT, OUTPUT, "-p", "tcp", "--dport", str(port), "-j", REDIRECT)
        self.outbound_include()

    def proxy_owner(self, owner_flag: str, owner: str, *, dns_aware_redirect: bool) -> None:
        """Rules for one proxy uid or gid: app -> VIP -> Envoy -> Envoy -> app, and no loops."""
        c = self.cfg
        tunnel = str(c.inbound_tunnel_port)
        if self.redirect_dns and dns_aware_redirect:
            port_match: tuple[str, ...] = ("-m", "multiport", "!", "--dports", f"53,{tunnel}")
        else:
            port_match = ("!", "--dport", tunnel)
        self.b.append(
            NAT, OUTPUT, "-o", "lo", "!", "-d", self.loopback, "-p", "tcp", *port_match,
            "-m", "owner", owner_flag, owner, "-j", IN_REDIRECT,
        )  # fmt: skip
        # An explicitly included loopback range means app -> app over lo is captured too.
        include_has_loopback = c.outbound_ip_ranges_include.has_loopback
        if not include_has_loopback:
            if self.redirect_dns:
                # TCP DNS to a server on localhost must still reach the DNS capture rules.
                self.b.append(
                    NAT, OUTPUT, "-o", "lo", "-p", "tcp", "!", "--dport", "53",
                    "-m", "owner", "!", owner_flag, owner, "-j", "RETURN",
                )  # fmt: skip
            else:
                self.b.append(NAT, OUTPUT, "-o", "lo", "-m", "owner", "!", owner_flag, owner, "-j", "RETURN")
        # The proxy's own traffic, any protocol and destination, is never captured.
        self.b.append(NAT, OUTPUT, "-m", "owner", owner_flag, owner, "-j", "RETURN")

    def owner_groups(self) -> None:
        groups = self.cfg.owner_groups
        if groups.except_:
            for group in groups.values:
                self.b.append(NAT, OUTPUT, "-m", "owner", "--gid-owner", group, "-j", "RETURN")
        else:
            none_of: list[str] = []
            for group in groups.values:
                none_of += ["-m", "owner", "!", "--gid-owner", group]
            self.b.append(NAT, OUTPUT, *none_of, "-j", "RETURN")

    def dns(self) -> None:
        c = self.cfg
        capture_all = c.capture_all_dns
        servers = self.dns_servers
        # raw/OUTPUT jumps unconditionally; nat only for a family that has something to capture.
        self.b.append(RAW, "OUTPUT", "-j", OUTPUT_DNS)
        if capture_all or servers:
            self.b.append(NAT, OUTPUT, "-j", OUTPUT_DNS)
        # All TCP rules, then all UDP ones; Istio spells the REDIRECT option differently for each.
        destinations: list[tuple[str, ...]] = [()] if capture_all else [("-d", s) for s in servers]
        for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
            for dst in destinations:
                self.b.append(
                    NAT, OUTPUT_DNS, "-p", proto, "--dport", "53", *dst,
                    "-j", "REDIRECT", to_ports, DNS_PROXY_PORT,
                )  # fmt: skip
        self.dns_conntrack_zones(capture_all, servers)

    def dns_conntrack_zones(self, capture_all: bool, servers: list[str]) -> None:
        """Proxy <-> upstream DNS in zone 1, app <-> proxy in zone 2, so UDP conntrack entries never clash."""
        owners = [("--uid-owner", u) for u in self.cfg.proxy_uids] + [
            ("--gid-owner", g) for g in self.cfg.proxy_gids
        ]
        for flag, owner in owners:
            self.b.append(
                RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-m", "owner", flag, owner,
                "-j", "CT", "--zone", "1",
            )  # fmt: skip
            self.b.append(
                RAW, OUTPUT_DNS, "-p", "udp", "--sport", DNS_PROXY_PORT, "-m", "owner", flag, owner,
                "-j", "CT", "--zone", "2",
            )  # fmt: skip
        if capture_all:
            self.b.append(RAW, "PREROUTING", "-j", INBOUND)
            self.b.append(RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
            self.b.append(RAW, INBOUND, "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
            return
        if servers:
            self.b.append(RAW, "PREROUTING", "-j", INBOUND)
        for s in servers:
            self.b.append(RAW, OUTPUT_DNS, "-p", "udp", "--dport", "53", "-d", s, "-j", "CT", "--zone", "2")
            self.b.append(RAW, INBOUND, "-p", "udp", "--sport", "53", "-s", s, "-j", "CT", "--zone", "1")

    def outbound_include(self) -> None:
        virt = self.cfg.kube_virt_interfaces
        if self.include.wildcard:
            self.b.append(NAT, OUTPUT, "-j", REDIRECT)
            for iface in virt:
                self.b.insert(NAT, "PREROUTING", 1, "-i", iface, "-j", REDIRECT)
            return
        for cidr in self.include_cidrs:
            for iface in virt:
                self.b.insert(NAT, "PREROUTING", 1, "-i", iface, "-d", str(cidr), "-j", REDIRECT)
            self.b.append(NAT, OUTPUT, "-d", str(cidr), "-j", REDIRECT)

    # -- TPROXY -----------------------------------------------------------------------------
    def tproxy_marks(self) -> None:
        c = self.cfg
        mark = str(c.tproxy_mark)
        # Save the mark Envoy's original_src listener filter sets as the connection mark.
        self.b.append(
            MANGLE, "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark"
        )
        # Envoy -> app packets are already marked; do not mark them again.
        self.b.append(MANGLE, "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
        owners = [("--uid-owner", u) for u in c.proxy_uids] + [("--gid-owner", g) for g in c.proxy_gids]
        for flag, owner in owners:
            # app -> VIP -> Envoy outbound -(1338)-> Envoy inbound -> app
            self.b.append(
                MANGLE, "OUTPUT", "!", "-d", self.loopback, "-p", "tcp", "-o", "lo",
                "-m", "owner", flag, owner, "-j", "MARK", "--set-mark", OUTBOUND_MARK,
            )  # fmt: skip
        # Replies from the workload follow the policy route set up for TPROXY.
        self.b.append(
            MANGLE,
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--restore-mark",
        )
        self.b.insert(MANGLE, INBOUND, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
        # Envoy/agent -> app via the passthrough source address is not captured again.
        self.b.insert(MANGLE, INBOUND, 2, "-p", "tcp", "-s", self.passthrough, "-i", "lo", "-j", "RETURN")
        # app -> app by pod IP is not captured.
        self.b.insert(
            MANGLE,
            INBOUND,
            3,
            "-p",
            "tcp",
            "-i",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            OUTBOUND_MARK,
            "-j",
            "RETURN",
        )


def plan(config: Config) -> Ruleset:
    """Turn a validated Config into the rules (and TPROXY routes) for IPv4 and, if enabled, IPv6."""
    families = [Family.V4, Family.V6] if config.enable_ipv6 else [Family.V4]
    planned = [_FamilyPlan(config, f).plan() for f in families]
    routes: tuple[PolicyRoute, ...] = ()
    if config.interception_mode is InterceptionMode.TPROXY and not config.inbound_ports.empty:
        routes = tuple(PolicyRoute(f, config.tproxy_mark, config.tproxy_route_table) for f in families)
    lo_addrs: tuple[str, ...] = ("::6/128",) if config.enable_ipv6 else ()
    return Ruleset(
        v4=planned[0],
        v6=planned[1] if config.enable_ipv6 else None,
        routes=routes,
        loopback_addresses=lo_addrs,
    )
