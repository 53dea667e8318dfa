"""Parsing of option values (config.py), option resolution (options.load), the machine-derived
settings (environment.py) and the option table of docs/options.md."""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from istio_iptables import config as c
from istio_iptables import options
from istio_iptables.config import CidrSpec, ConfigError, InterceptionMode, OwnerGroups, PortSpec
from istio_iptables.environment import (
    DetectionError,
    RealMachine,
    detect_ipv6,
    nameservers_from_resolv_conf,
    split_nameservers,
)
from tests.support.netns import NetNS, add_addresses, veth_pair

ROOT = Path(__file__).resolve().parent.parent
ip = ipaddress.ip_address
net = ipaddress.ip_network


@dataclass
class FakeMachine:
    """A machine with one IPv4 pod address, a resolv.conf and no users unless told otherwise."""

    uids: dict[str, str] = field(default_factory=dict)
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default_factory=lambda: [ip("127.0.0.1"), ip("10.1.0.5"), ip("::1"), ip("fe80::1")]
    )
    resolv: str | None = "nameserver 10.96.0.10\nnameserver fd00::10\n"
    calls: list[tuple[str, object]] = field(default_factory=list)

    def user_uid(self, name: str) -> str | None:
        self.calls.append(("user", name))
        return self.uids.get(name)

    def local_addresses(self, netns: str | None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        self.calls.append(("addresses", netns))
        return list(self.addresses)

    def nameservers(self, path: str) -> list[str]:
        self.calls.append(("resolv", path))
        if self.resolv is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        return nameservers_from_resolv_conf(self.resolv)


def load(
    values: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    machine: FakeMachine | None = None,
):
    return options.load(values or {}, env or {}, machine or FakeMachine())


def error_of(values: dict[str, str] | None = None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load(values, env)
    return ei.value


# --- value parsers ---------------------------------------------------------------------------


def test_split_list_tolerates_spaces_and_empty_items() -> None:
    assert c.split_list("6000,7000,") == ["6000", "7000"]
    assert c.split_list(" 6000 , ,7000") == ["6000", "7000"]
    assert c.split_list("") == []
    assert c.split_list(",") == []


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True", " true "])
def test_bool_true_spellings(text: str) -> None:
    assert c.parse_bool("--x", text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_bool_false_spellings(text: str) -> None:
    assert c.parse_bool("--x", text) is False


@pytest.mark.parametrize("text", ["", "yes", "no", "on", "2", "tRUE"])
def test_bool_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--x"):
        c.parse_bool("--x", text)


def test_port() -> None:
    assert c.parse_port("-p", "15001") == 15001
    assert c.parse_port("-p", " 1 ") == 1
    assert c.parse_port("-p", "65535") == 65535


@pytest.mark.parametrize("text", ["0", "65536", "8o", "", "-1", "+80", "0x50", "80 80", "1e3"])
def test_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        c.parse_port("--envoy-port", text)
    assert ei.value.source == "--envoy-port"
    assert ei.value.value == text
    assert repr(text) in str(ei.value)


def test_port_list() -> None:
    assert c.parse_port_list("-d", "6000,7000,") == (6000, 7000)
    assert c.parse_port_list("-d", " 15090, 15021 ,15020") == (15090, 15021, 15020)
    assert c.parse_port_list("-d", "") == ()
    with pytest.raises(ConfigError, match="'8o'"):
        c.parse_port_list("-d", "80,8o")
    with pytest.raises(ConfigError, match="wildcard"):
        c.parse_port_list("-d", "*")


def test_port_spec() -> None:
    assert c.parse_port_spec("-b", "*") == PortSpec(wildcard=True)
    assert c.parse_port_spec("-b", " * ") == PortSpec(wildcard=True)
    assert c.parse_port_spec("-b", "") == PortSpec()
    assert c.parse_port_spec("-b", "80,443,") == PortSpec(ports=(80, 443))
    with pytest.raises(ConfigError, match="alone"):
        c.parse_port_spec("-b", "*,80")


def test_cidr_keeps_the_network_iptables_would_hold() -> None:
    # iptables masks host bits (iptables-save shows 10.0.0.0/8 for -d 10.1.2.3/8).
    assert c.parse_cidr("-i", "10.1.2.3/8") == net("10.0.0.0/8")
    assert c.parse_cidr("-i", "2001:db8::1/32") == net("2001:db8::/32")
    assert c.parse_cidr("-i", "0.0.0.0/0") == net("0.0.0.0/0")
    assert c.parse_cidr("-i", "::ffff:1.2.3.4/128").version == 6


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1", "10.0.0.0/33", "::/129", "10.0.0.0/255.0.0.0", "10.0.0.0/08", "01.2.3.4/8",
     "fe80::1%eth0/64", "300.1.1.1/8", "10.0.0.0/", "/8", "*", "10.0.0.0/-1", "x/8"],
)  # fmt: skip
def test_cidr_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="-i"):
        c.parse_cidr("-i", text)


def test_cidr_list_and_spec() -> None:
    assert c.parse_cidr_list("-x", "10.0.0.0/8, fd00::/8,") == (net("10.0.0.0/8"), net("fd00::/8"))
    assert c.parse_cidr_list("-x", "") == ()
    with pytest.raises(ConfigError, match="wildcard"):
        c.parse_cidr_list("-x", "*")
    assert c.parse_cidr_spec("-i", "*") == CidrSpec(wildcard=True)
    assert c.parse_cidr_spec("-i", "") == CidrSpec()
    spec = c.parse_cidr_spec("-i", "127.0.0.1/32,10.0.0.0/8")
    assert spec.cidrs == (net("127.0.0.1/32"), net("10.0.0.0/8")) and spec.has_loopback
    with pytest.raises(ConfigError, match="alone"):
        c.parse_cidr_spec("-i", "10.0.0.0/8,*")


def test_ipv4_loopback_cidr() -> None:
    src = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"
    assert c.parse_ipv4_loopback_cidr(src, "127.0.0.1/32") == "127.0.0.1/32"
    assert c.parse_ipv4_loopback_cidr(src, "127.0.0.1/8") == "127.0.0.0/8"
    with pytest.raises(ConfigError, match="IPv6"):
        c.parse_ipv4_loopback_cidr(src, "::1/128")
    with pytest.raises(ConfigError, match="loopback"):
        c.parse_ipv4_loopback_cidr(src, "192.168.1.1/24")
    with pytest.raises(ConfigError, match="8-32"):
        c.parse_ipv4_loopback_cidr(src, "127.0.0.1/7")
    with pytest.raises(ConfigError):
        c.parse_ipv4_loopback_cidr(src, "127.0.0.1")


def test_interfaces() -> None:
    assert c.parse_interface_list("-c", "eth0, veth+,vlan.10,br-1,") == ("eth0", "veth+", "vlan.10", "br-1")
    assert c.parse_interface_list("-c", "a" * 15) == ("a" * 15,)


@pytest.mark.parametrize(
    "name",
    ["a" * 16, "a/b", "a:b", ".", "..", "-eth0", "!eth0", 'e"th', "e'th", "e\\th", "eth#", "eth\u00e9"],
)
def test_interfaces_reject(name: str) -> None:
    with pytest.raises(ConfigError, match="interface"):
        c.parse_interface_list("-c", f"eth0,{name}")


def test_interface_with_inner_space_is_rejected() -> None:
    with pytest.raises(ConfigError):
        c.parse_interface_list("-c", "eth 0")


def test_mode() -> None:
    assert c.parse_mode("-m", "") is InterceptionMode.REDIRECT
    assert c.parse_mode("-m", "REDIRECT") is InterceptionMode.REDIRECT
    assert c.parse_mode("-m", "TPROXY") is InterceptionMode.TPROXY
    for bad in ("tproxy", "NONE", "redirect", "*"):
        with pytest.raises(ConfigError, match="REDIRECT or TPROXY"):
            c.parse_mode("-m", bad)


def test_owner_list() -> None:
    assert c.parse_owner_list("-u", "1337") == ("1337",)
    assert c.parse_owner_list("-u", "3, 4,") == ("3", "4")
    assert c.parse_owner_list("-u", "0,4294967294") == ("0", "4294967294")
    assert c.parse_owner_list("-u", "1000-2000,istio-proxy,_svc,host$") == (
        "1000-2000",
        "istio-proxy",
        "_svc",
        "host$",
    )
    assert c.parse_owner_list("-u", "007") == ("7",)


@pytest.mark.parametrize(
    "text", ["4294967295", "2000-1000", "bad name", "*", "1-4294967295", "-1", "a" * 33, "x;y"]
)
def test_owner_list_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="-u"):
        c.parse_owner_list("-u", text)


def test_owner_groups(caplog: pytest.LogCaptureFixture) -> None:
    assert c.parse_owner_groups("*", "") == OwnerGroups(except_=True, values=())
    assert c.parse_owner_groups("*", "888,ftp") == OwnerGroups(except_=True, values=("888", "ftp"))
    assert c.parse_owner_groups("java,202", "") == OwnerGroups(except_=False, values=("java", "202"))
    # Empty include: capture no group (Istio's InterceptOnly with no values).
    assert c.parse_owner_groups("", "") == OwnerGroups(except_=False, values=())
    assert len(c.parse_owner_groups(",".join(map(str, range(64))), "").values) == 64
    with pytest.raises(ConfigError, match="at most 64") as ei:
        c.parse_owner_groups(",".join(map(str, range(65))), "")
    assert ei.value.source == "ISTIO_OUTBOUND_OWNER_GROUPS"
    with caplog.at_level(logging.WARNING):
        got = c.parse_owner_groups("java", "ftp")
    assert got == OwnerGroups(except_=False, values=("java",))
    assert "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE is ignored" in caplog.text
    with pytest.raises(ConfigError, match="ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"):
        c.parse_owner_groups("*", "bad name")
    with pytest.raises(ConfigError, match="'\\*' must|wildcard"):
        c.parse_owner_groups("*,java", "")


def test_mark_and_table() -> None:
    assert c.parse_mark("-t", "1337") == 1337
    assert c.parse_mark("-t", "4294967295") == 4294967295
    for bad in ("0", "4294967296", "0x539", "", "-1", "mark"):
        with pytest.raises(ConfigError, match="-t"):
            c.parse_mark("-t", bad)
    assert c.parse_route_table("-r", "133") == 133
    assert c.parse_route_table("-r", "4294967295") == 4294967295
    for bad in ("0", "253", "254", "255", "4294967296", "main", ""):
        with pytest.raises(ConfigError, match="-r"):
            c.parse_route_table("-r", bad)


def test_duration() -> None:
    assert c.parse_duration("--probe-timeout", "5s") == 5.0
    assert c.parse_duration("--probe-timeout", "1m30s") == 90.0
    assert c.parse_duration("--probe-timeout", "250ms") == pytest.approx(0.25)
    assert c.parse_duration("--probe-timeout", "1.5h") == 5400.0
    assert c.parse_duration("--probe-timeout", "0") == 0.0
    assert c.parse_duration("--probe-timeout", "10us") == pytest.approx(1e-5)
    for bad in ("5", "", "-1s", "s", "5 s", "1d", ".s"):
        with pytest.raises(ConfigError, match="duration"):
            c.parse_duration("--probe-timeout", bad)


def test_dns_servers() -> None:
    v4, v6 = c.parse_dns_servers("--dns-servers", "10.96.0.10, fd00::a,,8.8.8.8")
    assert v4 == (ip("10.96.0.10"), ip("8.8.8.8"))
    assert v6 == (ip("fd00::a"),)
    assert c.parse_dns_servers("--dns-servers", "") == ((), ())
    for bad in ("10.0.0", "fe80::1%eth0", "10.0.0.0/8", "dns.example"):
        with pytest.raises(ConfigError, match="--dns-servers"):
            c.parse_dns_servers("--dns-servers", bad)


def test_iptables_binary() -> None:
    assert c.parse_iptables_binary("--force-iptables-binary", "") is None
    assert c.parse_iptables_binary("--force-iptables-binary", "nft") == "nft"
    assert c.parse_iptables_binary("--force-iptables-binary", "legacy") == "legacy"
    with pytest.raises(ConfigError, match="legacy or nft"):
        c.parse_iptables_binary("--force-iptables-binary", "iptables")


def test_log_levels() -> None:
    assert options.parse_log_levels("--log_output_level", "default:info") == logging.INFO
    assert options.parse_log_levels("--log_output_level", "debug") == logging.DEBUG
    assert options.parse_log_levels("--log_output_level", "ads:debug,default:warn") == logging.WARNING
    assert options.parse_log_levels("--log_output_level", "none") > logging.CRITICAL
    for bad in ("verbose", "a:b:c", "default:"):
        with pytest.raises(ConfigError, match="--log_output_level"):
            options.parse_log_levels("--log_output_level", bad)


# --- the option table --------------------------------------------------------------------------

ISTIO_FLAGS = {
    # long name: (shorthand, environment variables, default)
    "envoy-port": ("p", (), "15001"),
    "inbound-capture-port": ("z", ("INBOUND_CAPTURE_PORT",), "15006"),
    "inbound-tunnel-port": ("e", ("INBOUND_TUNNEL_PORT",), "15008"),
    "proxy-uid": ("u", ("PROXY_UID",), ""),
    "proxy-gid": ("g", ("PROXY_GID",), ""),
    "istio-inbound-interception-mode": ("m", ("ISTIO_INBOUND_INTERCEPTION_MODE",), ""),
    "istio-inbound-ports": ("b", ("ISTIO_INBOUND_PORTS",), ""),
    "istio-local-exclude-ports": ("d", ("ISTIO_LOCAL_EXCLUDE_PORTS",), ""),
    "istio-exclude-interfaces": ("c", ("ISTIO_EXCLUDE_INTERFACES",), ""),
    "istio-service-cidr": ("i", ("ISTIO_SERVICE_CIDR",), ""),
    "istio-service-exclude-cidr": ("x", ("ISTIO_SERVICE_EXCLUDE_CIDR",), ""),
    "istio-outbound-ports": ("q", ("ISTIO_OUTBOUND_PORTS",), ""),
    "istio-local-outbound-ports-exclude": ("o", ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",), ""),
    "kube-virt-interfaces": ("k", ("KUBE_VIRT_INTERFACES",), ""),
    "istio-inbound-tproxy-mark": ("t", ("ISTIO_INBOUND_TPROXY_MARK",), "1337"),
    "istio-inbound-tproxy-route-table": ("r", ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",), "133"),
    "dry-run": ("n", ("DRY_RUN",), "false"),
    "iptables-probe-port": (None, ("IPTABLES_PROBE_PORT",), "15002"),
    "probe-timeout": (None, ("PROBE_TIMEOUT",), "5s"),
    "skip-rule-apply": (None, ("SKIP_RULE_APPLY",), "false"),
    "run-validation": (None, ("RUN_VALIDATION",), "false"),
    "redirect-dns": (None, ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"), "false"),
    "drop-invalid": (None, ("DROP_INVALID", "INVALID_DROP"), "false"),
    "dual-stack": (None, ("DUAL_STACK", "ISTIO_DUAL_STACK"), "false"),
    "capture-all-dns": (None, ("CAPTURE_ALL_DNS",), "false"),
    "network-namespace": (None, ("NETWORK_NAMESPACE",), ""),
    "cni-mode": (None, ("CNI_MODE",), "false"),
    "reconcile": (None, ("RECONCILE",), "false"),
    "cleanup-only": (None, ("CLEANUP_ONLY",), "false"),
    "force-apply": (None, ("FORCE_APPLY",), "false"),
    "native-nftables": (None, ("NATIVE_NFTABLES",), "false"),
    "force-iptables-binary": (None, ("FORCE_IPTABLES_BINARY",), ""),
}
APPLY_ONLY = {
    "iptables-probe-port", "probe-timeout", "skip-rule-apply", "run-validation", "network-namespace",
    "cni-mode", "reconcile", "cleanup-only", "force-apply", "force-iptables-binary",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ISTIO_FLAGS))
def test_istio_flag_definitions(name: str) -> None:
    short, env, default = ISTIO_FLAGS[name]
    o = options.BY_KEY[name]
    assert (o.short, o.env, o.default, o.ours) == (short, env, default, False)
    assert o.apply_only == (name in APPLY_ONLY)


def test_env_only_settings_and_additions() -> None:
    env_only = {o.env[0]: o.default for o in options.ENV_ONLY}
    assert env_only == {
        "ISTIO_OUTBOUND_OWNER_GROUPS": "*",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "",
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/32",
        "ENVOY_USER": "istio-proxy",
    }
    ours = {o.name: o.env for o in options.FLAGS if o.ours}
    assert ours == {
        "enable-ipv6": ("ENABLE_INBOUND_IPV6",),
        "dns-servers": ("DNS_SERVERS",),
        "resolv-conf": (),
        "explain": (),
        "live": (),
        "explain-format": (),
    }
    # Istio's logging flags: the sidecar injector passes them to istio-init.
    assert {"log_output_level", "log_as_json"} <= {o.name for o in options.FLAGS}
    shorts = [o.short for o in options.OPTIONS if o.short]
    assert len(shorts) == len(set(shorts)) and "h" not in shorts


def test_defaults_are_istios() -> None:
    cfg, opts = load()
    assert cfg == c.Config(enable_ipv6=False)
    assert opts == c.ApplyOptions()


# Each option: a valid value given as text, and where it lands.
EXPECT = {
    "envoy-port": ("15011", lambda cfg, o: cfg.proxy_port, 15011),
    "inbound-capture-port": ("15016", lambda cfg, o: cfg.inbound_capture_port, 15016),
    "inbound-tunnel-port": ("15018", lambda cfg, o: cfg.inbound_tunnel_port, 15018),
    "proxy-uid": ("3,4", lambda cfg, o: cfg.proxy_uids, ("3", "4")),
    "proxy-gid": ("1,2", lambda cfg, o: cfg.proxy_gids, ("1", "2")),
    "istio-inbound-interception-mode": ("TPROXY", lambda cfg, o: cfg.interception_mode, InterceptionMode.TPROXY),
    "istio-inbound-ports": ("80,443", lambda cfg, o: cfg.inbound_ports, PortSpec(ports=(80, 443))),
    "istio-local-exclude-ports": ("15090,", lambda cfg, o: cfg.inbound_ports_exclude, (15090,)),
    "istio-exclude-interfaces": ("eth1", lambda cfg, o: cfg.exclude_interfaces, ("eth1",)),
    "istio-service-cidr": ("*", lambda cfg, o: cfg.outbound_ip_ranges_include, CidrSpec(wildcard=True)),
    "istio-service-exclude-cidr": ("1.1.0.0/16", lambda cfg, o: cfg.outbound_ip_ranges_exclude, (net("1.1.0.0/16"),)),
    "istio-outbound-ports": ("32000,31000", lambda cfg, o: cfg.outbound_ports_include, (32000, 31000)),
    "istio-local-outbound-ports-exclude": ("22", lambda cfg, o: cfg.outbound_ports_exclude, (22,)),
    "kube-virt-interfaces": ("eth1,eth2", lambda cfg, o: cfg.kube_virt_interfaces, ("eth1", "eth2")),
    "istio-inbound-tproxy-mark": ("1338", lambda cfg, o: cfg.tproxy_mark, 1338),
    "istio-inbound-tproxy-route-table": ("134", lambda cfg, o: cfg.tproxy_route_table, 134),
    "dry-run": ("true", lambda cfg, o: o.dry_run, True),
    "iptables-probe-port": ("15003", lambda cfg, o: o.iptables_probe_port, 15003),
    "probe-timeout": ("2s", lambda cfg, o: o.probe_timeout, 2.0),
    "skip-rule-apply": ("true", lambda cfg, o: o.skip_rule_apply, True),
    "run-validation": ("true", lambda cfg, o: o.run_validation, True),
    "redirect-dns": ("true", lambda cfg, o: cfg.redirect_dns, True),
    "drop-invalid": ("true", lambda cfg, o: cfg.drop_invalid, True),
    "dual-stack": ("true", lambda cfg, o: cfg.enable_ipv6, False),  # only steers detection
    "capture-all-dns": ("true", lambda cfg, o: cfg.capture_all_dns, True),
    "network-namespace": ("/var/run/netns/pod", lambda cfg, o: o.network_namespace, "/var/run/netns/pod"),
    "cni-mode": ("true", lambda cfg, o: o.cni_mode, True),
    "reconcile": ("true", lambda cfg, o: o.reconcile, True),
    "cleanup-only": ("true", lambda cfg, o: o.cleanup_only, True),
    "force-apply": ("true", lambda cfg, o: o.force_apply, True),
    "native-nftables": ("true", lambda cfg, o: o.native_nftables, True),
    "force-iptables-binary": ("nft", lambda cfg, o: o.force_iptables_binary, "nft"),
    "enable-ipv6": ("true", lambda cfg, o: cfg.enable_ipv6, True),
    "dns-servers": ("8.8.8.8", lambda cfg, o: cfg.dns_servers_v4, ()),  # only with --redirect-dns
    "resolv-conf": ("/tmp/resolv", lambda cfg, o: cfg.dns_servers_v4, ()),
    "explain": ("in tcp 1.1.1.1:1 -> 10.0.0.5:80", lambda cfg, o: o.explain, "in tcp 1.1.1.1:1 -> 10.0.0.5:80"),
    "live": ("true", lambda cfg, o: o.explain_live, True),
    "explain-format": ("json", lambda cfg, o: o.explain_format, "json"),
    "log_output_level": ("debug", lambda cfg, o: o.dry_run, False),
    "log_as_json": ("true", lambda cfg, o: o.dry_run, False),
    "log_target": ("stderr", lambda cfg, o: o.dry_run, False),
    "log_caller": ("default", lambda cfg, o: o.dry_run, False),
    "log_stacktrace_level": ("none", lambda cfg, o: o.dry_run, False),
    "ISTIO_OUTBOUND_OWNER_GROUPS": ("java,202", lambda cfg, o: cfg.owner_groups, OwnerGroups(False, ("java", "202"))),
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": ("888", lambda cfg, o: cfg.owner_groups, OwnerGroups(True, ("888",))),
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": (
        "127.0.0.1/8", lambda cfg, o: cfg.host_ipv4_loopback_cidr, "127.0.0.0/8"
    ),
    "ENVOY_USER": ("envoy", lambda cfg, o: cfg.proxy_uids, ("1337",)),
}  # fmt: skip


def test_expectations_cover_every_option() -> None:
    assert set(EXPECT) == set(options.BY_KEY)


@pytest.mark.parametrize("key", sorted(k for k in EXPECT if options.BY_KEY[k].name))
def test_every_flag_from_the_command_line(key: str) -> None:
    text, get, want = EXPECT[key]
    cfg, opts = load({key: text})
    assert get(cfg, opts) == want


@pytest.mark.parametrize("key", sorted(k for k in EXPECT if options.BY_KEY[k].env))
def test_every_option_from_each_of_its_variables(key: str) -> None:
    text, get, want = EXPECT[key]
    for var in options.BY_KEY[key].env:
        cfg, opts = load(env={var: text})
        assert get(cfg, opts) == want, var


def test_command_line_wins_over_environment() -> None:
    cfg, opts = load(
        {"inbound-capture-port": "1000", "dry-run": "false"}, {"INBOUND_CAPTURE_PORT": "2000", "DRY_RUN": "1"}
    )
    assert cfg.inbound_capture_port == 1000 and opts.dry_run is False
    # An explicitly empty command-line value also wins.
    cfg, _ = load({"istio-inbound-ports": ""}, {"ISTIO_INBOUND_PORTS": "*"})
    assert cfg.inbound_ports == PortSpec()


def test_environment_wins_over_default_and_bad_env_is_named() -> None:
    cfg, _ = load(env={"ISTIO_INBOUND_PORTS": "*"})
    assert cfg.inbound_ports.wildcard
    e = error_of(env={"INBOUND_CAPTURE_PORT": "8o"})
    assert e.source == "INBOUND_CAPTURE_PORT"
    # A valid command-line value hides a bad variable, as in Istio.
    cfg, _ = load({"inbound-capture-port": "15006"}, {"INBOUND_CAPTURE_PORT": "8o"})
    assert cfg.inbound_capture_port == 15006


def test_additional_variable_wins_over_the_first() -> None:
    cfg, _ = load(env={"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"})
    assert cfg.redirect_dns
    cfg, _ = load(env={"DROP_INVALID": "true", "INVALID_DROP": "false"})
    assert not cfg.drop_invalid
    e = error_of(env={"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "maybe"})
    assert e.source == "ISTIO_META_DNS_CAPTURE"


def test_empty_boolean_variable_is_ignored() -> None:
    cfg, opts = load(env={"DRY_RUN": "", "INVALID_DROP": " ", "DROP_INVALID": "true"})
    assert opts.dry_run is False and cfg.drop_invalid is True


def test_errors_name_the_option_and_value() -> None:
    e = error_of({"envoy-port": "8o"})
    assert (e.source, e.value) == ("--envoy-port", "8o")
    assert str(e).startswith("invalid value '8o' for --envoy-port:")
    e = error_of(env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "::1/128"})
    assert e.source == "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" and "IPv6" in e.reason


def test_first_error_in_table_order() -> None:
    e = error_of({"istio-inbound-ports": "x", "envoy-port": "0"})
    assert e.source == "--envoy-port"


def test_empty_uid_list_is_rejected() -> None:
    assert error_of({"proxy-uid": ","}).source == "--proxy-uid"


def test_proxy_uid_from_envoy_user() -> None:
    m = FakeMachine(uids={"istio-proxy": "1234", "envoy": "101"})
    cfg, _ = load(machine=m)
    assert cfg.proxy_uids == ("1234",) and cfg.proxy_gids == ("1234",)
    assert ("user", "istio-proxy") in m.calls
    cfg, _ = load(env={"ENVOY_USER": "envoy"}, machine=m)
    assert cfg.proxy_uids == ("101",)
    cfg, _ = load(env={"ENVOY_USER": "nobody-here"}, machine=m)
    assert cfg.proxy_uids == ("1337",)
    # An empty value means "not given", as in Istio.
    cfg, _ = load({"proxy-uid": ""}, {"PROXY_UID": "5"}, machine=m)
    assert cfg.proxy_uids == ("1234",)
    # Given uids: no lookup at all.
    m2 = FakeMachine()
    cfg, _ = load({"proxy-uid": "7"}, machine=m2)
    assert not [call for call in m2.calls if call[0] == "user"]


def test_proxy_gid_defaults_to_the_uid_list() -> None:
    cfg, _ = load({"proxy-uid": "3,4"})
    assert cfg.proxy_gids == ("3", "4")
    cfg, _ = load({"proxy-uid": "3,4", "proxy-gid": "1,2"})
    assert cfg.proxy_gids == ("1", "2")


def test_group_names_are_not_looked_up() -> None:
    m = FakeMachine()
    cfg, _ = load(env={"ISTIO_OUTBOUND_OWNER_GROUPS": "java,no-such-group"}, machine=m)
    assert cfg.owner_groups.values == ("java", "no-such-group")
    assert [call for call in m.calls if call[0] == "user"] == [("user", "istio-proxy")]


def test_ipv6_detection() -> None:
    v4 = FakeMachine()
    assert load(machine=v4)[0].enable_ipv6 is False
    v6only = FakeMachine(addresses=[ip("127.0.0.1"), ip("::1"), ip("fe80::2"), ip("fd00::5")])
    assert load(machine=v6only)[0].enable_ipv6 is True
    dual = FakeMachine(addresses=[ip("10.1.0.5"), ip("fd00::5")])
    assert load(machine=dual)[0].enable_ipv6 is False
    assert load({"dual-stack": "true"}, machine=dual)[0].enable_ipv6 is True
    assert load(env={"ISTIO_DUAL_STACK": "true"}, machine=dual)[0].enable_ipv6 is True
    nothing = FakeMachine(addresses=[ip("127.0.0.1"), ip("::1")])
    with pytest.raises(DetectionError, match="no valid local IP"):
        load(machine=nothing)


def test_ipv6_override_skips_detection() -> None:
    m = FakeMachine(addresses=[])
    cfg, _ = load({"enable-ipv6": "true"}, machine=m)
    assert cfg.enable_ipv6 and not [call for call in m.calls if call[0] == "addresses"]
    cfg, _ = load(env={"ENABLE_INBOUND_IPV6": "false"}, machine=m)
    assert not cfg.enable_ipv6


def test_ipv6_detected_inside_the_network_namespace() -> None:
    m = FakeMachine()
    load({"network-namespace": "/var/run/netns/pod"}, machine=m)
    assert ("addresses", "/var/run/netns/pod") in m.calls


def test_dns_servers_from_resolv_conf_only_when_needed() -> None:
    m = FakeMachine()
    cfg, _ = load(machine=m)
    assert (cfg.dns_servers_v4, cfg.dns_servers_v6) == ((), ())
    assert not [call for call in m.calls if call[0] == "resolv"]
    cfg, _ = load({"redirect-dns": "true", "capture-all-dns": "true"}, machine=m)
    assert (cfg.dns_servers_v4, cfg.dns_servers_v6) == ((), ())
    assert not [call for call in m.calls if call[0] == "resolv"]
    cfg, _ = load({"redirect-dns": "true"}, machine=m)
    assert cfg.dns_servers_v4 == (ip("10.96.0.10"),) and cfg.dns_servers_v6 == (ip("fd00::10"),)
    assert ("resolv", "/etc/resolv.conf") in m.calls
    load({"redirect-dns": "true", "resolv-conf": "/tmp/r.conf"}, machine=m)
    assert ("resolv", "/tmp/r.conf") in m.calls


def test_explicit_dns_servers_replace_resolv_conf() -> None:
    m = FakeMachine()
    cfg, _ = load({"redirect-dns": "true", "dns-servers": "1.1.1.1,2606:4700::1111"}, machine=m)
    assert cfg.dns_servers_v4 == (ip("1.1.1.1"),) and cfg.dns_servers_v6 == (ip("2606:4700::1111"),)
    cfg, _ = load({"redirect-dns": "true", "dns-servers": ""}, machine=m)
    assert (cfg.dns_servers_v4, cfg.dns_servers_v6) == ((), ())
    cfg, _ = load({"redirect-dns": "true"}, {"DNS_SERVERS": "9.9.9.9"}, machine=m)
    assert cfg.dns_servers_v4 == (ip("9.9.9.9"),)
    assert not [call for call in m.calls if call[0] == "resolv"]


def test_missing_resolv_conf_is_an_error() -> None:
    with pytest.raises(DetectionError, match="failed to load /etc/resolv.conf"):
        load({"redirect-dns": "true"}, machine=FakeMachine(resolv=None))


def test_bad_input_never_reaches_the_machine() -> None:
    m = FakeMachine()
    with pytest.raises(ConfigError):
        options.load({"envoy-port": "0", "redirect-dns": "true"}, {}, m)
    assert m.calls == []


def test_unknown_option_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        options.load({"no-such-option": "1"}, {}, FakeMachine())


# --- environment.py ----------------------------------------------------------------------------


def test_detect_ipv6_skips_loopback_link_local_and_unwraps_mapped() -> None:
    skip = [ip("127.0.0.5"), ip("169.254.1.1"), ip("224.0.0.251"), ip("::1"), ip("fe80::9"), ip("ff02::1")]
    assert detect_ipv6([*skip, ip("fd00::1")], dual_stack=False) is True
    assert detect_ipv6([*skip, ip("::ffff:10.0.0.1"), ip("fd00::1")], dual_stack=False) is False
    assert detect_ipv6([ip("10.0.0.1"), ip("fd00::1")], dual_stack=True) is True
    assert detect_ipv6([ip("10.0.0.1"), ip("10.0.0.2")], dual_stack=True) is False
    with pytest.raises(DetectionError):
        detect_ipv6(skip, dual_stack=True)


def _by_ip_json(ns: NetNS | None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """What ``ip -j addr show`` lists in ``ns`` (here for None): every address, IPv4 ones first."""
    argv = ["ip", "-j", "addr", "show"]
    out = (
        ns.run(argv).stdout if ns else subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    )
    links = json.loads(out)
    found = [ip(a["local"]) for link in links for a in link.get("addr_info", [])]
    return [a for a in found if a.version == 4] + [a for a in found if a.version == 6]


@pytest.mark.kernel
def test_real_machine_reads_the_namespace_addresses_from_the_kernel(netns: Callable[..., NetNS]) -> None:
    pod, peer = netns("pod"), netns("peer")
    veth_pair(
        pod,
        peer,
        addrs_a=["10.1.0.5/24", "fd00:1::5/64", "10.2.0.5/16"],
        addrs_b=["10.1.0.6/24", "fd00:1::6/64"],
    )
    add_addresses(pod, "lo", ["127.0.0.6/8", "::6/128"])
    got = RealMachine().local_addresses(pod.path)
    assert got == _by_ip_json(pod)
    assert {ip("10.1.0.5"), ip("10.2.0.5"), ip("fd00:1::5"), ip("::6"), ip("127.0.0.6")} <= set(got)
    assert [a.version for a in got] == sorted(a.version for a in got)
    assert detect_ipv6(got, dual_stack=False) is False and detect_ipv6(got, dual_stack=True) is True
    # This thread is back in its own namespace.
    assert RealMachine().local_addresses(None) == _by_ip_json(None)


@pytest.mark.kernel
def test_real_machine_names_a_namespace_it_cannot_enter(tmp_path: Path) -> None:
    with pytest.raises(DetectionError, match="cannot list local addresses: .*No such file"):
        RealMachine().local_addresses(str(tmp_path / "gone"))


def test_resolv_conf_parsing() -> None:
    text = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\n;nameserver 1.1.1.1\nnameserver  fd00::10 extra\nnameserver\n"
    assert nameservers_from_resolv_conf(text) == ["10.96.0.10", "fd00::10"]
    v4, v6 = split_nameservers(["10.96.0.10", "bogus", "fe80::1%eth0", "::ffff:1.2.3.4", "1.2.3.4%eth0"])
    assert v4 == (ip("10.96.0.10"),)
    assert v6 == (ip("fe80::1"), ip("::ffff:1.2.3.4"))


def test_real_machine_user_lookup() -> None:
    m = RealMachine()
    assert m.user_uid("root") == "0"
    assert m.user_uid("no-such-user-here") is None
    assert m.user_uid("bad\0name") is None


# --- docs/options.md ---------------------------------------------------------------------------


def test_options_doc_table_is_generated_from_the_definitions() -> None:
    doc = ROOT / "docs" / "options.md"
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-options-doc"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-options-doc")], capture_output=True, text=True
    )
    assert out.stdout == options.markdown_table()
    assert out.stdout in doc.read_text()
