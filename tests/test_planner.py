"""The planner on its own: pure, family-aware, and structurally sound for any valid Config."""

from __future__ import annotations

import builtins
import ipaddress
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.config import CidrSpec, Config, InterceptionMode, OwnerGroups, PortSpec
from istio_iptables.planner import plan
from istio_iptables.render import render_dry_run, render_family
from istio_iptables.ruleset import BUILTIN_CHAINS, ISTIO_CHAINS, Family, Rule

CLASSIC = Config(
    inbound_ports=PortSpec(wildcard=True),
    inbound_ports_exclude=(15090, 15021, 15020),
    outbound_ip_ranges_include=CidrSpec(wildcard=True),
)
STANDARD_TARGETS = {"RETURN", "ACCEPT", "DROP", "REDIRECT", "TPROXY", "MARK", "CONNMARK", "CT"}


def lines(fr) -> list[str]:
    return [r.restore_line() for r in fr.rules]


def test_classic_rules_in_istio_order() -> None:
    rs = plan(CLASSIC)
    assert rs.v6 is None and rs.routes == () and rs.loopback_addresses == ()
    assert lines(rs.v4) == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]
    assert rs.v4.new_chains("nat") == ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"]


def test_ipv6_uses_the_same_steps_with_ipv6_values() -> None:
    rs = plan(CLASSIC._replace(enable_ipv6=True))
    assert rs.v6 is not None
    v4, v6 = lines(rs.v4), lines(rs.v6)
    assert len(v4) == len(v6)
    swapped = [line.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128") for line in v4]
    assert swapped == v6
    assert [str(a) for a in rs.loopback_addresses] == ["::6/128"]


def test_cidrs_go_to_their_own_family() -> None:
    cfg = Config(
        enable_ipv6=True,
        outbound_ip_ranges_include=CidrSpec(
            cidrs=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
        ),
        outbound_ip_ranges_exclude=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/32")),
    )
    rs = plan(cfg)
    assert rs.v6 is not None
    v4, v6 = "\n".join(lines(rs.v4)), "\n".join(lines(rs.v6))
    assert "-d 10.0.0.0/8 -j ISTIO_REDIRECT" in v4 and "fd00" not in v4
    assert "-d fd00::/8 -j ISTIO_REDIRECT" in v6 and "10.0.0.0" not in v6
    assert "-d 10.1.0.0/16 -j RETURN" in v4 and "-d fd00:1::/32 -j RETURN" in v6


def test_tproxy_routes_follow_mode_and_inbound_ports() -> None:
    base = {"interception_mode": InterceptionMode.TPROXY, "tproxy_mark": 77, "tproxy_route_table": 99}
    rs = plan(Config(**base, inbound_ports=PortSpec(ports=(80,)), enable_ipv6=True))
    assert [(r.family, r.mark, r.table) for r in rs.routes] == [(Family.V4, 77, 99), (Family.V6, 77, 99)]
    assert plan(Config(**base)).routes == ()
    assert plan(Config(inbound_ports=PortSpec(ports=(80,)))).routes == ()


def test_redirect_dns_without_servers_is_off() -> None:
    rs = plan(Config(redirect_dns=True))
    assert all(r.table != "raw" and r.chain != "ISTIO_OUTPUT_DNS" for r in rs.v4.rules)
    rs = plan(Config(redirect_dns=True, capture_all_dns=True))
    assert any(r.chain == "ISTIO_OUTPUT_DNS" and r.table == "raw" for r in rs.v4.rules)


def test_dns_servers_of_one_family_jump_only_there() -> None:
    rs = plan(
        Config(redirect_dns=True, enable_ipv6=True, dns_servers_v4=(ipaddress.IPv4Address("10.0.0.10"),))
    )
    assert rs.v6 is not None
    jump = "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS"
    assert jump in lines(rs.v4) and jump not in lines(rs.v6)
    assert "ISTIO_OUTPUT_DNS" not in rs.v6.new_chains("nat")
    assert "ISTIO_OUTPUT_DNS" in rs.v6.new_chains("raw")


def test_owner_group_include_is_one_combined_rule() -> None:
    rs = plan(Config(owner_groups=OwnerGroups(except_=False, values=("java", "202"))))
    assert "-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN" in lines(rs.v4)


def test_insert_renders_with_position() -> None:
    rule = Rule("nat", "PREROUTING", ("-i", "eth1"), "RETURN", position=1)
    assert rule.restore_line() == "-I PREROUTING 1 -i eth1 -j RETURN"


def test_render_layout() -> None:
    out = render_dry_run(plan(CLASSIC._replace(enable_ipv6=True)))
    assert out.startswith("# iptables-restore\n* nat\n-N ISTIO_INBOUND\n")
    assert out.count("# ip6tables-restore\n") == 1
    assert out.endswith("COMMIT\n")
    doc = render_family(plan(CLASSIC).v4)
    assert doc.count("COMMIT") == 1


def test_plan_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("plan() must not do I/O")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    plan(Config(enable_ipv6=True, redirect_dns=True, capture_all_dns=True))


def test_large_inputs_scale_linearly_in_rules() -> None:
    cidrs = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(10_000))
    ports = tuple(range(20_000, 21_000))
    rs = plan(
        Config(
            outbound_ip_ranges_exclude=cidrs,
            outbound_ports_include=ports,
            inbound_ports=PortSpec(ports=ports),
        )
    )
    assert len(rs.v4.rules) < 10_000 + 2 * 1_000 + 50


ports = st.lists(st.integers(1, 65535), max_size=4).map(tuple)
v4nets = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=4), st.integers(0, 32)
)
v6nets = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=6), st.integers(0, 128)
)
nets = st.lists(st.one_of(v4nets, v6nets), max_size=4).map(tuple)
ifaces = st.lists(st.sampled_from(["eth1", "net1", "veth0"]), max_size=2, unique=True).map(tuple)
owners = st.lists(st.sampled_from(["1337", "0", "3", "1000"]), min_size=1, max_size=2, unique=True).map(tuple)

configs = st.builds(
    Config,
    proxy_uids=owners,
    proxy_gids=owners,
    interception_mode=st.sampled_from(list(InterceptionMode)),
    inbound_ports=st.one_of(st.just(PortSpec(wildcard=True)), st.builds(PortSpec, ports=ports)),
    inbound_ports_exclude=ports,
    exclude_interfaces=ifaces,
    outbound_ip_ranges_include=st.one_of(st.just(CidrSpec(wildcard=True)), st.builds(CidrSpec, cidrs=nets)),
    outbound_ip_ranges_exclude=nets,
    outbound_ports_include=ports,
    outbound_ports_exclude=ports,
    kube_virt_interfaces=ifaces,
    redirect_dns=st.booleans(),
    capture_all_dns=st.booleans(),
    dns_servers_v4=st.lists(st.ip_addresses(v=4), max_size=2).map(tuple),
    dns_servers_v6=st.lists(st.ip_addresses(v=6), max_size=2).map(tuple),
    drop_invalid=st.booleans(),
    enable_ipv6=st.booleans(),
)


@given(configs)
def test_any_config_gives_a_consistent_ruleset(cfg: Config) -> None:
    rs = plan(cfg)
    assert (rs.v6 is not None) == cfg.enable_ipv6
    for fr in rs.families:
        other = "." if fr.family is Family.V6 else ":"
        for table in fr.tables():
            created = set(fr.new_chains(table))
            assert created <= set(ISTIO_CHAINS)
            for r in fr.rules_of(table):
                assert r.chain in BUILTIN_CHAINS or r.chain in created
                assert r.target in STANDARD_TARGETS or r.target in created
                for i, arg in enumerate(r.matches):
                    if r.matches[i - 1] in ("-d", "-s") and i > 0:
                        assert other not in arg, f"{fr.family}: {r.restore_line()}"


@given(configs)
def test_planned_sections_are_what_the_rendered_document_says(cfg: Config) -> None:
    # The applier compares the planned rules as values; they must be exactly what the document
    # it loads (and --dry-run prints) holds.
    from istio_iptables import state

    for fr in plan(cfg).families:
        assert state.planned_sections(fr) == state.parse_restore(render_family(fr))
