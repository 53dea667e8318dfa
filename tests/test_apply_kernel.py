"""The applier against the kernel: rule state in real network namespaces, both backends.

Expected states are obtained independently of the applier: the rendered document is loaded with
iptables-restore into a fresh namespace and read back with iptables-save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from istio_iptables import apply as ap
from istio_iptables import state as st
from istio_iptables.apply import ApplyError, apply, cleanup
from istio_iptables.config import ApplyOptions, CidrSpec, Config, InterceptionMode, PortSpec
from istio_iptables.executor import RealExecutor, Running
from istio_iptables.planner import plan
from istio_iptables.render import render_family
from istio_iptables.ruleset import Family, FamilyRules, Rule, Ruleset
from tests.support.netns import NetNS, flocked, run

pytestmark = pytest.mark.kernel

BACKENDS = ["legacy", "nft"]
CLASSIC = Config(
    inbound_ports=PortSpec(wildcard=True),
    inbound_ports_exclude=(15090, 15021, 15020),
    outbound_ip_ranges_include=CidrSpec(wildcard=True),
    enable_ipv6=True,
)
TPROXY = CLASSIC._replace(interception_mode=InterceptionMode.TPROXY)
OTHER = CLASSIC._replace(inbound_ports_exclude=(15090,), outbound_ports_exclude=(9000,))

NewNS = Callable[..., NetNS]


def binary(family: Family, variant: str, kind: str) -> str:
    return f"{family.iptables_command}-{variant}-{kind}"


def saved(ns: NetNS, family: Family, variant: str) -> str:
    """The namespace's rules for one family and backend, without comments and counters."""
    out = ns.run([binary(family, variant, "save")]).stdout
    return "\n".join(ln.split(" [")[0] for ln in out.splitlines() if ln and not ln.startswith("#"))


def content(dump: str) -> str:
    """A dump without the tables that hold nothing (empty tables cannot be told from absent ones)."""
    tables: list[str] = []
    for block in dump.split("COMMIT"):
        if st.holds_rules(st.parse_save(block + "COMMIT\n")):
            tables.append(block.strip())
    return "\nCOMMIT\n".join(tables)


def everything(ns: NetNS) -> dict[str, str]:
    """Every table of both families and both backends that holds anything."""
    return {f"{f.name}-{v}": content(saved(ns, f, v)) for f in Family for v in BACKENDS}


def ours(
    ns: NetNS, family: Family, variant: str, fr: FamilyRules | None = None, netns: NewNS | None = None
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Our part of the namespace, with the plain built-in rules of ``fr`` recognised."""
    known = expected(netns, fr, variant).known() if fr is not None and netns is not None else None
    return st.find_ours(st.parse_save(saved(ns, family, variant)), known).view()


def expected(netns: NewNS, fr: FamilyRules, variant: str) -> st.Ours:
    scratch = netns("exp")
    scratch.run([binary(fr.family, variant, "restore"), "--noflush"], input=render_family(fr))
    return st.everything_ours(st.parse_save(saved(scratch, fr.family, variant)))


def opts(ns: NetNS, variant: str | None, **kw: object) -> ApplyOptions:
    return ApplyOptions(network_namespace=ns.path, force_iptables_binary=variant, **kw)  # type: ignore[arg-type]


def add_foreign(ns: NetNS, variant: str) -> None:
    for fam, addr in ((Family.V4, "192.0.2.9/32"), (Family.V6, "2001:db8::9/128")):
        ns.run(
            [binary(fam, variant, "restore"), "--noflush"],
            input=(
                f"*nat\n:FOREIGN - [0:0]\n-A OUTPUT -d {addr} -j ACCEPT\n-A FOREIGN -j RETURN\n"
                f"-A PREROUTING -j FOREIGN\nCOMMIT\n"
                f"*mangle\n-A OUTPUT -o lo -j RETURN\nCOMMIT\n*filter\n-A INPUT -s {addr} -j ACCEPT\nCOMMIT\n"
            ),
        )


# --- applying -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", BACKENDS)
@pytest.mark.parametrize("config", [CLASSIC, TPROXY], ids=["redirect", "tproxy"])
def test_apply_planned_rules_then_again_changes_nothing(netns: NewNS, variant: str, config: Config) -> None:
    ns = netns("pod")
    rs = plan(config)
    apply(rs, opts(ns, f"iptables-{variant}"))
    for fr in rs.families:
        assert ours(ns, fr.family, variant, fr, netns) == expected(netns, fr, variant).view()
    other = "nft" if variant == "legacy" else "legacy"
    assert all(st.find_ours(st.parse_save(saved(ns, f, other))).empty for f in Family)
    first = everything(ns)
    apply(rs, opts(ns, f"iptables-{variant}"))
    assert everything(ns) == first


@pytest.mark.parametrize("variant", BACKENDS)
def test_apply_hand_built_ruleset_and_cleanup_finds_its_plain_builtin_rules(
    netns: NewNS, variant: str
) -> None:
    ns = netns("pod")
    v4 = FamilyRules(
        Family.V4,
        (
            Rule("nat", "OUTPUT", ("-o", "eth9"), "RETURN"),
            Rule("nat", "OUTPUT", ("-p", "tcp"), "ISTIO_OUTPUT"),
            Rule("nat", "ISTIO_OUTPUT", ("-d", "10.0.0.0/8"), "RETURN"),
            Rule("nat", "ISTIO_OUTPUT", ("-p", "tcp"), "ISTIO_REDIRECT"),
            Rule("nat", "ISTIO_REDIRECT", ("-p", "tcp"), "REDIRECT", ("--to-ports", "15001")),
            Rule(
                "mangle",
                "PREROUTING",
                ("-p", "tcp", "-m", "mark", "--mark", "1337"),
                "CONNMARK",
                ("--save-mark",),
            ),
        ),
    )
    rs = Ruleset(v4)
    before = everything(ns)
    apply(rs, opts(ns, variant))
    assert ours(ns, Family.V4, variant, v4, netns) == expected(netns, v4, variant).view()
    apply(rs, opts(ns, variant))  # idempotent with plain rules in built-in chains too
    assert ours(ns, Family.V4, variant, v4, netns) == expected(netns, v4, variant).view()
    cleanup(opts(ns, variant), ruleset=rs)
    assert everything(ns) == before


@pytest.mark.parametrize("seed", ["legacy", "nft", None])
def test_detection_follows_the_rules_already_in_the_namespace(
    netns: NewNS, seed: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    ns = netns("pod")
    if seed is not None:
        ns.run([f"iptables-{seed}", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.1", "-j", "ACCEPT"])
    rs = plan(CLASSIC._replace(enable_ipv6=False))
    with caplog.at_level(logging.INFO, logger="istio_iptables"):
        apply(rs, opts(ns, None))
    chosen = "legacy" if seed == "legacy" else "nft"
    unused = "nft" if chosen == "legacy" else "legacy"
    assert not st.find_ours(st.parse_save(saved(ns, Family.V4, chosen))).empty
    assert st.find_ours(st.parse_save(saved(ns, Family.V4, unused))).empty
    assert f"IPv4: using iptables-{chosen}" in caplog.text
    # A second run sees our rules where they are and stays there.
    state = everything(ns)
    apply(rs, opts(ns, None))
    assert everything(ns) == state


@pytest.mark.parametrize("seed", ["empty-legacy-tables", "legacy-ipv6-only"])
def test_detection_with_legacy_tables_present_per_family(netns: NewNS, seed: str) -> None:
    # Legacy tables that exist but hold nothing, or hold rules for one family only: detection
    # looks at each family's own tables (the kernel lists them per namespace and family).
    ns = netns("pod")
    if seed == "empty-legacy-tables":
        for cmd in ("iptables-legacy", "ip6tables-legacy"):
            ns.run([cmd, "-t", "nat", "-L", "-n"])  # creates the empty nat table
        want = {Family.V4: "nft", Family.V6: "nft"}
    else:
        ns.run(["ip6tables-legacy", "-t", "filter", "-A", "INPUT", "-s", "2001:db8::1", "-j", "ACCEPT"])
        want = {Family.V4: "nft", Family.V6: "legacy"}
    names = ns.run(["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).stdout
    assert "nat" in names or "filter" in names, "the seed must create legacy tables"
    apply(plan(CLASSIC), opts(ns, None))
    for family, chosen in want.items():
        unused = "nft" if chosen == "legacy" else "legacy"
        assert not st.find_ours(st.parse_save(saved(ns, family, chosen))).empty, family
        assert st.find_ours(st.parse_save(saved(ns, family, unused))).empty, family


class _Counting(RealExecutor):
    """Runs commands for real and keeps their argv."""

    def __init__(self) -> None:
        self.argvs: list[tuple[str, ...]] = []

    def start(self, argv: Sequence[str], **kw: Any) -> Running:
        self.argvs.append(tuple(argv))
        return super().start(argv, **kw)


def _prog(argv: tuple[str, ...]) -> str:
    """The program a command runs (the applier runs them from inside the namespace: no nsenter)."""
    assert argv[0] != "nsenter", argv
    return os.path.basename(argv[0])


@pytest.mark.parametrize("variant", [None, "iptables-nft", "iptables-legacy"])
def test_a_fresh_namespace_costs_one_restore_per_family(netns: NewNS, variant: str | None) -> None:
    # Neither detection nor the state check runs iptables-save where the kernel shows no table
    # for it to print; a second run, with our rules there, reads them.
    ns = netns("pod")
    ex = _Counting()
    apply(plan(CLASSIC), opts(ns, variant), ex)
    programs = [_prog(a) for a in ex.argvs]
    chosen = "legacy" if variant == "iptables-legacy" else "nft"
    assert programs == [f"iptables-{chosen}-restore", f"ip6tables-{chosen}-restore"], ex.argvs
    ex2 = _Counting()
    apply(plan(CLASSIC), opts(ns, variant), ex2)
    saves = {_prog(a) for a in ex2.argvs if _prog(a).endswith("-save")}
    assert {f"iptables-{chosen}-save", f"ip6tables-{chosen}-save"} <= saves
    for fr in plan(CLASSIC).families:
        assert ours(ns, fr.family, chosen, fr, netns) == expected(netns, fr, chosen).view()


def test_cleanup_reads_only_backends_that_have_tables(netns: NewNS) -> None:
    ns = netns("pod")
    ex = _Counting()
    cleanup(opts(ns, None), ex)
    assert ex.argvs == []  # an empty namespace: nothing to read, nothing to remove
    apply(plan(CLASSIC), opts(ns, None))
    ex = _Counting()
    cleanup(opts(ns, None), ex, ruleset=plan(CLASSIC))
    programs = {_prog(a) for a in ex.argvs}
    assert {"iptables-nft-save", "ip6tables-nft-save", "iptables-nft-restore"} <= programs, ex.argvs
    assert not any("legacy" in p for p in programs), ex.argvs  # no legacy table was ever made
    assert all(st.find_ours(st.parse_save(saved(ns, f, v))).empty for f in Family for v in BACKENDS)


_LEAN_APPLY = """
import json, sys
from istio_iptables.apply import apply
from istio_iptables.config import ApplyOptions, CidrSpec, Config, InterceptionMode, PortSpec
from istio_iptables.planner import plan
cfg = Config(
    inbound_ports=PortSpec(wildcard=True),
    outbound_ip_ranges_include=CidrSpec(wildcard=True),
    enable_ipv6=True,
    interception_mode=InterceptionMode[sys.argv[2]],
)
apply(plan(cfg), ApplyOptions(network_namespace=sys.argv[1], cni_mode=True))
print(json.dumps(sorted(m for m in ("pyroute2", "click", "asyncio", "logging") if m in sys.modules)))
"""


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_loopback_address_and_tproxy_routes_without_a_netlink_library(netns: NewNS, mode: str) -> None:
    # ::6 on lo, the policy rule and the local route are standard-library netlink requests each.
    ns = netns("pod")
    p = subprocess.run(
        [sys.executable, "-c", _LEAN_APPLY, ns.path, mode], capture_output=True, text=True, check=True
    )
    assert "inet6 ::6/128" in ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    if mode == "TPROXY":
        assert "fwmark 0x539 lookup 133" in ns.run(["ip", "-6", "rule"]).stdout
    loaded = json.loads(p.stdout)
    assert loaded == [], loaded


@pytest.mark.parametrize("variant", BACKENDS)
def test_drift_is_refused_then_reconciled(netns: NewNS, variant: str) -> None:
    ns = netns("pod")
    forced = f"iptables-{variant}"
    add_foreign(ns, variant)
    apply(plan(CLASSIC), opts(ns, forced))
    applied = everything(ns)

    with pytest.raises(ApplyError) as e:
        apply(plan(OTHER), opts(ns, forced))
    assert e.value.kind == ap.DRIFT and e.value.exit_code == 1
    assert "--dport 15021" in e.value.message and "--reconcile" in e.value.message
    assert everything(ns) == applied, "a refused apply must leave everything as it was"

    apply(plan(OTHER), opts(ns, forced, reconcile=True))
    fresh = netns("fresh")
    add_foreign(fresh, variant)
    apply(plan(OTHER), opts(fresh, forced))
    assert everything(ns) == everything(fresh)

    apply(plan(OTHER), opts(ns, forced, force_apply=True))
    assert everything(ns) == everything(fresh)


def test_leftover_ipv6_rules_are_drift_for_an_ipv4_only_configuration(netns: NewNS) -> None:
    ns = netns("pod")
    apply(plan(CLASSIC), opts(ns, "nft"))
    v4_only = CLASSIC._replace(enable_ipv6=False)
    with pytest.raises(ApplyError, match="IPv6 .*chain present but not expected"):
        apply(plan(v4_only), opts(ns, "nft"))
    apply(plan(v4_only), opts(ns, "nft", reconcile=True))
    assert st.find_ours(st.parse_save(saved(ns, Family.V6, "nft"))).empty


# --- cleanup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", BACKENDS)
def test_cleanup_removes_ours_and_keeps_foreign_rules(netns: NewNS, variant: str) -> None:
    ns = netns("pod")
    add_foreign(ns, variant)
    before = everything(ns)
    rs = plan(TPROXY)
    apply(rs, opts(ns, None if variant == "nft" else f"iptables-{variant}"))
    assert everything(ns) != before
    cleanup(opts(ns, None), ruleset=rs)
    assert everything(ns) == before
    assert ns.run(["ip", "rule", "show"]).stdout.count("lookup 133") == 0
    cleanup(opts(ns, None), ruleset=rs)  # nothing left to do is fine
    assert everything(ns) == before


def test_cleanup_only_option_removes_and_applies_nothing(netns: NewNS) -> None:
    ns = netns("pod")
    before = everything(ns)
    apply(plan(CLASSIC), opts(ns, "nft"))
    apply(plan(CLASSIC), opts(ns, "nft", cleanup_only=True))
    assert everything(ns) == before


# --- all or nothing -----------------------------------------------------------------------------


def _bad_v6(rs: Ruleset) -> Ruleset:
    """rs with a v6 document the kernel rejects at COMMIT (TPROXY is a mangle-only target)."""
    assert rs.v6 is not None
    bad = Rule("nat", "ISTIO_OUTPUT", ("-p", "tcp"), "TPROXY", ("--on-port", "15006", "--tproxy-mark", "1/1"))
    return rs._replace(v6=FamilyRules(Family.V6, (*rs.v6.rules, bad)))


@pytest.mark.parametrize("variant", BACKENDS)
def test_ipv4_is_rolled_back_when_ipv6_fails(netns: NewNS, variant: str) -> None:
    ns = netns("pod")
    add_foreign(ns, variant)
    before = everything(ns)
    with pytest.raises(ApplyError) as e:
        apply(_bad_v6(plan(CLASSIC)), opts(ns, f"iptables-{variant}"))
    assert e.value.kind == ap.REJECTED and e.value.exit_code == 1
    assert "IPv6" in e.value.message and "rejected line" in e.value.message
    if variant == "nft":
        assert "TPROXY" in e.value.message  # nft names the rule; legacy only the table's COMMIT
    assert everything(ns) == before, "the pod must never be left half-captured"


@pytest.mark.parametrize("variant", BACKENDS)
def test_failed_reconcile_puts_the_earlier_rules_back_in_place(netns: NewNS, variant: str) -> None:
    ns = netns("pod")
    forced = f"iptables-{variant}"
    apply(plan(CLASSIC), opts(ns, forced))
    add_foreign(ns, variant)  # foreign rules after ours: positions must survive the rollback
    applied = everything(ns)
    with pytest.raises(ApplyError):
        apply(_bad_v6(plan(OTHER)), opts(ns, forced, reconcile=True))
    assert everything(ns) == applied


def test_a_document_the_kernel_rejects_leaves_no_table_half_done(netns: NewNS) -> None:
    ns = netns("pod")
    rules = (
        Rule("mangle", "PREROUTING", ("-p", "tcp"), "ISTIO_INBOUND"),
        Rule("mangle", "ISTIO_INBOUND", ("-p", "tcp", "--dport", "22"), "RETURN"),
        Rule("nat", "OUTPUT", ("-p", "tcp"), "TPROXY", ("--on-port", "15006", "--tproxy-mark", "1/1")),
    )
    for variant in BACKENDS:
        before = everything(ns)
        with pytest.raises(ApplyError) as e:
            apply(Ruleset(FamilyRules(Family.V4, rules)), opts(ns, variant))
        assert e.value.kind == ap.REJECTED
        assert everything(ns) == before  # mangle had been committed before nat failed


# --- faults -------------------------------------------------------------------------------------


def test_missing_iptables_binary(netns: NewNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = netns("pod")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("nsenter", "iptables-nft-save", "iptables-nft-restore"):
        (bindir / tool).symlink_to(run(["which", tool]).stdout.strip())
    monkeypatch.setenv("PATH", str(bindir))
    before = everything_with_path(ns)
    with pytest.raises(ApplyError) as e:
        apply(plan(CLASSIC), opts(ns, "iptables-legacy"))
    assert e.value.kind == ap.BINARY_MISSING and "iptables-legacy-restore" in e.value.message
    with pytest.raises(ApplyError) as e:
        apply(plan(CLASSIC), opts(ns, None))  # IPv4 works, but there is no ip6tables at all
    assert e.value.kind == ap.BINARY_MISSING and "no iptables binaries for IPv6" in e.value.message
    assert everything_with_path(ns) == before


def everything_with_path(ns: NetNS) -> dict[str, str]:
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return {
        f"{f.name}-{v}": content(run(["ip", "netns", "exec", ns.name, binary(f, v, "save")], env=env).stdout)
        for f in Family
        for v in BACKENDS
    }


def test_network_namespace_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ApplyError) as e:
        apply(plan(CLASSIC), ApplyOptions(network_namespace="/var/run/netns/t-does-not-exist-0"))
    assert e.value.kind == ap.NETNS and "No such file" in e.value.message
    with pytest.raises(ApplyError, match="not a namespace file"):
        cleanup(ApplyOptions(network_namespace=str(tmp_path)))


class _VanishAfter(RealExecutor):
    """Deletes the namespace once ``n`` commands have run."""

    def __init__(self, ns: NetNS, n: int) -> None:
        self.ns, self.left = ns, n

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Running:
        if self.left == 0:
            run(["ip", "netns", "del", self.ns.name])
        self.left -= 1
        return super().start(argv, stdin=stdin, env=env, timeout=timeout)


def test_network_namespace_that_vanishes_midway(netns: NewNS) -> None:
    ns = netns("pod")
    with pytest.raises(ApplyError) as e:
        apply(plan(CLASSIC), opts(ns, "nft"), _VanishAfter(ns, 1))
    assert e.value.kind == ap.NETNS and e.value.exit_code == 1
    assert ns.path in e.value.message


@pytest.fixture
def hold_lock() -> Iterator[Callable[[str], None]]:
    with contextlib.ExitStack() as stack:
        yield lambda path: stack.enter_context(flocked(path))


def test_pod_lock_held_past_the_wait(netns: NewNS, hold_lock: Callable[[str], None]) -> None:
    ns, other = netns("pod"), netns("other")
    hold_lock(ns.path)
    before = everything(ns)
    with pytest.raises(ApplyError) as e:
        apply(plan(CLASSIC), opts(ns, "iptables-legacy", cni_mode=True), lock_wait=1)
    assert e.value.kind == ap.LOCK and e.value.exit_code == 1
    assert "xtables lock" in e.value.message
    assert everything(ns) == before
    # The lock is the pod's own: another pod is not held up by it.
    apply(plan(CLASSIC), opts(other, "iptables-legacy", cni_mode=True), lock_wait=1)
    assert not st.find_ours(st.parse_save(saved(other, Family.V4, "legacy"))).empty


# --- TPROXY routing -----------------------------------------------------------------------------


def _routing(ns: NetNS) -> dict[str, str]:
    return {
        "rule4": ns.run(["ip", "-4", "rule", "show"]).stdout,
        "rule6": ns.run(["ip", "-6", "rule", "show"]).stdout,
        "route4": ns.run(["ip", "-4", "route", "show", "table", "all"]).stdout,
        "route6": ns.run(["ip", "-6", "route", "show", "table", "all"]).stdout,
        "lo": ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout,
    }


def test_tproxy_policy_routes_present_then_removed(netns: NewNS) -> None:
    ns = netns("pod")
    before = _routing(ns)
    rs = plan(TPROXY)
    apply(rs, opts(ns, "nft"))
    r = _routing(ns)
    for fam in ("4", "6"):
        rules = [ln for ln in r[f"rule{fam}"].splitlines() if "fwmark 0x539 lookup 133" in ln]
        assert len(rules) == 1 and rules[0].startswith("32765:"), r[f"rule{fam}"]
        assert "local default dev lo table 133" in r[f"route{fam}"]
    assert "inet6 ::6/128" in r["lo"]
    apply(rs, opts(ns, "nft"))
    assert _routing(ns) == r, "a second apply must not duplicate routes"
    cleanup(opts(ns, "nft"), ruleset=rs)
    assert _routing(ns) == before


def test_failed_iptables_apply_adds_no_routes(netns: NewNS) -> None:
    ns = netns("pod")
    before = _routing(ns)
    with pytest.raises(ApplyError):
        apply(_bad_v6(plan(TPROXY)), opts(ns, "nft"))
    assert _routing(ns) == before


# --- name service -------------------------------------------------------------------------------


def test_restore_sees_only_local_files_for_owner_lookups(netns: NewNS) -> None:
    ns = netns("pod")
    nsexec = str(Path(ap.__file__).with_name("nsexec.py"))
    host = Path("/etc/nsswitch.conf").read_text() if Path("/etc/nsswitch.conf").exists() else None
    argv = [
        sys.executable,
        "-I",
        "-S",
        nsexec,
        "--net",
        ns.path,
        "--local-lookups",
        "--",
        "cat",
        "/etc/nsswitch.conf",
    ]
    res = run(argv)
    assert "passwd: files\ngroup: files\n" in res.stdout
    assert "sss" not in res.stdout and "systemd" not in res.stdout and "ldap" not in res.stdout
    if host is not None:
        assert Path("/etc/nsswitch.conf").read_text() == host, "the host's file must be untouched"
    # Owner names resolve from /etc/group through the same path.
    cfg = CLASSIC._replace(proxy_gids=("root",), enable_ipv6=False)
    apply(plan(cfg), opts(ns, "nft"))
    assert "--gid-owner 0 -j RETURN" in saved(ns, Family.V4, "nft")


# --- validation -----------------------------------------------------------------------------------


def test_validation_passes_with_the_rules_and_fails_with_126_without(netns: NewNS) -> None:
    from istio_iptables.validation import EXIT_CODE, MESSAGE, validate

    ns = netns("pod")
    cfg = CLASSIC._replace(enable_ipv6=False)
    o = opts(ns, "nft", run_validation=True, probe_timeout=2.0)
    with pytest.raises(ApplyError) as e:
        validate(cfg, o)
    assert e.value.exit_code == EXIT_CODE == 126 and e.value.message == MESSAGE
    apply(plan(cfg), o)
    validate(cfg, o)


def test_validation_over_ipv6(netns: NewNS) -> None:
    from istio_iptables.validation import validate

    ns = netns("pod")
    o = opts(ns, "nft", run_validation=True, probe_timeout=2.0)
    apply(plan(CLASSIC), o)  # adds ::6 on lo, which the probe connects to
    validate(CLASSIC, o, ipv6=True)
