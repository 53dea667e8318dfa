"""``--explain``: the packet description, the evaluator's semantics on rules of every spelling
(iptables-save lines, the planner's nft bodies, ``nft -j`` JSON, foreign rules included), and
the command (text and JSON output, errors, nothing imported on the normal path). The kernel proof
is tests/test_explain_kernel.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from istio_iptables import cli
from istio_iptables import explain as x
from istio_iptables import explain_live as el
from istio_iptables import explain_rules as er
from istio_iptables.config import ConfigError
from istio_iptables.netns import open_netns
from istio_iptables.options import load
from istio_iptables.packet import parse_packet
from tests.support.netns import NetNS

ROOT = Path(__file__).resolve().parent.parent
CLASSIC = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
           "-d", "15090,15021,15020", "--enable-ipv6", "--dns-servers="]  # fmt: skip
EXAMPLES = [
    "out tcp 10.0.0.5:40000 -> 10.96.0.10:80 uid=1000 gid=1000 oif=eth0",
    "in tcp 192.168.1.7:5555 -> 10.0.0.5:8080 iif=eth0",
    "out udp [fd00::5]:5353 -> [fd00::a]:53 uid=0 oif=eth0",
]


def walk(text: str, packet: str, family: int | None = None) -> x.Walk:
    """The walk of ``packet`` through the iptables-save document ``text``."""
    p = parse_packet(packet)
    model = x.Model(er.iptables_tables(text, family or p.family, "test"), "test rules")
    return x.explain(model, p)


def planned(args: list[str], packet: str, env: dict[str, str] | None = None) -> x.Walk:
    values = dict(a[2:].split("=", 1) for a in cli.normalize_argv(args)[0])
    cfg, opts = load(values, env or {})
    p = parse_packet(packet)
    return x.explain(el.planned_model(cfg, opts.native_nftables, p.family), p)


def nft_json(
    rules: list[tuple[str, str, list[dict[str, object]]]], chains: dict[str, dict[str, object]]
) -> x.Model:
    items: list[dict[str, object]] = [{"table": {"family": "inet", "name": "t", "handle": 1}}]
    for name, spec in chains.items():
        items.append({"chain": {"family": "inet", "table": "t", "name": name, **spec}})
    for _table, chain, expr in rules:
        items.append({"rule": {"family": "inet", "table": "t", "chain": chain, "expr": expr}})
    tables, _ = er.nft_json_tables(items)
    return x.Model(tables, "test nft rules")


# --------------------------------------------------------------------------- the description


@pytest.mark.parametrize("text", EXAMPLES)
def test_the_issues_examples_parse(text: str) -> None:
    p = parse_packet(text)
    assert p.describe().startswith(text.split(" uid=")[0].split(" iif=")[0])


def test_fields() -> None:
    p = parse_packet("out udp [fd00::5]:5353->[fd00::a]:53 uid=7 mark=0x539 oif=eth1")
    assert (p.direction, p.proto, str(p.src), p.sport, str(p.dst), p.dport) == (
        "out",
        "udp",
        "fd00::5",
        5353,
        "fd00::a",
        53,
    )
    assert (p.uid, p.gid, p.gid_given, p.mark, p.oif, p.iif, p.family) == (7, 7, False, 1337, "eth1", None, 6)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("", "expected out|in"),
        ("sideways tcp 1.2.3.4:1 -> 1.2.3.5:2", "direction 'sideways'"),
        ("out icmp 1.2.3.4:1 -> 1.2.3.5:2", "protocol 'icmp'"),
        ("out tcp 1.2.3.4 -> 1.2.3.5:2", "source '1.2.3.4'"),
        ("out tcp 1.2.3.400:1 -> 1.2.3.5:2", "source address '1.2.3.400'"),
        ("out tcp 1.2.3.4:0 -> 1.2.3.5:2", "source port '0'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:65536", "destination port '65536'"),
        ("out tcp fd00::1:1 -> [fd00::2]:2", "brackets"),
        ("out tcp [1.2.3.4]:1 -> 1.2.3.5:2", "brackets are for IPv6"),
        ("out tcp 1.2.3.4:1 -> [fd00::2]:2", "same IP family"),
        ("out tcp 1.2.3.4:1 => 1.2.3.5:2", "'->'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 user=1", "unknown field 'user=1'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=x", "uid 'x'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=4294967295", "uid '4294967295'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=1 uid=2", "uid= given twice"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 mark=0xg", "mark '0xg'"),
        ("out tcp 1.2.3.4:1 -> 1.2.3.5:2 iif=eth0", "iif=: a locally sent"),
        ("in tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=0", "uid=: an arriving"),
        ("in tcp 1.2.3.4:1 -> 1.2.3.5:2 oif=eth0", "oif=: an arriving"),
        ("in tcp 1.2.3.4:1 -> 1.2.3.5:2 iif=this-name-is-too-long", "iif='this-name-is-too-long'"),
    ],
)
def test_a_bad_description_names_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_packet(text)
    msg = str(e.value)
    assert msg.startswith(f"invalid value {text!r} for --explain: ") or text == ""
    assert part in msg and "\n" not in msg


# --------------------------------------------------------------------------- planned rules


def test_outbound_is_redirected_and_loops_back_without_nat_again() -> None:
    w = planned(CLASSIC, EXAMPLES[0])
    assert w.verdict.text == "redirect to :15001"
    text = x.render_text(w)
    assert "no match: -o lo: the output interface is eth0" in text
    assert "no match: -m owner --uid-owner 1337: uid is 1000" in text
    assert "destination now 127.0.0.1:15001" in text
    assert "not consulted: the destination NAT was done (REDIRECT) at the output hook" in text
    assert text.endswith("verdict: redirect to :15001\n")


@pytest.mark.parametrize("native", [False, True], ids=["iptables", "nftables"])
@pytest.mark.parametrize(
    ("packet", "verdict"),
    [
        (EXAMPLES[0], "redirect to :15001"),
        (EXAMPLES[1], "redirect to :15006"),
        (EXAMPLES[2], "not captured"),  # UDP is captured only for DNS
        ("out tcp 10.0.0.5:40000 -> 10.96.0.10:80 uid=1337 oif=eth0", "not captured"),
        ("out tcp 10.0.0.5:40000 -> 10.96.0.10:80 uid=1000 gid=1337 oif=eth0", "not captured"),
        ("out tcp 127.0.0.1:40000 -> 127.0.0.1:8080 uid=1000", "not captured"),
        ("out tcp 10.0.0.5:40000 -> 10.0.0.5:8080 uid=1000", "not captured"),  # app -> own IP
        ("out tcp 10.0.0.5:40000 -> 10.0.0.5:8080 uid=1337", "redirect to :15006"),  # proxy -> own IP
        ("out tcp 127.0.0.6:40000 -> 10.0.0.5:8080 uid=1337 oif=lo", "not captured"),  # passthrough
        ("out tcp [::6]:40000 -> [fd00::5]:8080 uid=1337 oif=lo", "not captured"),
        ("in tcp 192.168.1.7:5555 -> 10.0.0.5:15008 iif=eth0", "not captured"),  # tunnel port
        ("in tcp 192.168.1.7:5555 -> 10.0.0.5:15021 iif=eth0", "not captured"),  # -d
        ("in tcp [fd00::7]:5555 -> [fd00::5]:8080 iif=eth0", "redirect to :15006"),
        ("in udp 192.168.1.7:5555 -> 10.0.0.5:8080 iif=eth0", "not captured"),
    ],
)
def test_classic_sidecar_verdicts(native: bool, packet: str, verdict: str) -> None:
    args = CLASSIC + (["--native-nftables"] if native else [])
    assert planned(args, packet).verdict.text == verdict


@pytest.mark.parametrize("native", [False, True], ids=["iptables", "nftables"])
def test_tproxy_verdict_names_port_and_mark(native: bool) -> None:
    args = [*CLASSIC, "-m", "TPROXY", "-t", "1400"] + (["--native-nftables"] if native else [])
    w = planned(args, EXAMPLES[1])
    assert w.verdict.text == "tproxy to :15006 mark 1400"
    assert (w.verdict.kind, w.verdict.port, w.verdict.mark) == ("tproxy", 15006, 1400)
    # The proxy calling its own pod's tunnel port: marked 1338 on the way out, TPROXY-ed on lo.
    w = planned(args, "out tcp 10.0.0.5:40000 -> 10.0.0.5:15008 uid=1337")
    assert w.verdict.text == "tproxy to :15006 mark 1400"
    assert "mark set to 0x53a (1338)" in x.render_text(w)


@pytest.mark.parametrize("native", [False, True], ids=["iptables", "nftables"])
def test_dns_capture(native: bool) -> None:
    args = [*CLASSIC, "--redirect-dns", "--dns-servers", "10.96.0.10,fd00::a"] + (
        ["--native-nftables"] if native else []
    )
    assert (
        planned(args, "out udp 10.0.0.5:5353 -> 10.96.0.10:53 uid=1000 oif=eth0").verdict.text
        == "redirect to :15053"
    )
    assert (
        planned(args, "out tcp 10.0.0.5:5353 -> 10.96.0.10:53 uid=1000 oif=eth0").verdict.text
        == "redirect to :15053"
    )
    assert planned(args, EXAMPLES[2]).verdict.text == "redirect to :15053"
    # The agent's own queries go out; another server is not captured.
    assert (
        planned(args, "out udp 10.0.0.5:5353 -> 10.96.0.10:53 uid=1337 oif=eth0").verdict.text
        == "not captured"
    )
    assert (
        planned(args, "out udp 10.0.0.5:5353 -> 8.8.8.8:53 uid=1000 oif=eth0").verdict.text == "not captured"
    )
    text = x.render_text(planned(args, "out udp 10.0.0.5:5353 -> 10.96.0.10:53 uid=1000 oif=eth0"))
    assert "conntrack zone 2" in text


def test_exclusions_and_includes() -> None:
    args = [
        *CLASSIC[:8],
        "-i",
        "10.96.0.0/12",
        "-x",
        "10.96.5.0/24",
        "-o",
        "8443",
        "-q",
        "9999",
        "-c",
        "eth1",
    ]
    assert (
        planned(args, "out tcp 10.0.0.5:1 -> 10.96.0.10:80 uid=1000 oif=eth0").verdict.text
        == "redirect to :15001"
    )
    assert (
        planned(args, "out tcp 10.0.0.5:1 -> 10.96.5.1:80 uid=1000 oif=eth0").verdict.text == "not captured"
    )
    assert (
        planned(args, "out tcp 10.0.0.5:1 -> 10.96.0.10:8443 uid=1000 oif=eth0").verdict.text
        == "not captured"
    )
    assert (
        planned(args, "out tcp 10.0.0.5:1 -> 8.8.8.8:9999 uid=1000 oif=eth0").verdict.text
        == "redirect to :15001"
    )
    assert planned(args, "out tcp 10.0.0.5:1 -> 8.8.8.8:80 uid=1000 oif=eth0").verdict.text == "not captured"
    assert (
        planned(args, "out tcp 10.0.0.5:1 -> 10.96.0.10:80 uid=1000 oif=eth1").verdict.text == "not captured"
    )
    w = planned(args, "out tcp 10.0.0.5:1 -> 10.96.5.1:80 uid=1000 oif=eth0")
    assert "-d 10.96.5.0/24: destination 10.96.5.1 is in it" not in x.render_text(w)  # it matched
    assert "match: return" in x.render_text(w)


def test_owner_groups_from_the_environment() -> None:
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS": "1000"}
    assert (
        planned(CLASSIC, "out tcp 10.0.0.5:1 -> 8.8.8.8:80 uid=1000 gid=1000 oif=eth0", env).verdict.kind
        == "redirect"
    )
    assert (
        planned(CLASSIC, "out tcp 10.0.0.5:1 -> 8.8.8.8:80 uid=1000 gid=2000 oif=eth0", env).verdict.kind
        == "not-captured"
    )


def test_kube_virt_interfaces_and_wildcards() -> None:
    args = [*CLASSIC, "-k", "veth+"]
    assert planned(args, "in tcp 10.99.0.7:1 -> 10.99.1.5:80 iif=veth12").verdict.text == "redirect to :15001"
    assert planned(args, "in tcp 10.99.0.7:1 -> 10.0.0.5:8080 iif=eth0").verdict.text == "redirect to :15006"


def test_ipv6_off_plans_no_ip6tables_rules_but_nft_rules_without_addresses_still_act() -> None:
    off = [a for a in CLASSIC if a != "--enable-ipv6"] + ["--no-enable-ipv6"]
    v6 = "out tcp [fd00::5]:1 -> [fd00::a]:80 uid=1000 oif=eth0"
    assert planned(off, v6).verdict.text == "not captured"
    # Istio's nftables rules that name no address act on both families (docs/nftables.md).
    assert planned([*off, "--native-nftables"], v6).verdict.text == "redirect to :15001"


def test_the_oif_assumption() -> None:
    # No oif=: a remote destination leaves by an interface other than lo.
    w = planned(CLASSIC, "out tcp 10.0.0.5:1 -> 10.96.0.10:80 uid=1000")
    assert w.verdict.text == "redirect to :15001"
    assert any("other than lo" in a for a in w.assumptions)
    w = planned([*CLASSIC, "-c", "eth1"], "out tcp 10.0.0.5:1 -> 10.96.0.10:80 uid=1000")
    assert w.verdict.text == "unknown (-t nat -A OUTPUT -o eth1 -j RETURN)"
    assert "the output interface is not known (give oif=NAME)" in x.render_text(w)


def test_uid_is_needed_for_owner_matches() -> None:
    w = planned(CLASSIC, "out tcp 10.0.0.5:1 -> 10.96.0.10:80 oif=eth0")
    assert w.verdict.text == "unknown (-t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN)"
    assert w.events[-1]["event"] == "stop" and "uid= not given" in w.events[-1]["text"]


def test_planned_iptables_and_nft_capture_alike() -> None:
    """Istio's two backends mean the same capture: the same verdict for a grid of packets."""
    configs = [
        CLASSIC,
        [*CLASSIC, "-m", "TPROXY"],
        [
            *CLASSIC[:8],
            "-i",
            "10.96.0.0/12,fd00:96::/64",
            "-x",
            "10.96.1.0/24",
            "-b",
            "8080",
            "-q",
            "9000",
            "--enable-ipv6",
        ],
        [*CLASSIC, "--redirect-dns", "--capture-all-dns", "-o", "53"],
        [*CLASSIC, "-m", "TPROXY", "-b", "8080,9090", "-c", "eth1"],
    ]
    packets = [
        f"{d} {proto} {src}:{40000} -> {dst}:{port} "
        + (f"uid={uid} oif={oif}" if d == "out" else f"iif={oif}")
        for d in ("out", "in")
        for proto in ("tcp", "udp")
        for src, dst in (
            ("10.0.0.5", "10.96.0.10"),
            ("10.0.0.5", "10.0.0.5"),
            ("127.0.0.6", "10.0.0.5"),
            ("[fd00::5]", "[fd00::a]"),
            ("127.0.0.1", "127.0.0.1"),
        )  # fmt: skip
        for port in (80, 53, 8080, 9090, 15008)
        for uid in ((1000, 1337) if d == "out" else (0,))
        for oif in (
            ("lo" if dst == "10.0.0.5" or "127" in dst else "eth0", "eth1") if d == "out" else ("eth0",)
        )
        if not (d == "in" and src.startswith("127"))
    ]
    for args in configs:
        for packet in packets:
            a = planned(args, packet).verdict.text
            b = planned([*args, "--native-nftables"], packet).verdict.text
            assert a == b, f"{' '.join(args)}: {packet}: iptables {a}, nftables {b}"


# --------------------------------------------------------------------------- rules as iptables-save prints them

FOREIGN = """\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -m udp --dport 5000 -j CT --notrack
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN - [0:0]
:FOREIGN2 - [0:0]
-A OUTPUT -m comment --comment "a foreign chain" -j FOREIGN
-A FOREIGN -p tcp -m multiport --dports 100:200,300 -j MARK --set-xmark 0x10/0xff
-A FOREIGN -m mark --mark 0x10/0xff -g FOREIGN2
-A FOREIGN -j MARK --set-xmark 0x99/0xffffffff
-A FOREIGN2 -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -m connmark --mark 0x10/0xff -p tcp -j REDIRECT --to-ports 7000
-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j REDIRECT --to-ports 7001
-A OUTPUT -p udp -j REDIRECT --to-ports 7002
-A OUTPUT -p tcp --dport 443 -m addrtype --dst-type LOCAL -j RETURN
-A OUTPUT -p tcp --dport 444 -j DNAT --to-destination 1.2.3.4
-A PREROUTING -i eth+ -p tcp ! --dport 22 -j REDIRECT --to-ports 7003
-A POSTROUTING -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -d 192.0.2.0/24 -j DROP
-A OUTPUT -m owner ! --uid-owner 5 -d 198.51.100.1 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""


def test_foreign_chains_marks_gotos_and_connmark() -> None:
    w = walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:150 uid=1 oif=eth0")
    assert w.verdict.text == "redirect to :7000"
    text = x.render_text(w)
    assert "mark set to 0x10 (16)" in text and "ct mark set to 0x10 (16) from the mark" in text
    assert "FOREIGN2:" in text and "return to" not in text.split("FOREIGN2:")[1].split("nat OUTPUT")[0]
    # Not in the port list: the mark becomes 0x99, the goto is skipped, nothing redirects.
    w = walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:250 uid=1 oif=eth0")
    assert w.verdict.text == "not captured"
    assert "mark set to 0x99 (153)" in x.render_text(w)


def test_new_connection_state_and_untracked_packets() -> None:
    text = x.render_text(walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:250 uid=1 oif=eth0"))
    assert "--ctstate RELATED,ESTABLISHED: conntrack state NEW (the first packet)" in text
    # CT --notrack in raw: no connection, so nat is not consulted at all.
    w = walk(FOREIGN, "out udp 10.0.0.5:1 -> 8.8.8.8:5000 uid=1 oif=eth0")
    assert w.verdict.text == "not captured"
    assert "not consulted: the packet is not tracked" in x.render_text(w)
    assert (
        walk(FOREIGN, "out udp 10.0.0.5:1 -> 8.8.8.8:5001 uid=1 oif=eth0").verdict.text == "redirect to :7002"
    )


def test_what_is_not_modelled_stops_the_walk_but_a_failing_match_still_decides() -> None:
    w = walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:443 uid=1 oif=eth0")
    assert (
        w.verdict.text
        == "unknown (-t nat -A OUTPUT -p tcp --dport 443 -m addrtype --dst-type LOCAL -j RETURN)"
    )
    assert w.verdict.kind == "unknown"
    # The same unknown module, but --dport 443 fails first for another port: the walk goes on.
    w = walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:445 uid=1 oif=eth0")
    assert w.verdict.text == "not captured"
    assert walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:444 uid=1 oif=eth0").verdict.text.startswith(
        "unknown (-t nat -A OUTPUT -p tcp --dport 444 -j DNAT"
    )


def test_filter_drops_and_rejects_and_source_nat() -> None:
    assert walk(FOREIGN, "out tcp 10.0.0.5:1 -> 192.0.2.9:250 uid=1 oif=eth0").verdict.text == "drop"
    assert walk(FOREIGN, "out tcp 10.0.0.5:1 -> 198.51.100.1:250 uid=1 oif=eth0").verdict.text == "drop"
    assert (
        walk(FOREIGN, "out tcp 10.0.0.5:1 -> 198.51.100.1:250 uid=5 oif=eth0").verdict.text == "not captured"
    )
    text = x.render_text(walk(FOREIGN, "out tcp 10.0.0.5:1 -> 8.8.8.8:250 uid=1 oif=eth0"))
    assert "hook postrouting" in text and "source NAT" in text


def test_inbound_interface_wildcards_and_negated_ports() -> None:
    assert walk(FOREIGN, "in tcp 1.1.1.1:1 -> 10.0.0.5:80 iif=eth3").verdict.text == "redirect to :7003"
    assert walk(FOREIGN, "in tcp 1.1.1.1:1 -> 10.0.0.5:22 iif=eth3").verdict.text == "not captured"
    assert walk(FOREIGN, "in tcp 1.1.1.1:1 -> 10.0.0.5:80 iif=veth3").verdict.text == "not captured"
    w = walk(FOREIGN, "in tcp 1.1.1.1:1 -> 10.0.0.5:80")
    assert (
        w.verdict.text
        == "unknown (-t nat -A PREROUTING -i eth+ -p tcp ! --dport 22 -j REDIRECT --to-ports 7003)"
    )


def test_an_inverted_owner_match_matches_a_packet_without_socket() -> None:
    doc = "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m owner ! --uid-owner 5 -j DROP\nCOMMIT\n"
    assert walk(doc, "in tcp 1.1.1.1:1 -> 10.0.0.5:80 iif=eth0").verdict.text == "drop"
    doc = doc.replace("! --uid-owner", "--uid-owner")
    assert walk(doc, "in tcp 1.1.1.1:1 -> 10.0.0.5:80 iif=eth0").verdict.text == "not captured"


def test_ipv6_and_ranges() -> None:
    doc = (
        "*nat\n:OUTPUT ACCEPT [0:0]\n:PREROUTING ACCEPT [0:0]\n"
        "-A OUTPUT ! -d fd00::/64 -p tcp -m tcp --dport 1000:2000 -m owner --uid-owner 10-20 -j REDIRECT --to-ports 9\n"
        "COMMIT\n"
    )
    assert walk(doc, "out tcp [fd00::5]:1 -> [fd01::1]:1500 uid=15 oif=eth0").verdict.text == "redirect to :9"
    assert walk(doc, "out tcp [fd00::5]:1 -> [fd00::1]:1500 uid=15 oif=eth0").verdict.text == "not captured"
    assert walk(doc, "out tcp [fd00::5]:1 -> [fd01::1]:2001 uid=15 oif=eth0").verdict.text == "not captured"
    assert walk(doc, "out tcp [fd00::5]:1 -> [fd01::1]:1500 uid=21 oif=eth0").verdict.text == "not captured"
    text = x.render_text(walk(doc, "out tcp [fd00::5]:1 -> [fd01::1]:1500 uid=15 oif=eth0"))
    assert "destination now [::1]:9" in text


def test_a_rule_that_cannot_be_read_is_unknown() -> None:
    doc = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d not-an-address -j RETURN\nCOMMIT\n"
    w = walk(doc, "out tcp 10.0.0.5:1 -> 8.8.8.8:1 uid=1 oif=eth0")
    assert w.verdict.text == "unknown (-t nat -A OUTPUT -d not-an-address -j RETURN)"


# --------------------------------------------------------------------------- nft: text and JSON


def test_nft_text_and_json_of_one_rule_read_the_same() -> None:
    text = er.parse_nft_rule(
        "oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != { 53, 15008 } skuid 1337 counter jump istio-in-redirect"
    )
    js = er.parse_nft_json_rule([
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "127.0.0.1"}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [53, 15008]}}},
        {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 1337}},
        {"counter": {"packets": 0, "bytes": 0}},
        {"jump": {"target": "istio-in-redirect"}},
    ])  # fmt: skip
    assert text.key() == js.key()
    assert (
        js.text
        == "oifname lo ip daddr != 127.0.0.1 tcp dport != { 53, 15008 } skuid 1337 counter jump istio-in-redirect"
    )


SETS = [
    ("t", "pre", [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth*"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"range": [80, 90]}}},
        {"return": None}]),
    ("t", "pre", [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"range": ["172.16.0.1", "172.16.0.9"]}, "192.168.1.1"]}}},
        {"drop": None}]),
    ("t", "pre", [{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 255]}, "right": 5}}, {"accept": None}]),
    ("t", "pre", [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": None}]),
    ("t", "pre", [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                  {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
                  {"tproxy": {"family": "ip", "port": 15006}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 7}},
                  {"accept": None}]),
    ("t", "out", [{"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": {"range": [1000, 2000]}}},
                  {"xt": {"type": "match", "name": "addrtype"}}, {"accept": None}]),
    ("t", "out", [{"jump": {"target": "mid"}}]),
    ("t", "mid", [{"match": {"op": "==", "left": {"meta": {"key": "skgid"}}, "right": {"set": [5, 7]}}}, {"goto": {"target": "deep"}}]),
    ("t", "mid", [{"drop": None}]),
    ("t", "deep", [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 32]}}}]),
    ("t", "out", [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 32}},
                  {"redirect": {"port": {"range": [7000, 7001]}}}]),
]  # fmt: skip
SET_CHAINS: dict[str, dict[str, object]] = {
    "pre": {"hook": "prerouting", "type": "filter", "prio": -150, "policy": "accept"},
    "out": {"hook": "output", "type": "nat", "prio": -100, "policy": "accept"},
    "mid": {},
    "deep": {},
}


@pytest.mark.parametrize(
    ("packet", "verdict"),
    [
        ("in tcp 1.1.1.1:1 -> 10.0.0.5:85 iif=eth7", "not captured"),  # iifname "eth*" + range: return
        ("in tcp 1.1.1.1:1 -> 172.16.0.5:95 iif=veth", "drop"),  # address range in a set
        ("in tcp 1.1.1.1:1 -> 10.9.9.9:95 iif=veth", "drop"),  # prefix in a set
        ("in udp 1.1.1.1:1 -> 8.8.8.8:95 iif=veth mark=0x105", "not captured"),  # mark & 0xff == 5: accept
        ("in tcp 1.1.1.1:1 -> 8.8.8.8:95 iif=veth", "tproxy to :15006 mark 7"),
        # goto deep: its end returns to out, past mid's drop; deep's mark |= 32 makes out redirect.
        ("out tcp 10.0.0.5:1 -> 8.8.8.8:1 uid=3 gid=5 oif=eth0", "redirect to :7000-7001"),
        ("out tcp 10.0.0.5:1 -> 8.8.8.8:1 uid=3 gid=6 oif=eth0", "drop"),
        (
            "out tcp 10.0.0.5:1 -> 8.8.8.8:1 uid=1500 oif=eth0",
            'unknown (inet t out: skuid 1000-2000 {"xt":{"type":"match","name":"addrtype"}} accept)',
        ),
    ],
)
def test_nft_json_sets_ranges_masks_and_statements(packet: str, verdict: str) -> None:
    assert x.explain(nft_json(SETS, SET_CHAINS), parse_packet(packet)).verdict.text == verdict


def test_nft_tables_by_family_and_hooks_out_of_scope() -> None:
    items: list[dict[str, object]] = [
        {"table": {"family": "ip6", "name": "six"}},
        {"chain": {"family": "ip6", "table": "six", "name": "o", "hook": "output", "type": "filter", "prio": 0, "policy": "drop"}},
        {"table": {"family": "netdev", "name": "edge"}},
        {"table": {"family": "inet", "name": "in"}},
        {"chain": {"family": "inet", "table": "in", "name": "i", "hook": "ingress", "type": "filter", "prio": 0}},
        {"table": {"family": "ip", "name": "nat"}},
        {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "hook": "output", "type": "nat", "prio": -100, "policy": "drop"}},
    ]  # fmt: skip
    tables, notes = er.nft_json_tables(items, skip=frozenset({("ip", "nat")}))
    model = x.Model(tables, "t")
    assert (
        x.explain(model, parse_packet("out tcp 10.0.0.5:1 -> 8.8.8.8:1 uid=0")).verdict.text == "not captured"
    )
    assert x.explain(model, parse_packet("out tcp [fd00::5]:1 -> [fd00::8]:1 uid=0")).verdict.text == "drop"
    assert notes == ["not walked: table netdev edge (family netdev)", "not walked: inet in i (hook ingress)"]


# --------------------------------------------------------------------------- the command


def run_cli(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.run(cli.PROG_IPTABLES, argv, env=env or {})
    return code, out.getvalue(), err.getvalue()


def test_the_command_prints_the_walk_with_a_fixed_last_line() -> None:
    code, out, err = run_cli([*CLASSIC, "--explain", EXAMPLES[0]])
    assert code == 0, err
    assert out.startswith(f"packet: {EXAMPLES[0]} mark=0\nrules: planned iptables rules (IPv4)")
    assert out.splitlines()[-1] == "verdict: redirect to :15001"


def test_json_is_the_same_walk() -> None:
    code, text, _ = run_cli([*CLASSIC, "--explain", EXAMPLES[1], "-m", "TPROXY"])
    code, out, err = run_cli([*CLASSIC, "--explain", EXAMPLES[1], "-m", "TPROXY", "--explain-format", "json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verdict"] == {"kind": "tproxy", "text": "tproxy to :15006 mark 1337", "port": 15006, "mark": 1337,
                              "rule": "-t mangle -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006"}  # fmt: skip
    assert text.splitlines()[-1] == f"verdict: {doc['verdict']['text']}"
    assert doc["packet"]["destination"] == {"address": "10.0.0.5", "port": 8080}
    rules = [e for e in doc["walk"] if e["event"] == "rule"]
    assert rules and all({"table", "chain", "number", "rule", "result"} <= set(e) for e in rules)
    assert sum(1 for line in text.splitlines() if "no match:" in line) == sum(
        1 for e in rules if e["result"] == "no match"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--explain", "out tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=x"],
            "Error: invalid value 'out tcp 1.2.3.4:1 -> 1.2.3.5:2 uid=x' for --explain: uid 'x'",
        ),
        (["--explain="], "Error: invalid value '' for --explain: expected out|in"),
        (
            ["--explain", "in tcp 1.2.3.4:1 -> 1.2.3.5:2", "--explain-format", "xml"],
            "Error: invalid value 'xml' for --explain-format",
        ),
        (["--live"], "Error: --live and --explain-format need --explain PACKET"),
        (["--explain-format", "json"], "Error: --live and --explain-format need --explain PACKET"),
        (
            [
                "--explain",
                "in tcp 1.2.3.4:1 -> 1.2.3.5:2",
                "--live",
                "--network-namespace",
                "/nonexistent/ns",
            ],
            "Error: network namespace /nonexistent/ns: No such file or directory",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_1(argv: list[str], message: str) -> None:
    code, out, err = run_cli([*CLASSIC, *argv])
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(message), err
    assert "Traceback" not in err


def test_istio_clean_iptables_does_not_explain() -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.run(cli.PROG_CLEAN, [*CLASSIC, "--explain", EXAMPLES[0]], env={})
    assert code == 1 and "are options of istio-iptables" in err.getvalue()


def test_explain_does_not_apply_or_print_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    import istio_iptables.apply as ap

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("applied")

    monkeypatch.setattr(ap, "apply", boom)
    code, out, _ = run_cli([*CLASSIC, "--explain", EXAMPLES[0], "--dry-run"])
    assert code == 0 and "-A ISTIO_OUTPUT" in out and "* nat" not in out


def test_nothing_is_imported_for_explain_unless_it_is_given() -> None:
    code = (
        "import io, sys, contextlib\n"
        "from istio_iptables import cli\n"
        f"argv = {CLASSIC!r} + ['--dry-run']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.run(cli.PROG_IPTABLES, argv, env={}) == 0\n"
        "bad = [m for m in sys.modules if m.startswith(('istio_iptables.explain', 'istio_iptables.packet'))]\n"
        "assert not bad, bad\n"
        "for m in ('dataclasses', 'typing', 'ipaddress', 'json', 'shlex'):\n"
        "    assert m not in sys.modules, m\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert cli.run(cli.PROG_IPTABLES, argv + ['--explain', {EXAMPLES[0]!r}], env={{}}) == 0\n"
        "assert 'istio_iptables.explain' in sys.modules and 'click' not in sys.modules\n"
    )
    p = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- live (kernel)


@pytest.mark.kernel
def test_live_walks_foreign_rules_and_stops_where_it_cannot_know(netns: Callable[..., NetNS]) -> None:
    ns = netns("explain")
    ns.run(["ip", "addr", "add", "10.0.0.5/24", "dev", "lo"])
    ns.run(["iptables-nft", "-t", "nat", "-N", "FOREIGN"])
    ns.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-j", "FOREIGN"])
    ns.run(
        [
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "FOREIGN",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "REDIRECT",
            "--to-ports",
            "3128",
        ]
    )
    ns.run(
        [
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "FOREIGN",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.5",
            "-j",
            "RETURN",
        ]
    )
    ns.run(["nft", "add table inet mine; add chain inet mine o { type filter hook output priority 10; };"
            " add rule inet mine o ip daddr 192.0.2.1 drop"])  # fmt: skip
    ns_fd = open_netns(ns.path)
    try:
        model = el.live_model(ns_fd, 4)
    finally:
        ns_fd.close()
    assert "no Istio chains found" in model.description and "iptables-nft-save" in model.description
    assert (
        x.explain(model, parse_packet("out tcp 10.0.0.5:1 -> 8.8.8.8:80 uid=0 oif=eth0")).verdict.text
        == "redirect to :3128"
    )
    w = x.explain(model, parse_packet("out tcp 10.0.0.5:1 -> 8.8.8.8:81 uid=0 oif=eth0"))
    assert (
        w.verdict.text
        == "unknown (-t nat -A FOREIGN -m statistic --mode random --probability 0.50000000000 -j RETURN)"
    )
    # The iptables-nft tables are read once, with iptables-nft-save; the native one from nft -j.
    assert sorted(t.label for t in model.tables) == ["inet mine", "nat"]
    # 10.0.0.5 is the namespace's own address: the packet leaves by lo.
    w = x.explain(model, parse_packet("out tcp 10.0.0.7:1 -> 10.0.0.5:81 uid=0"))
    assert any("the namespace's own address" in a for a in w.assumptions)


@pytest.mark.kernel
def test_live_reads_an_nft_made_ip_nat_table_from_nft(netns: Callable[..., NetNS]) -> None:
    """A native ``ip nat`` table has iptables' name, but iptables-nft-save cannot show it: it is
    walked from ``nft -j`` (not skipped as iptables-nft's own)."""
    ns = netns("explain")
    ns.run(
        [
            "nft",
            "add table ip nat; add chain ip nat OUTPUT { type nat hook output priority -100; };"
            " add rule ip nat OUTPUT tcp dport 80 redirect to :3128",
        ]
    )
    ns_fd = open_netns(ns.path)
    try:
        model = el.live_model(ns_fd, 4)
    finally:
        ns_fd.close()
    assert [t.label for t in model.tables if t.chains] == ["ip nat"]
    w = x.explain(model, parse_packet("out tcp 10.0.0.5:1 -> 8.8.8.8:80 uid=0 oif=eth0"))
    assert w.verdict.text == "redirect to :3128"
