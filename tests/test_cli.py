"""The istio-iptables / istio-clean-iptables commands: pflag-style arguments, precedence over the
environment, one-line errors with exit 1, the dry-run, handing off to the applier, and random
option sets (hypothesis), whose dry-run documents the kernel must accept."""

from __future__ import annotations

import io
import ipaddress
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_iptables import cli, options
from istio_iptables.cli import PROG_CLEAN, PROG_IPTABLES, normalize_argv
from istio_iptables.config import ApplyOptions, Config, InterceptionMode, PortSpec
from istio_iptables.options import Kind, OptionDef
from test_options import FakeMachine

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
ip = ipaddress.ip_address

# Reproducible anywhere: no IPv6 detection, no resolv.conf.
PINNED = ["--no-enable-ipv6", "--dns-servers="]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def invoke(
    argv: list[str],
    env: dict[str, str] | None = None,
    machine: FakeMachine | None = None,
    prog: str = PROG_IPTABLES,
) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.run(prog, argv, env=env or {}, machine=machine or FakeMachine())
    return Result(code, out.getvalue(), err.getvalue())


def parsed(argv: list[str], env: dict[str, str] | None = None, machine: FakeMachine | None = None):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        got = cli.parse(PROG_IPTABLES, argv, env or {}, machine or FakeMachine())
    assert not isinstance(got, int), err.getvalue()
    return got


def assert_bad_input(r: Result, *names: str) -> None:
    assert r.code == 1, r
    assert r.out == "", r
    assert len(r.err_lines) == 1, r.err
    assert any(n in r.err for n in names), r.err


# --- argument syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-p", "15001"], ["--envoy-port=15001"]),
        (["-p15001"], ["--envoy-port=15001"]),
        (["-p=15001"], ["--envoy-port=15001"]),
        (["--envoy-port", "15001"], ["--envoy-port=15001"]),
        (["--envoy-port=15001"], ["--envoy-port=15001"]),
        (["-x", ""], ["--istio-service-exclude-cidr="]),
        (["-n"], ["--dry-run=true"]),
        (["-n=false"], ["--dry-run=false"]),
        (["-np", "1"], ["--dry-run=true", "--envoy-port=1"]),
        (["--dry-run"], ["--dry-run=true"]),
        (["--dry-run=0"], ["--dry-run=0"]),
        (["--no-enable-ipv6"], ["--enable-ipv6=false"]),
        (["-h"], ["--help"]),
        (["-p", "-n"], ["--envoy-port=-n"]),  # pflag takes the next argument as the value
    ],
)
def test_normalize_argv(argv: list[str], want: list[str]) -> None:
    assert normalize_argv(argv) == (want, [])


def test_normalize_positional_and_terminator() -> None:
    assert normalize_argv(["a", "-n", "--", "-p", "b"]) == (["--dry-run=true"], ["a", "-p", "b"])


@pytest.mark.parametrize("argv", [["--bogus"], ["-y"], ["-p"], ["--envoy-port"], ["--no-enable-ipv6=1"]])
def test_normalize_rejects(argv: list[str]) -> None:
    with pytest.raises(click.UsageError):
        normalize_argv(argv)


# --- every option, every spelling ---------------------------------------------------------------

VALID: dict[Kind, str] = {
    Kind.PORT: "15101",
    Kind.PORT_LIST: "6000,7000,",
    Kind.PORT_SPEC: "80,443",
    Kind.CIDR_LIST: "10.0.0.0/8,fd00::/8",
    Kind.CIDR_SPEC: "10.0.0.0/8",
    Kind.LOOPBACK_CIDR: "127.0.0.1/8",
    Kind.INTERFACES: "eth1,eth2",
    Kind.OWNERS: "3,4",
    Kind.GROUPS: "5",
    Kind.MODE: "TPROXY",
    Kind.MARK: "1338",
    Kind.TABLE: "134",
    Kind.BOOL: "true",
    Kind.DURATION: "2s",
    Kind.PATH: "/var/run/netns/x",
    Kind.NAME: "envoy",
    Kind.BINARY: "nft",
    Kind.ADDRESSES: "8.8.8.8,2001:4860:4860::8888",
    Kind.LOG_LEVELS: "default:debug",
    Kind.TEXT: "stderr",
    Kind.PACKET: "in tcp 1.1.1.1:1 -> 10.0.0.5:80",
    Kind.EXPLAIN_FORMAT: "json",
}
INVALID: dict[Kind, str | None] = {
    Kind.PORT: "8o",
    Kind.PORT_LIST: "6000,0",
    Kind.PORT_SPEC: "80,65536",
    Kind.CIDR_LIST: "10.0.0.1",
    Kind.CIDR_SPEC: "10.0.0.0/33",
    Kind.LOOPBACK_CIDR: "::1/128",
    Kind.INTERFACES: "eth0,abcdefghijklmnop",
    Kind.OWNERS: "4294967295",
    Kind.GROUPS: "bad name",
    Kind.MODE: "tproxy",
    Kind.MARK: "0",
    Kind.TABLE: "254",
    Kind.BOOL: "maybe",
    Kind.DURATION: "5",
    Kind.PATH: "a\0b",
    Kind.NAME: None,  # any user name is looked up, none is invalid
    Kind.BINARY: "iptables",
    Kind.ADDRESSES: "1.2.3",
    Kind.LOG_LEVELS: "loud",
    Kind.TEXT: "a\0b",
    Kind.PACKET: "a\0b",
    Kind.EXPLAIN_FORMAT: "xml",
}
FLAG_OPTS = [o for o in options.FLAGS]
SHORT_OPTS = [o for o in options.FLAGS if o.short]
ENV_OPTS = [(o, var) for o in options.OPTIONS for var in o.env]


def ids(o: OptionDef) -> str:
    return o.key


def value_arg(o: OptionDef, text: str) -> list[str]:
    return [f"--{o.name}={text}"]


@pytest.mark.parametrize("o", FLAG_OPTS, ids=ids)
def test_every_flag_long_form(o: OptionDef) -> None:
    for argv in (
        [f"--{o.name}={VALID[o.kind]}"],
        [f"--{o.name}", VALID[o.kind]] if o.kind is not Kind.BOOL else [],
    ):
        if argv:
            parsed([*PINNED, *argv] if o.name not in ("enable-ipv6", "dns-servers") else argv)


@pytest.mark.parametrize("o", SHORT_OPTS, ids=ids)
def test_every_shorthand(o: OptionDef) -> None:
    text = VALID[o.kind]
    long_cfg = parsed([*PINNED, f"--{o.name}={text}"])
    forms = [[f"-{o.short}"]] if o.kind is Kind.BOOL else [[f"-{o.short}", text], [f"-{o.short}{text}"]]
    forms.append([f"-{o.short}={text}"])
    for form in forms:
        assert parsed([*PINNED, *form]) == long_cfg, form


@pytest.mark.parametrize("o", [o for o in FLAG_OPTS if o.kind is Kind.BOOL], ids=ids)
def test_boolean_spellings(o: OptionDef) -> None:
    on = parsed([*PINNED, f"--{o.name}"])
    off = parsed([*PINNED, f"--{o.name}=false"])
    for spelling in ("true", "1", "t", "TRUE", "True"):
        assert parsed([*PINNED, f"--{o.name}={spelling}"]) == on
    for spelling in ("false", "0", "f", "FALSE", "False"):
        assert parsed([*PINNED, f"--{o.name}={spelling}"]) == off


@pytest.mark.parametrize(("o", "var"), ENV_OPTS, ids=[v for _, v in ENV_OPTS])
def test_every_variable(o: OptionDef, var: str) -> None:
    text = VALID[o.kind]
    assert parsed(PINNED, {var: text}) == parsed(PINNED, {o.env[0]: text})


@pytest.mark.parametrize("o", [o for o in FLAG_OPTS if o.env], ids=ids)
def test_command_line_wins_over_environment(o: OptionDef) -> None:
    # The bad variable would fail if it were used.
    bad = INVALID[o.kind]
    assert bad is not None
    env = {var: bad for var in o.env}
    argv = [f"--{o.name}={VALID[o.kind]}"]
    if o.name not in ("enable-ipv6", "dns-servers"):
        argv = [*PINNED, *argv]
    parsed(argv, env)


def test_precedence_values() -> None:
    cfg, _ = parsed([*PINNED, "-z", "1000"], {"INBOUND_CAPTURE_PORT": "2000"})
    assert cfg.inbound_capture_port == 1000
    cfg, _ = parsed(PINNED, {"INBOUND_CAPTURE_PORT": "2000"})
    assert cfg.inbound_capture_port == 2000
    cfg, _ = parsed(PINNED)
    assert cfg.inbound_capture_port == 15006
    _, opts = parsed([*PINNED, "--dry-run=false"], {"DRY_RUN": "true"})
    assert opts.dry_run is False
    cfg, _ = parsed(["--dns-servers="], {"ENABLE_INBOUND_IPV6": "true"})
    assert cfg.enable_ipv6
    cfg, _ = parsed(["--enable-ipv6=false", "--dns-servers="], {"ENABLE_INBOUND_IPV6": "true"})
    assert not cfg.enable_ipv6


def test_last_occurrence_wins() -> None:
    cfg, _ = parsed([*PINNED, "-p", "1", "--envoy-port=2", "-p3"])
    assert cfg.proxy_port == 3


def test_lists_tolerate_spaces_and_empty_items() -> None:
    cfg, _ = parsed(
        [*PINNED, "-b", "6000,7000,", "-d", " 15090, 15021 ,", "-u", "1337,", "-x", "10.0.0.0/8,,"]
    )
    assert cfg.inbound_ports == PortSpec(ports=(6000, 7000))
    assert cfg.inbound_ports_exclude == (15090, 15021)
    assert cfg.proxy_uids == ("1337",)
    assert cfg.outbound_ip_ranges_exclude == (ipaddress.ip_network("10.0.0.0/8"),)


def test_classic_command_line() -> None:
    cfg, opts = parsed(
        ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d",
         "15090,15021,15020", *PINNED]
    )  # fmt: skip
    assert cfg.interception_mode is InterceptionMode.REDIRECT
    assert cfg.inbound_ports.wildcard and cfg.outbound_ip_ranges_include.wildcard
    assert cfg.inbound_ports_exclude == (15090, 15021, 15020)
    assert opts == ApplyOptions()


def test_positional_arguments_are_ignored_with_a_warning() -> None:
    r = invoke([*PINNED, "--dry-run", "false"])
    assert r.code == 0
    assert "ignoring positional argument 'false'" in r.err
    assert r.out.startswith("# iptables-restore\n")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("o", [o for o in FLAG_OPTS if INVALID[o.kind] is not None], ids=ids)
def test_bad_value_on_the_command_line(o: OptionDef) -> None:
    bad = INVALID[o.kind]
    assert bad is not None
    r = invoke([*PINNED, f"--{o.name}={bad}"])
    assert_bad_input(r, f"--{o.name}")
    assert repr(bad) in r.err


@pytest.mark.parametrize(
    ("o", "var"),
    [(o, v) for o, v in ENV_OPTS if INVALID[o.kind] is not None],
    ids=lambda x: getattr(x, "key", x),
)
def test_bad_value_in_the_environment(o: OptionDef, var: str) -> None:
    bad = INVALID[o.kind]
    assert bad is not None
    argv = [a for a in PINNED if o.name is None or o.name not in a]
    if o.key != "dry-run":
        argv.append("-n")
    r = invoke(argv, {var: bad})
    assert_bad_input(r, var)


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["-p", "0"], "--envoy-port"),
        (["-p", "65536"], "--envoy-port"),
        (["-p", "8o"], "--envoy-port"),
        (["-p", ""], "--envoy-port"),
        (["-b", "*,80"], "--istio-inbound-ports"),
        (["-x", "*"], "--istio-service-exclude-cidr"),
        (["-i", "10.0.0.0/8,bad"], "--istio-service-cidr"),
        (["-m", "NONE"], "--istio-inbound-interception-mode"),
        (["-t", "4294967296"], "--istio-inbound-tproxy-mark"),
        (["-r", "0"], "--istio-inbound-tproxy-route-table"),
        (["-u", "-1"], "--proxy-uid"),
        (["-u", ","], "--proxy-uid"),
        (["-g", "bad name"], "--proxy-gid"),
        (["-c", "a/b"], "--istio-exclude-interfaces"),
        (["-k", "x" * 16], "--kube-virt-interfaces"),
        (["--dry-run="], "--dry-run"),
        (["--probe-timeout", "5"], "--probe-timeout"),
        (["--bogus"], "--bogus"),
        (["--envoy-port"], "--envoy-port"),
        (["-w"], "'w'"),
        (["--no-enable-ipv6=true"], "--no-enable-ipv6"),
    ],
)
def test_bad_input_examples(argv: list[str], name: str) -> None:
    assert_bad_input(invoke([*PINNED, *argv]), name)


def test_ipv6_range_where_only_ipv4_makes_sense() -> None:
    r = invoke(PINNED, {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "::1/128"})
    assert_bad_input(r, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")
    assert "IPv6" in r.err


def test_too_many_owner_groups() -> None:
    r = invoke(PINNED, {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(map(str, range(65)))})
    assert_bad_input(r, "ISTIO_OUTBOUND_OWNER_GROUPS")


def test_machine_errors_are_one_line_too() -> None:
    r = invoke(["--dns-servers="], machine=FakeMachine(addresses=[]))
    assert_bad_input(r, "no valid local IP address")
    r = invoke(["--no-enable-ipv6", "--redirect-dns"], machine=FakeMachine(resolv=None))
    assert_bad_input(r, "/etc/resolv.conf")


# More digits than int() converts (sys.get_int_max_str_digits(), 4300 by default), for every
# kind of option that holds a number.
MANY_NINES = "9" * 5000
HUGE: dict[Kind, str] = {
    Kind.PORT: MANY_NINES,
    Kind.PORT_LIST: f"80,{MANY_NINES}",
    Kind.PORT_SPEC: MANY_NINES,
    Kind.OWNERS: f"1-{MANY_NINES}",
    Kind.GROUPS: MANY_NINES,
    Kind.MARK: MANY_NINES,
    Kind.TABLE: MANY_NINES,
    Kind.DURATION: f"{MANY_NINES}s",
    Kind.CIDR_LIST: f"10.0.0.0/{MANY_NINES}",
    Kind.CIDR_SPEC: f"10.0.0.0/{MANY_NINES}",
    Kind.LOOPBACK_CIDR: f"127.0.0.1/{MANY_NINES}",
}


def assert_huge_value_refused(r: Result, name: str, value: str) -> None:
    assert_bad_input(r, name)
    # The value is named, by its start and its length, not in full.
    assert repr(value[:40]) in r.err and f"({len(value)} characters)" in r.err, r.err
    assert len(r.err) < 400, r.err


@pytest.mark.parametrize("o", [o for o in FLAG_OPTS if o.kind in HUGE], ids=ids)
def test_huge_number_on_the_command_line(o: OptionDef) -> None:
    r = invoke([*PINNED, f"--{o.name}={HUGE[o.kind]}"])
    assert_huge_value_refused(r, f"--{o.name}", HUGE[o.kind])
    if o.short:
        assert_huge_value_refused(invoke([*PINNED, f"-{o.short}", HUGE[o.kind]]), f"--{o.name}", HUGE[o.kind])


@pytest.mark.parametrize(
    ("o", "var"), [(o, v) for o, v in ENV_OPTS if o.kind in HUGE], ids=lambda x: getattr(x, "key", x)
)
def test_huge_number_in_the_environment(o: OptionDef, var: str) -> None:
    argv = [a for a in PINNED if o.name is None or o.name not in a]
    r = invoke([*argv, "-n"], {var: HUGE[o.kind]})
    assert_huge_value_refused(r, var, HUGE[o.kind])


def test_huge_owner_group_exclusions_and_durations() -> None:
    var, value = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", f"{MANY_NINES}-1"
    assert_huge_value_refused(invoke(PINNED, {var: value}), var, value)
    # Beyond Go's time.Duration (int64 nanoseconds), whatever the number of digits.
    r = invoke([*PINNED, "--probe-timeout=2562048h"])
    assert_bad_input(r, "--probe-timeout")
    assert "out of range" in r.err


def test_leading_zeros_do_not_count() -> None:
    # Go's strconv reads any number of leading zeros; so do we, without converting them.
    zeros = "0" * 5000
    argv = [*PINNED, f"-p{zeros}15101", f"-t{zeros}7", f"-u{zeros}3-{zeros}4", f"-d{zeros}80"]
    cfg, opts = parsed([*argv, f"--probe-timeout={zeros}2.5s"])
    assert (cfg.proxy_port, cfg.tproxy_mark, cfg.proxy_uids) == (15101, 7, ("3-4",))
    assert (cfg.inbound_ports_exclude, opts.probe_timeout) == ((80,), 2.5)


# --- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag: str) -> None:
    r = invoke([flag])
    assert r.code == 0 and r.err == ""
    text = " ".join(r.out.split())
    for o in options.FLAGS:
        assert f"--{o.name}" in text
        if o.short:
            assert f"-{o.short}, --{o.name}" in text
    for o in options.ENV_ONLY:
        assert o.env[0] in text
    marker = "[acts only when rules are applied]"
    assert text.count(marker) == sum(o.apply_only for o in options.FLAGS) + 1  # + the epilog's explanation
    run_validation = text[text.index("--run-validation") : text.index("--redirect-dns")]
    assert marker in run_validation
    redirect = text[text.index("--redirect-dns") : text.index("--drop-invalid")]
    assert marker not in redirect


def test_clean_help() -> None:
    r = invoke(["--help"], prog=PROG_CLEAN)
    assert r.code == 0 and "istio-clean-iptables" in r.out and "--envoy-port" in r.out


# --- dry run and hand-off ------------------------------------------------------------------------


def test_dry_run_prints_documents_only() -> None:
    r = invoke(["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                "-d", "15090,15021,15020", "--dry-run", "--enable-ipv6", "--dns-servers="])  # fmt: skip
    assert r.code == 0, r.err
    assert r.out.startswith("# iptables-restore\n*") or r.out.startswith("# iptables-restore\n* ")
    assert "\n# ip6tables-restore\n" in r.out
    assert all(line.startswith(("#", "*", ":", "-", "COMMIT")) for line in r.out.splitlines())


def test_dry_run_ipv4_only_by_detection() -> None:
    r = invoke(
        ["-n", "--dns-servers=", "-b", "*"], machine=FakeMachine(addresses=[ip("10.0.0.9"), ip("fd00::9")])
    )
    assert r.code == 0 and "ip6tables-restore" not in r.out
    r = invoke(["-n", "--dns-servers=", "-b", "*"], machine=FakeMachine(addresses=[ip("fd00::9")]))
    assert r.code == 0 and "# ip6tables-restore\n" in r.out


class FakeApplyError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@pytest.fixture
def fake_apply(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in for istio_iptables.apply recording its calls (the real one is tested elsewhere)."""
    calls: dict[str, Any] = {"fail": None}
    mod = types.ModuleType("istio_iptables.apply")

    def apply(ruleset: Any, opts: ApplyOptions, executor: Any = None, *, netns: Any = None) -> None:
        calls["apply"] = (ruleset, opts)
        calls["apply_netns"] = netns
        if calls["fail"]:
            raise FakeApplyError(*calls["fail"])

    def cleanup(
        opts: ApplyOptions,
        executor: Any = None,
        *,
        enable_ipv6: bool = True,
        ruleset: Any = None,
        netns: Any = None,
    ) -> None:
        calls["cleanup"] = (opts, enable_ipv6, ruleset)
        if calls["fail"]:
            raise FakeApplyError(*calls["fail"])

    def validate(config: Any, opts: ApplyOptions, *, ipv6: bool = False, netns: Any = None) -> None:
        calls["validate"] = (config, opts, ipv6)

    mod.ApplyError = FakeApplyError  # type: ignore[attr-defined]
    mod.apply = apply  # type: ignore[attr-defined]
    mod.cleanup = cleanup  # type: ignore[attr-defined]
    validation = types.ModuleType("istio_iptables.validation")
    validation.validate = validate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "istio_iptables.apply", mod)
    monkeypatch.setitem(sys.modules, "istio_iptables.validation", validation)
    yield calls


def test_apply_gets_the_ruleset_and_options(fake_apply: dict[str, Any]) -> None:
    r = invoke(
        [*PINNED, "-b", "*", "--skip-rule-apply", "--run-validation", "--network-namespace=/run/netns/p"]
    )
    assert r.code == 0 and r.out == ""
    ruleset, opts = fake_apply["apply"]
    assert opts.skip_rule_apply and opts.run_validation and opts.network_namespace == "/run/netns/p"
    from istio_iptables.planner import plan

    cfg, _ = parsed([*PINNED, "-b", "*"])
    assert ruleset == plan(cfg)
    # Validation runs after --skip-rule-apply too: that is how Istio's validation container
    # checks rules the CNI plugin installed.
    assert fake_apply["validate"][0] == cfg


def test_apply_error_exit_code(fake_apply: dict[str, Any]) -> None:
    fake_apply["fail"] = ("iptables validation failed; workload is not ready for Istio.", 126)
    r = invoke(PINNED)
    assert r.code == 126 and r.out == ""
    assert r.err_lines[-1] == "Error: iptables validation failed; workload is not ready for Istio."


def test_clean_calls_cleanup(fake_apply: dict[str, Any]) -> None:
    r = invoke(["--enable-ipv6", "--dns-servers=", "--cni-mode"], prog=PROG_CLEAN)
    assert r.code == 0
    opts, enable_ipv6, ruleset = fake_apply["cleanup"]
    assert enable_ipv6 is True and opts.cni_mode
    from istio_iptables.planner import plan

    assert ruleset == plan(parsed(["--enable-ipv6", "--dns-servers="])[0])
    assert "apply" not in fake_apply
    del fake_apply["cleanup"]
    r = invoke([*PINNED, "--dry-run"], prog=PROG_CLEAN)
    assert r.code == 0 and r.out == "" and "cleanup" not in fake_apply
    fake_apply["fail"] = ("boom", 1)
    r = invoke(PINNED, prog=PROG_CLEAN)
    assert r.code == 1 and r.err_lines[-1] == "Error: boom"


def test_clean_bad_input() -> None:
    assert_bad_input(invoke([*PINNED, "-p", "0"], prog=PROG_CLEAN), "--envoy-port")


def test_log_options() -> None:
    r = invoke([*PINNED, "-n", "--log_output_level=default:none"])
    assert r.code == 0 and r.err == ""
    r = invoke([*PINNED, "-n", "--log_as_json", "--log_output_level=info", "--log_target=stdout"])
    assert r.code == 0 and r.err.startswith('{"level": "info"')
    assert_bad_input(invoke([*PINNED, "--log_output_level=loud"]), "--log_output_level")


# --- the installed console scripts ---------------------------------------------------------------


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{path} is not installed (run scripts/setup)")
    return str(path)


def test_console_script_bad_port() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for bad in ("0", "65536", "8o"):
        p = subprocess.run(
            [script("istio-iptables"), "-p", bad, "-n"], capture_output=True, text=True, env=env
        )
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.splitlines() == [
            f"Error: invalid value '{bad}' for --envoy-port: " + p.stderr.split(": ", 2)[2].strip()
        ]
    p = subprocess.run([script("istio-clean-iptables"), "--nope"], capture_output=True, text=True, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "Error: unknown flag: --nope\n")


def test_console_script_dry_run() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    p = subprocess.run(
        [script("istio-iptables"), "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
         "-b", "*", "-d", "15090,15021,15020", "--dry-run", *PINNED],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# iptables-restore\n") and "ip6tables" not in p.stdout


# --- random option sets --------------------------------------------------------------------------

ports = st.integers(1, 65535)
_pad = st.sampled_from(["", " "])


@st.composite
def port_list(draw: st.DrawFn, min_size: int = 0) -> str:
    items = [str(p) for p in draw(st.lists(ports, min_size=min_size, max_size=4))]
    text = ",".join(draw(_pad) + i + draw(_pad) for i in items)
    return text + draw(st.sampled_from(["", ","]))


@st.composite
def cidr(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
            draw(st.integers(0, 2**32 - 1))
        )
        bits = draw(st.integers(0, 32))
    else:
        addr = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        bits = draw(st.integers(0, 128))
    return f"{addr}/{bits}"


cidr_list = st.lists(cidr(), max_size=3).map(",".join)
ifname = st.from_regex(r"[a-z][a-z0-9_.]{0,13}\+?", fullmatch=True).filter(lambda s: len(s) <= 15)
iface_list = st.lists(ifname, max_size=3).map(",".join)
# The kernel test loads these, so names must exist: ids and root only.
owner = st.one_of(st.integers(0, 2**32 - 2).map(str), st.just("root"))
owner_list = st.lists(owner, min_size=1, max_size=3).map(",".join)
bool_text = st.sampled_from(["true", "false", "1", "0", "t", "F", "True", "FALSE"])
address = st.one_of(
    st.integers(1, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
    st.integers(1, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i))),
)
VALID_VALUES: dict[str, st.SearchStrategy[str]] = {
    "envoy-port": ports.map(str),
    "inbound-capture-port": ports.map(str),
    "inbound-tunnel-port": ports.map(str),
    "proxy-uid": owner_list,
    "proxy-gid": owner_list,
    "istio-inbound-interception-mode": st.sampled_from(["", "REDIRECT", "TPROXY"]),
    "istio-inbound-ports": st.one_of(st.just("*"), port_list()),
    "istio-local-exclude-ports": port_list(),
    "istio-exclude-interfaces": iface_list,
    "istio-service-cidr": st.one_of(st.just("*"), cidr_list),
    "istio-service-exclude-cidr": cidr_list,
    "istio-outbound-ports": port_list(),
    "istio-local-outbound-ports-exclude": port_list(),
    "kube-virt-interfaces": iface_list,
    "istio-inbound-tproxy-mark": st.integers(1, 2**32 - 1).map(str),
    "istio-inbound-tproxy-route-table": st.integers(1, 2**32 - 1)
    .filter(lambda t: t not in (253, 254, 255))
    .map(str),
    "dry-run": st.just("true"),
    "iptables-probe-port": ports.map(str),
    "probe-timeout": st.sampled_from(["5s", "100ms", "1m30s", "0"]),
    "skip-rule-apply": bool_text,
    "run-validation": bool_text,
    "redirect-dns": bool_text,
    "drop-invalid": bool_text,
    "dual-stack": bool_text,
    "capture-all-dns": bool_text,
    "network-namespace": st.sampled_from(["", "/var/run/netns/pod"]),
    "cni-mode": bool_text,
    "reconcile": bool_text,
    "cleanup-only": bool_text,
    "force-apply": bool_text,
    "native-nftables": bool_text,
    "force-iptables-binary": st.sampled_from(["", "legacy", "nft"]),
    "enable-ipv6": bool_text,
    "dns-servers": st.lists(address, max_size=3).map(",".join),
    "resolv-conf": st.just("/etc/resolv.conf"),
    # --explain prints a walk instead of the rules (tests/test_explain.py): not in random dry runs.
    "explain": st.just("out tcp 10.0.0.5:1 -> 10.0.0.9:80 uid=1000"),
    "live": st.just("false"),
    "explain-format": st.just("text"),
    "log_output_level": st.sampled_from(["info", "default:warn", "error"]),
    "log_as_json": bool_text,
    "log_target": st.just("stderr"),
    "log_caller": st.just(""),
    "log_stacktrace_level": st.just("none"),
    "ISTIO_OUTBOUND_OWNER_GROUPS": st.one_of(st.just("*"), st.lists(owner, max_size=3).map(",".join)),
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": st.lists(owner, max_size=3).map(",".join),
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": st.builds(
        lambda i, b: f"{ipaddress.IPv4Address((127 << 24) + i)}/{b}",
        st.integers(0, 2**24 - 1),
        st.integers(8, 32),
    ),
    "ENVOY_USER": st.sampled_from(["istio-proxy", "root"]),
}
INVALID_VALUES: dict[str, st.SearchStrategy[str]] = {
    Kind.PORT.name: st.sampled_from(["0", "65536", "8o", "", "-1", "99999"]),
    Kind.PORT_LIST.name: st.sampled_from(["1,0", "80,x", "*", "70000"]),
    Kind.PORT_SPEC.name: st.sampled_from(["*,80", "0", "8o,", "1-2"]),
    Kind.CIDR_LIST.name: st.sampled_from(["*", "10.0.0.1", "1.2.3.4/33", "::/129", "x/8"]),
    Kind.CIDR_SPEC.name: st.sampled_from(["*,10.0.0.0/8", "10.0.0.0", "300.0.0.0/8"]),
    Kind.LOOPBACK_CIDR.name: st.sampled_from(["::1/128", "10.0.0.1/8", "127.0.0.1/7", "127.0.0.1"]),
    Kind.INTERFACES.name: st.sampled_from(["a" * 16, "a/b", "a:b", "..", "-x"]),
    Kind.OWNERS.name: st.sampled_from(["4294967295", "bad name", "*", "9-1"]),
    Kind.GROUPS.name: st.sampled_from(["bad name", "*,root", ",".join(map(str, range(65)))]),
    Kind.MODE.name: st.sampled_from(["tproxy", "NONE", "redirect"]),
    Kind.MARK.name: st.sampled_from(["0", "4294967296", "0x1"]),
    Kind.TABLE.name: st.sampled_from(["0", "253", "254", "255", "main"]),
    Kind.BOOL.name: st.sampled_from(["maybe", "yes", "2"]),
    Kind.DURATION.name: st.sampled_from(["5", "-1s", "1d"]),
    Kind.PATH.name: st.just("a\0b"),
    Kind.BINARY.name: st.sampled_from(["iptables", "auto"]),
    Kind.ADDRESSES.name: st.sampled_from(["1.2.3", "fe80::1%eth0", "10.0.0.0/8"]),
    Kind.LOG_LEVELS.name: st.sampled_from(["loud", "a:b:c"]),
    Kind.TEXT.name: st.just("a\0b"),
    Kind.PACKET.name: st.just("a\0b"),
    Kind.EXPLAIN_FORMAT.name: st.sampled_from(["xml", "JSON"]),
}


def test_strategies_cover_every_option() -> None:
    assert set(VALID_VALUES) == set(options.BY_KEY)


@st.composite
def option_set(draw: st.DrawFn, invalid: bool) -> tuple[list[str], dict[str, str], str | None]:
    """argv and environment for a random valid configuration, plus (when ``invalid``) one bad
    value given on the command line or in the highest-priority variable; returns the name the
    error must mention."""
    argv: list[str] = ["--dry-run"]
    env: dict[str, str] = {}
    keys = draw(st.lists(st.sampled_from(sorted(set(VALID_VALUES) - {"explain"})), unique=True, max_size=12))
    bad: OptionDef | None = None
    if invalid:
        candidates = [o for o in options.OPTIONS if o.kind.name in INVALID_VALUES and o.key != "dry-run"]
        bad = draw(st.sampled_from(candidates))
        if bad.key in ("proxy-uid", "proxy-gid"):
            pass  # "" and "," differ: "" means default, "," is rejected (in INVALID_VALUES)
        keys = [k for k in keys if k != bad.key]
    for key in keys:
        o = options.BY_KEY[key]
        value = draw(VALID_VALUES[key])
        if o.name is not None and (not o.env or draw(st.booleans())):
            if o.kind is Kind.BOOL and value == "true" and draw(st.booleans()):
                argv.append(f"--{o.name}")
            elif o.short and draw(st.booleans()):
                argv += [f"-{o.short}", value]
            else:
                argv.append(f"--{o.name}={value}")
        else:
            env[draw(st.sampled_from(o.env))] = value
    if bad is None:
        return argv, env, None
    value = draw(INVALID_VALUES[bad.kind.name])
    if bad.name is not None and (not bad.env or draw(st.booleans())):
        argv.append(f"--{bad.name}={value}")
        return argv, env, f"--{bad.name}"
    var = bad.env[-1]
    if bad.kind is Kind.BOOL and value.strip() == "":
        value = "maybe"
    for other in bad.env:
        env.pop(other, None)
    env[var] = value
    return argv, env, var


@settings(max_examples=150)
@given(option_set(invalid=False))
def test_random_valid_option_sets_produce_a_dry_run(
    case: tuple[list[str], dict[str, str], str | None],
) -> None:
    argv, env, _ = case
    machine = FakeMachine(
        addresses=[ip("10.0.0.9"), ip("fd00::9")], uids={"istio-proxy": "1337", "root": "0"}
    )
    r = invoke(argv, env, machine)
    assert r.code == 0, (argv, env, r.err)
    opts = parsed(argv, env, machine)[1]
    if opts.cleanup_only:
        assert r.out == ""  # nothing would be installed
        return
    if opts.native_nftables:
        assert r.out.startswith("# nft -f\nadd table inet istio-proxy-nat\n")
        assert r.out.count("# nft -f\n") == 1 and "restore" not in r.out
        return
    assert r.out.startswith("# iptables-restore\n")
    assert r.out.count("# iptables-restore\n") == 1 and r.out.count("# ip6tables-restore\n") <= 1


@settings(max_examples=150)
@given(option_set(invalid=True))
def test_random_invalid_option_sets_exit_1_naming_the_option(
    case: tuple[list[str], dict[str, str], str | None],
) -> None:
    argv, env, name = case
    assert name is not None
    r = invoke(argv, env, FakeMachine(addresses=[ip("10.0.0.9")]))
    assert_bad_input(r, name)


def restore_documents(out: str) -> list[tuple[str, str]]:
    """[(restore command, document)] from a dry-run output."""
    docs: list[tuple[str, str]] = []
    for line in out.splitlines(keepends=True):
        if line.startswith("# iptables-restore") or line.startswith("# ip6tables-restore"):
            docs.append((line[2:].strip(), ""))
        else:
            assert docs, out
            docs[-1] = (docs[-1][0], docs[-1][1] + line)
    return docs


@pytest.mark.kernel
@settings(max_examples=40)
@given(option_set(invalid=False))
def test_random_valid_dry_runs_load_into_a_fresh_namespace(
    case: tuple[list[str], dict[str, str], str | None],
) -> None:
    from tests.support.netns import create_netns, delete_netns

    argv, env, _ = case
    machine = FakeMachine(
        addresses=[ip("10.0.0.9"), ip("fd00::9")], uids={"istio-proxy": "1337", "root": "0"}
    )
    r = invoke(argv, env, machine)
    assert r.code == 0, r.err
    opts = parsed(argv, env, machine)[1]
    if opts.cleanup_only:
        return
    if opts.native_nftables:
        _, sep, script = r.out.partition("# nft -f\n")
        assert sep
        docs = [("nft", script)]
    else:
        docs = restore_documents(r.out)
        assert docs and docs[0][0] == "iptables-restore"
    ns = create_netns("flags")
    try:
        for command, doc in docs:
            if command == "nft":
                p = ns.run(["nft", "-f", "-"], input=doc, check=False)
                assert p.returncode == 0, f"nft rejected:\n{doc}\n{p.stderr}\nargv={argv} env={env}"
                continue
            p = ns.run([command, "--noflush"], input=doc, check=False)
            assert p.returncode == 0, f"{command} rejected:\n{doc}\n{p.stderr}\nargv={argv} env={env}"
    finally:
        delete_netns(ns)


def test_config_type_is_what_the_planner_takes() -> None:
    cfg, _ = parsed(PINNED)
    assert isinstance(cfg, Config)


# --- click only for --help and usage errors ------------------------------------------------------

SAME_READING = [
    ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"],
    ["-p", "1", "--envoy-port=2", "-p3"],  # the last occurrence wins
    ["--dry-run", "false", "--", "-p", "9"],  # positional arguments kept apart
    ["-n=false", "--no-enable-ipv6", "--dns-servers=", "--istio-service-cidr=10.0.0.0/8,fd00::/8"],
    ["--log_output_level=default:debug", "-k", "a=b", "--network-namespace=/var/run/netns/x=y"],
    ["-nm", "TPROXY", "--istio-inbound-tproxy-mark", "1337", "-r", "133"],
]


@pytest.mark.parametrize("argv", SAME_READING)
def test_values_are_read_without_click_as_click_reads_them(argv: list[str]) -> None:
    fast = cli._values_without_click(argv)
    assert fast is not None
    assert fast == cli._parse_with_click(PROG_IPTABLES, argv)


@pytest.mark.parametrize("argv", [["--help"], ["-p", "1", "-h"], ["--bogus"], ["-p"], ["--no-enable-ipv6=1"]])
def test_help_and_usage_errors_go_through_click(argv: list[str]) -> None:
    assert cli._values_without_click(argv) is None


@settings(max_examples=100)
@given(option_set(invalid=False))
def test_random_command_lines_read_the_same_without_click(
    case: tuple[list[str], dict[str, str], str | None],
) -> None:
    argv, _, _ = case
    assert cli._values_without_click(argv) == cli._parse_with_click(PROG_IPTABLES, argv)


def test_applying_does_not_import_click() -> None:
    code = (
        "import sys\n"
        "from istio_iptables import cli\n"
        "argv = ['-p', '15001', '-z', '15006', '-u', '1337', '-m', 'REDIRECT', '-i', '*', '-b', '*',\n"
        "        '--no-enable-ipv6', '--dns-servers=', '--skip-rule-apply']\n"
        "assert cli.run(cli.PROG_IPTABLES, argv, env={}) == 0\n"
        "assert 'click' not in sys.modules, 'click imported for a plain run'\n"
        "assert cli.run(cli.PROG_IPTABLES, ['--bogus'], env={}) == 1\n"
        "assert 'click' in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Error: unknown flag: --bogus" in p.stderr


def test_the_command_ends_without_losing_buffered_output(venv_bin: Path) -> None:
    # The commands skip the interpreter's shutdown (startup.exit_now): a large dry run must still
    # arrive whole through a pipe, and the exit status must be the command's.
    cidrs = ",".join(f"10.{i // 250}.{i % 250}.0/24" for i in range(4000))
    argv = [str(venv_bin / "istio-iptables"), "-p", "15001", "-u", "1337", "-x", cidrs, "--dry-run"]
    got = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert got.returncode == 0, got.stderr
    want = io.StringIO()
    with redirect_stdout(want), redirect_stderr(io.StringIO()):
        assert cli.run(PROG_IPTABLES, argv[1:], env={}) == 0
    assert got.stdout == want.getvalue() and got.stdout.count("-j RETURN") >= 4000
    bad = subprocess.run(
        [*argv[:2], "--envoy-port=0", "--dry-run"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1 and bad.stdout == "" and "--envoy-port" in bad.stderr
