"""The native nftables applier against the kernel: what ``istio-iptables --native-nftables``
leaves in a namespace, run once, twice, over another configuration, cleaned, killed and raced.

Expected states come from the dry-run script loaded with ``nft -f`` into a fresh namespace.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from istio_iptables import apply as ap
from istio_iptables.apply import ApplyError
from istio_iptables.cli import PROG_IPTABLES, parse
from istio_iptables.config import ApplyOptions
from istio_iptables.nft_apply import apply_nft, cleanup_nft
from istio_iptables.planner import plan_nft
from tests.support.netns import NetNS, flocked

pytestmark = pytest.mark.kernel

NewNS = Callable[..., NetNS]
CLASSIC = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
           "-d", "15090,15021,15020", "--enable-ipv6", "--native-nftables"]  # fmt: skip
TPROXY = [*CLASSIC[: CLASSIC.index("-m") + 1], "TPROXY", *CLASSIC[CLASSIC.index("-m") + 2 :]]
OTHER = [*CLASSIC[:-3], "15090", "--enable-ipv6", "--native-nftables"]


def _command(main: str) -> list[str]:
    return [sys.executable, "-c", f"import sys\nfrom istio_iptables.cli import {main} as m\nm()"]


ISTIO_IPTABLES = _command("iptables_main")
ISTIO_CLEAN = _command("clean_main")


def cli(ns: NetNS, args: Sequence[str], *extra: str, clean: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [*(ISTIO_CLEAN if clean else ISTIO_IPTABLES), *args, f"--network-namespace={ns.path}", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def ruleset(ns: NetNS) -> dict[str, Any]:
    """What the namespace's nftables hold, comparable between namespaces and moments: tables,
    chains and rules without handles or counter values, sets sorted."""
    items = json.loads(ns.run(["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    out: dict[str, Any] = {}

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {"counter"}:
                return "counter"
            return {k: clean(x) for k, x in v.items() if k != "handle"}
        return v

    for item in items:
        for kind in ("table", "chain", "rule"):
            if kind in item:
                body = clean(item[kind])
                table = f"{body['family']} {body.get('table', body.get('name'))}"
                entry = out.setdefault(table, {"chains": {}, "rules": []})
                if kind == "chain":
                    entry["chains"][body["name"]] = body
                elif kind == "rule":
                    entry["rules"].append(body)
    return out


def expected(netns: NewNS, args: Sequence[str]) -> dict[str, Any]:
    """The ruleset a fresh namespace holds after loading this command line's dry-run script."""
    scratch = netns("exp")
    p = subprocess.run([*ISTIO_IPTABLES, *args, "--dry-run"], capture_output=True, text=True, check=True)
    _, _, script = p.stdout.partition("# nft -f\n")
    scratch.run(["nft", "-f", "-"], input=script)
    return ruleset(scratch)


def add_foreign(ns: NetNS) -> None:
    ns.run(
        ["nft", "-f", "-"],
        input="add table inet foreign\nadd chain inet foreign output { type filter hook output priority 0 ; }\n"
        "add rule inet foreign output tcp dport 7777 counter accept\n"
        "add table ip nat\nadd chain ip nat c\nadd rule ip nat c tcp dport 7778 return\n",
    )


def ours(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k.startswith("inet istio-proxy-")}


def foreign(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith("inet istio-proxy-")}


# --- apply, again, drift, reconcile, cleanup --------------------------------------------------------


@pytest.mark.parametrize("args", [CLASSIC, TPROXY], ids=["redirect", "tproxy"])
def test_apply_holds_exactly_the_dry_run_and_again_changes_nothing(netns: NewNS, args: list[str]) -> None:
    ns = netns("pod")
    add_foreign(ns)
    before = foreign(ruleset(ns))
    p = cli(ns, args)
    assert p.returncode == 0, p.stderr
    now = ruleset(ns)
    assert ours(now) == expected(netns, args)
    assert foreign(now) == before
    p = cli(ns, args)
    assert p.returncode == 0, p.stderr
    assert "nftables rules already in place" in p.stderr
    assert ruleset(ns) == now
    assert not any("-check" in t for t in ruleset(ns)), "the inert copies are gone"


def test_a_different_configuration_is_drift_until_reconcile(netns: NewNS) -> None:
    ns = netns("pod")
    add_foreign(ns)
    assert cli(ns, CLASSIC).returncode == 0
    first = ruleset(ns)
    p = cli(ns, OTHER)
    assert p.returncode == 1 and "drift" in p.stderr and "--reconcile" in p.stderr, p.stderr
    assert ruleset(ns) == first, "refused drift changes nothing (and leaves no inert copy)"
    p = cli(ns, OTHER, "--reconcile")
    assert p.returncode == 0, p.stderr
    now = ruleset(ns)
    assert ours(now) == expected(netns, OTHER)
    assert foreign(now) == foreign(first)
    # A configuration with another set of tables (TPROXY adds mangle) replaces them all.
    assert cli(ns, TPROXY, "--force-apply").returncode == 0
    assert ours(ruleset(ns)) == expected(netns, TPROXY)
    assert cli(ns, CLASSIC, "--reconcile").returncode == 0
    assert ours(ruleset(ns)) == expected(netns, CLASSIC)


def test_cleanup_removes_our_tables_and_routes_and_nothing_else(netns: NewNS) -> None:
    ns = netns("pod")
    add_foreign(ns)
    pristine = ruleset(ns)
    rules_before = ns.run(["ip", "-6", "rule"]).stdout + ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    assert cli(ns, TPROXY).returncode == 0
    assert "lookup 133" in ns.run(["ip", "-4", "rule"]).stdout
    p = cli(ns, TPROXY, clean=True)
    assert p.returncode == 0, p.stderr
    assert ruleset(ns) == pristine
    assert ns.run(["ip", "-6", "rule"]).stdout + ns.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout == rules_before
    # --cleanup-only through istio-iptables does the same; twice is harmless.
    assert cli(ns, CLASSIC).returncode == 0
    assert cli(ns, CLASSIC, "--cleanup-only").returncode == 0
    assert cli(ns, CLASSIC, "--cleanup-only").returncode == 0
    assert ruleset(ns) == pristine


def test_validation_passes_with_the_nftables_rules(netns: NewNS) -> None:
    ns = netns("pod")
    args = [a for a in CLASSIC if a != "--enable-ipv6"] + ["--no-enable-ipv6"]
    p = cli(ns, args, "--run-validation", "--probe-timeout=3s", "--skip-rule-apply")
    assert p.returncode == 126, p.stderr
    p = cli(ns, args, "--run-validation", "--probe-timeout=3s")
    assert p.returncode == 0, p.stderr
    assert "validation passed" in p.stderr


def test_missing_nft_is_a_clear_error_never_iptables(netns: NewNS, tmp_path: Path) -> None:
    ns = netns("pod")
    env = {"PATH": str(tmp_path)}  # nothing there: no nft, no iptables either
    p = subprocess.run(
        [*ISTIO_IPTABLES, *CLASSIC, f"--network-namespace={ns.path}"], env=env, capture_output=True, text=True
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "Error: nft: not found in PATH (--native-nftables needs the nft program of nftables)"
    )
    assert "Traceback" not in p.stderr
    assert ruleset(ns) == {}


def test_a_rejected_script_leaves_nothing_and_names_the_line(netns: NewNS) -> None:
    ns = netns("pod")
    parsed = parse(PROG_IPTABLES, CLASSIC)
    assert not isinstance(parsed, int)
    rules = plan_nft(parsed[0])
    bad = rules.rules[-1]._replace(nft="counter tproxy to :1")  # not allowed in a nat chain
    with pytest.raises(ApplyError) as e:
        apply_nft(rules._replace(rules=(*rules.rules, bad)), ApplyOptions(network_namespace=ns.path))
    assert e.value.kind == ap.REJECTED and "rejected line" in e.value.message
    assert ruleset(ns) == {}


# --- killed, raced, locked -------------------------------------------------------------------------


def test_random_kills_leave_all_or_nothing_and_a_rerun_converges(netns: NewNS) -> None:
    args = [*TPROXY, "-x", ",".join(f"10.{i >> 8}.{i & 255}.0/24" for i in range(3000))]
    want = expected(netns, args)
    rng = random.Random(7)
    t0 = time.monotonic()
    assert cli(netns("timing"), args).returncode == 0
    length = time.monotonic() - t0
    for round_ in range(20):
        ns = netns("kill")
        p = subprocess.Popen([*ISTIO_IPTABLES, *args, f"--network-namespace={ns.path}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0, 1.2 * length))
        p.send_signal(signal.SIGKILL)
        p.wait()
        with flocked(ns.path):  # the lock is free once nothing of the killed run can write
            state = ours(ruleset(ns))
        assert state in ({}, want), f"round {round_}: a partial ruleset after a kill"
        again = cli(ns, args)
        assert again.returncode == 0, again.stderr
        assert ours(ruleset(ns)) == want


def test_two_applies_at_once_both_succeed_with_every_rule(netns: NewNS) -> None:
    want = expected(netns, CLASSIC)
    for _ in range(20):
        ns = netns("race")
        argv = [*ISTIO_IPTABLES, *CLASSIC, f"--network-namespace={ns.path}"]
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert ours(ruleset(ns)) == want


def test_an_apply_and_a_clean_at_once_end_with_all_or_none(netns: NewNS) -> None:
    want = expected(netns, CLASSIC)
    for _ in range(10):
        ns = netns("race")
        procs = [
            subprocess.Popen([*cmd, *CLASSIC, f"--network-namespace={ns.path}"], stderr=subprocess.PIPE, text=True)
            for cmd in (ISTIO_IPTABLES, ISTIO_CLEAN)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert ours(ruleset(ns)) in ({}, want)


def test_a_held_namespace_is_a_lock_error_that_changes_nothing(netns: NewNS) -> None:
    ns = netns("pod")
    parsed = parse(PROG_IPTABLES, CLASSIC)
    assert not isinstance(parsed, int)
    with flocked(ns.path), pytest.raises(ApplyError) as e:
        apply_nft(plan_nft(parsed[0]), ApplyOptions(network_namespace=ns.path), lock_wait=1)
    assert e.value.kind == ap.LOCK and "try again later" in e.value.message
    assert ruleset(ns) == {}
    cleanup_nft(ApplyOptions(network_namespace=ns.path), lock_wait=1)  # nothing there: fine
