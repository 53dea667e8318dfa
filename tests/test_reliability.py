"""The applier under races, kills and busy locks, against the kernel: a namespace ends with all of
our rules or none of them (per family), never between, and a rerun always converges.

The commands run as users run them (``istio-iptables`` and ``istio-clean-iptables`` processes),
started together or killed at random moments; the rules are read back with iptables-save and
compared with what the same configuration gives in a fresh namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from istio_iptables import apply as ap
from istio_iptables import state as st
from istio_iptables.apply import ApplyError, apply
from istio_iptables.cli import PROG_IPTABLES, parse
from istio_iptables.config import ApplyOptions, Config
from istio_iptables.executor import RealExecutor, Running
from istio_iptables.planner import plan
from istio_iptables.render import render_family
from istio_iptables.ruleset import Family, FamilyRules, Rule, Ruleset
from tests.support.netns import NetNS, flocked

pytestmark = pytest.mark.kernel

NewNS = Callable[..., NetNS]
BACKENDS = ["legacy", "nft"]
CLASSIC_ARGS = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
    "-b", "*", "-d", "15090,15021,15020", "--enable-ipv6",
]  # fmt: skip


def _command(main: str) -> list[str]:
    # The installed console scripts do exactly this; going through the interpreter keeps the
    # commands on whatever istio_iptables this test imports.
    return [sys.executable, "-c", f"import sys\nfrom istio_iptables.cli import {main} as m\nm()"]


ISTIO_IPTABLES = _command("iptables_main")
ISTIO_CLEAN = _command("clean_main")


def tproxy_args(n_cidrs: int) -> list[str]:
    cidrs = ",".join(f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(n_cidrs))
    args = list(CLASSIC_ARGS)
    args[args.index("-m") + 1] = "TPROXY"
    args[args.index("-x") + 1] = cidrs
    return args


def cli_args(ns: NetNS, variant: str, args: Sequence[str], *extra: str) -> list[str]:
    return [*args, f"--network-namespace={ns.path}", f"--force-iptables-binary={variant}", *extra]


# --- what the namespace holds --------------------------------------------------------------------


def saved(ns: NetNS, family: Family, variant: str) -> str:
    return ns.run([f"{family.iptables_command}-{variant}-save"]).stdout


class Expected:
    """Our rules for a command line, in iptables-save's spelling, per family (from a scratch
    namespace that the rendered documents are loaded into)."""

    def __init__(self, netns: NewNS, args: Sequence[str], variant: str) -> None:
        parsed = parse(PROG_IPTABLES, list(args))
        assert not isinstance(parsed, int), parsed
        self.config: Config = parsed[0]
        self.variant = variant
        self.ours: dict[Family, st.Ours] = {}
        for fr in plan(self.config).families:
            scratch = netns("exp")
            scratch.run(
                [f"{fr.family.iptables_command}-{variant}-restore", "--noflush"], input=render_family(fr)
            )
            self.ours[fr.family] = st.everything_ours(st.parse_save(saved(scratch, fr.family, variant)))

    def state(self, ns: NetNS) -> dict[Family, str]:
        """Per family: "all" (exactly our rules), "none" (nothing of ours) or "partial"."""
        out: dict[Family, str] = {}
        for family, want in self.ours.items():
            now = st.parse_save(saved(ns, family, self.variant))
            have = st.find_ours(st.without_checks(now), want.known())
            if st.check_chains(now):
                out[family] = "partial"  # an interrupted run's check chains are still there
            elif have.view() == want.view():
                out[family] = "all"
            elif have.empty:
                out[family] = "none"
            else:
                out[family] = "partial"
        return out


def lock_free(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def writers_in(ns: NetNS) -> list[int]:
    """Processes in the namespace still running an iptables restore (orphans of a killed run)."""
    ino = os.stat(ns.path).st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino != ino:
                continue
            if b"-restore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def settle(ns: NetNS, timeout: float = 30) -> None:
    """Wait until nothing of a killed run can still write to the namespace."""
    deadline = time.monotonic() + timeout
    while not lock_free(ns.path) or writers_in(ns):
        assert time.monotonic() < deadline, "a killed run's restore never finished"
        time.sleep(0.01)


def start(argv: Sequence[str]) -> subprocess.Popen[str]:
    """Start a command with its stderr in a file (a log larger than a pipe never blocks it)."""
    import tempfile

    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by finish()
    p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=err, text=True)
    p.err_file = err  # type: ignore[attr-defined]
    return p


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    p.wait(timeout=timeout)
    f = p.err_file  # type: ignore[attr-defined]
    f.seek(0)
    text = f.read()
    f.close()
    return p.returncode, text


# --- two at once ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cni_mode", [False, True], ids=["init", "cni-mode"])
@pytest.mark.parametrize("variant", BACKENDS)
def test_two_applies_into_one_namespace_at_once_both_succeed_with_every_rule_in_place(
    netns: NewNS, variant: str, cni_mode: bool
) -> None:
    exp = Expected(netns, CLASSIC_ARGS, variant)
    extra = ["--cni-mode"] if cni_mode else []
    for round_ in range(20):
        ns = netns("race")
        argv = [*ISTIO_IPTABLES, *cli_args(ns, variant, CLASSIC_ARGS, *extra)]
        procs = [start(argv), start(argv)]
        results = [finish(p) for p in procs]
        for code, err in results:
            assert code == 0, f"round {round_}: {err}"
        assert exp.state(ns) == {Family.V4: "all", Family.V6: "all"}, f"round {round_}"


@pytest.mark.parametrize("variant", BACKENDS)
def test_apply_and_clean_at_once_end_with_all_or_none(netns: NewNS, variant: str) -> None:
    exp = Expected(netns, CLASSIC_ARGS, variant)
    seen = set()
    for _ in range(10):
        ns = netns("race")
        args = cli_args(ns, variant, CLASSIC_ARGS)
        procs = [start([*ISTIO_IPTABLES, *args]), start([*ISTIO_CLEAN, *args])]
        for code, err in (finish(p) for p in procs):
            assert code == 0, err
        state = exp.state(ns)
        assert state in ({Family.V4: "all", Family.V6: "all"}, {Family.V4: "none", Family.V6: "none"})
        seen.add(state[Family.V4])
    # Whichever came first, the other saw its finished work (both orders happen, but need not).
    assert seen


# --- killed midway -------------------------------------------------------------------------------


def _restore_started(parent: int) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"-restore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def kill_when_restoring(p: subprocess.Popen[str], timeout: float = 30) -> bool:
    """SIGKILL ``p`` as soon as one of its children runs an iptables restore (False: it ended
    before one was seen)."""
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        if _restore_started(p.pid):
            p.send_signal(signal.SIGKILL)
            finish(p)
            return True
        assert time.monotonic() < deadline
    finish(p)
    return False


def rerun_converges(ns: NetNS, argv: Sequence[str], exp: Expected) -> None:
    code, err = finish(start(argv))
    assert code == 0, f"a rerun of the same command must converge:\n{err}"
    assert exp.state(ns) == {Family.V4: "all", Family.V6: "all"}


@pytest.mark.parametrize("variant", BACKENDS)
def test_killed_just_after_a_large_restore_starts_leaves_all_or_nothing_and_a_rerun_converges(
    netns: NewNS, variant: str
) -> None:
    # 8,000 excluded CIDRs: each family's document is far larger than a pipe holds.
    args = tproxy_args(8000)
    exp = Expected(netns, args, variant)
    assert len(render_family(plan(exp.config).v4)) > 4 * 65536
    killed = 0
    for _ in range(3):
        ns = netns("kill")
        argv = [*ISTIO_IPTABLES, *cli_args(ns, variant, args)]
        killed += kill_when_restoring(start(argv))
        settle(ns)
        for family, state in exp.state(ns).items():
            assert state in ("all", "none"), f"{family.name}: {state} after a kill"
        rerun_converges(ns, argv, exp)
    assert killed, "the command was never caught restoring"


@pytest.mark.parametrize("variant", BACKENDS)
def test_random_kills_leave_each_family_all_or_nothing_and_a_rerun_converges(
    netns: NewNS, variant: str
) -> None:
    # Documents larger than a pipe, killed at random moments over a whole run's length (start-up,
    # reading the state, the restores, the policy routes).
    args = tproxy_args(2500)
    exp = Expected(netns, args, variant)
    t0 = time.monotonic()
    assert finish(start([*ISTIO_IPTABLES, *cli_args(netns("timing"), variant, args)]))[0] == 0
    length = time.monotonic() - t0
    rng = random.Random(1234)
    outcomes = []
    for round_ in range(20):
        ns = netns("kill")
        argv = [*ISTIO_IPTABLES, *cli_args(ns, variant, args)]
        p = start(argv)
        time.sleep(rng.uniform(0, 1.2 * length))
        p.send_signal(signal.SIGKILL)
        finish(p)
        settle(ns)
        state = exp.state(ns)
        outcomes.append(tuple(state.values()))
        for family, s in state.items():
            assert s in ("all", "none"), f"round {round_}: {family.name} {s} after a kill"
        rerun_converges(ns, argv, exp)
    assert len(outcomes) == 20


def test_own_incomplete_rules_from_the_same_configuration_are_completed_not_drift(netns: NewNS) -> None:
    ns = netns("pod")
    args = tproxy_args(3)
    exp = Expected(netns, args, "nft")
    argv = [*ISTIO_IPTABLES, *cli_args(ns, "nft", args)]
    assert finish(start(argv))[0] == 0
    # What a run killed between the mangle and nat COMMITs leaves: remove our nat part only.
    for family in exp.ours:
        now = st.parse_save(saved(ns, family, "nft"))
        current = st.find_ours(now, exp.ours[family].known())
        nat_only = st.Ours({"nat": current.chains.get("nat", {})}, {"nat": current.builtin.get("nat", {})})
        ns.run([f"{family.iptables_command}-nft-restore", "--noflush"], input=st.transition(nat_only, {}))
    assert exp.state(ns) == {Family.V4: "partial", Family.V6: "partial"}
    code, err = finish(start(argv))
    assert code == 0, err
    assert "completing the rules of an interrupted run" in err
    assert exp.state(ns) == {Family.V4: "all", Family.V6: "all"}
    # A different configuration over the same incomplete set is still drift.
    for family in exp.ours:
        now = st.parse_save(saved(ns, family, "nft"))
        current = st.find_ours(now, exp.ours[family].known())
        nat_only = st.Ours({"nat": current.chains.get("nat", {})}, {"nat": current.builtin.get("nat", {})})
        ns.run([f"{family.iptables_command}-nft-restore", "--noflush"], input=st.transition(nat_only, {}))
    # (TPROXY's inbound rules are in mangle, which is in place: other excluded inbound ports.)
    different = tproxy_args(3)
    different[different.index("-d") + 1] = "15090"
    code, err = finish(start([*ISTIO_IPTABLES, *cli_args(ns, "nft", different)]))
    assert code == 1 and "drift" in err, err


# --- rollback ------------------------------------------------------------------------------------


class _ForeignBefore(RealExecutor):
    """Adds rules of someone else to the IPv4 tables right before the run's IPv6 restore."""

    def __init__(self, ns: NetNS, variant: str) -> None:
        self.ns, self.variant = ns, variant

    def start(self, argv: Sequence[str], **kw: object) -> Running:
        if (
            argv[0].endswith("ip6tables-" + self.variant + "-restore")
            and kw.get("stdin")
            and "ISTIO" in str(kw["stdin"])
        ):
            for table, chain in (("nat", "OUTPUT"), ("nat", "PREROUTING"), ("mangle", "PREROUTING")):
                self.ns.run(
                    [f"iptables-{self.variant}", "-t", table, "-A", chain, "-s", "192.0.2.77", "-j", "RETURN"]
                )
        return super().start(argv, **kw)  # type: ignore[arg-type]


def _bad_v6(rs: Ruleset) -> Ruleset:
    """rs with a v6 document the kernel rejects at COMMIT (TPROXY is a mangle-only target)."""
    assert rs.v6 is not None
    bad = Rule("nat", "ISTIO_OUTPUT", ("-p", "tcp"), "TPROXY", ("--on-port", "15006", "--tproxy-mark", "1/1"))
    return rs._replace(v6=FamilyRules(Family.V6, (*rs.v6.rules, bad)))


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
@pytest.mark.parametrize("variant", BACKENDS)
def test_rollback_removes_only_what_the_run_added(netns: NewNS, variant: str, mode: str) -> None:
    ns = netns("pod")
    args = CLASSIC_ARGS if mode == "REDIRECT" else tproxy_args(2)
    exp = Expected(netns, args, variant)
    opts = ApplyOptions(network_namespace=ns.path, force_iptables_binary=variant, cni_mode=True)
    with pytest.raises(ApplyError) as e:
        apply(_bad_v6(plan(exp.config)), opts, _ForeignBefore(ns, variant))
    assert e.value.kind == ap.REJECTED
    assert exp.state(ns)[Family.V4] == "none", "the run's own IPv4 rules must be rolled back"
    dump = saved(ns, Family.V4, variant)
    for table, chain in (("nat", "OUTPUT"), ("nat", "PREROUTING"), ("mangle", "PREROUTING")):
        table_dump = dump.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
        assert f"-A {chain} -s 192.0.2.77/32 -j RETURN" in table_dump, f"{table}/{chain}: {dump}"


# --- a busy lock is not an unusable backend ------------------------------------------------------


def test_a_busy_legacy_lock_is_an_error_never_a_switch_to_nft(
    netns: NewNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns("legacy")
    ns.run(["iptables-legacy", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.1", "-j", "ACCEPT"])
    ns.run(["ip6tables-legacy", "-t", "filter", "-A", "INPUT", "-s", "2001:db8::1", "-j", "ACCEPT"])
    lockfile = tmp_path / "xtables.lock"
    lockfile.touch()
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lockfile))
    cfg = Expected(netns, CLASSIC_ARGS, "nft").config
    with flocked(str(lockfile)):
        t0 = time.monotonic()
        with pytest.raises(ApplyError) as e:
            apply(plan(cfg), ApplyOptions(network_namespace=ns.path), lock_wait=1)
        assert time.monotonic() - t0 < 20
    assert e.value.kind == ap.LOCK and e.value.exit_code == 1
    assert "xtables lock" in e.value.message
    for family in Family:
        assert "ISTIO" not in saved(ns, family, "nft") and "ISTIO" not in saved(ns, family, "legacy")
    # Once the lock is free, detection picks legacy, as the namespace uses it.
    apply(plan(cfg), ApplyOptions(network_namespace=ns.path), lock_wait=1)
    assert "ISTIO_OUTPUT" in saved(ns, Family.V4, "legacy") and "ISTIO" not in saved(ns, Family.V4, "nft")


def test_an_apply_waits_while_another_holds_the_namespace_then_completes(netns: NewNS) -> None:
    ns = netns("pod")
    exp = Expected(netns, CLASSIC_ARGS, "nft")
    with flocked(ns.path):
        p = start([*ISTIO_IPTABLES, *cli_args(ns, "nft", CLASSIC_ARGS)])
        time.sleep(1.5)
        assert p.poll() is None, "it must wait for the lock, not go ahead"
        assert exp.state(ns) == {Family.V4: "none", Family.V6: "none"}
    code, err = finish(p)
    assert code == 0, err
    assert exp.state(ns) == {Family.V4: "all", Family.V6: "all"}


def test_a_namespace_held_past_the_wait_is_a_lock_error_and_changes_nothing(netns: NewNS) -> None:
    ns = netns("pod")
    cfg = Expected(netns, CLASSIC_ARGS, "nft").config
    with flocked(ns.path), pytest.raises(ApplyError) as e:
        apply(plan(cfg), ApplyOptions(network_namespace=ns.path, force_iptables_binary="nft"), lock_wait=1)
    assert e.value.kind == ap.LOCK and e.value.exit_code == 1
    assert "try again later" in e.value.message and ns.path in e.value.message
    for family in Family:
        assert "ISTIO" not in saved(ns, family, "nft")


# --- the namespace is the one opened first -------------------------------------------------------


class _SwapAfterFirst(RealExecutor):
    """Points ``link`` at another namespace once the first command has run."""

    def __init__(self, link: Path, other: NetNS) -> None:
        self.link, self.other, self.done = link, other, False

    def start(self, argv: Sequence[str], **kw: object) -> Running:
        if not self.done:
            self.done = True
            swap(self.link, self.other)
        return super().start(argv, **kw)  # type: ignore[arg-type]


def swap(link: Path, target: NetNS) -> None:
    tmp = link.with_suffix(".new")
    tmp.symlink_to(target.path)
    tmp.rename(link)


def routing(ns: NetNS) -> str:
    return "".join(
        ns.run(argv).stdout
        for argv in (["ip", "-4", "rule"], ["ip", "-6", "rule"], ["ip", "-6", "addr", "show", "dev", "lo"])
    )


def test_a_path_switched_to_another_namespace_midway_changes_nothing_there(
    netns: NewNS, tmp_path: Path
) -> None:
    pod, other = netns("pod"), netns("other")
    untouched = routing(other)
    link = tmp_path / "netns"
    link.symlink_to(pod.path)
    cfg = Expected(netns, tproxy_args(2), "nft").config
    opts = ApplyOptions(network_namespace=str(link), force_iptables_binary="nft")
    with pytest.raises(ApplyError) as e:
        apply(plan(cfg), opts, _SwapAfterFirst(link, other))
    # Everything went into the namespace that was opened (rules, policy routes, ::6); that the
    # path no longer names it is reported as for a deleted namespace.
    assert e.value.kind == ap.NETNS and "deleted while applying" in e.value.message
    assert "ISTIO_OUTPUT" in saved(pod, Family.V4, "nft") and "lookup 133" in routing(pod)
    assert routing(other) == untouched
    for family in Family:
        assert "ISTIO" not in saved(other, family, "nft"), (
            f"{family.name} rules went to the swapped-in namespace"
        )


def test_cli_detects_ipv6_and_applies_in_the_namespace_it_opened_first(
    netns: NewNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from istio_iptables import cli
    from istio_iptables.environment import RealMachine

    pod, other = netns("pod"), netns("other")
    pod.run(["ip", "addr", "add", "fd00::5/64", "dev", "lo", "nodad"])
    link = tmp_path / "netns"
    link.symlink_to(pod.path)
    real_addresses = RealMachine.local_addresses

    def detect_then_swap(self: RealMachine, path: str | None) -> list[object]:
        found = real_addresses(self, path)
        swap(link, other)  # after IPv6 was detected in the pod, before anything is applied
        return list(found)

    monkeypatch.setattr(RealMachine, "local_addresses", detect_then_swap)
    args = [a for a in CLASSIC_ARGS if a != "--enable-ipv6"]
    code = cli.run(PROG_IPTABLES, [*args, f"--network-namespace={link}", "--force-iptables-binary=nft"])
    assert code == 1  # the path no longer names the namespace by the end: reported
    assert "ISTIO_OUTPUT" in saved(pod, Family.V6, "nft")
    for family in Family:
        assert "ISTIO" not in saved(other, family, "nft")
