"""``istio-cni`` ADD for pods that are captured, into fresh network namespaces: the kernel holds
exactly the rules Istio's CNI cases expect (compared with ../shared/conformance/compare.py),
in every spec version, chained and standalone, and a refused pod gets nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cni.protocol import SUPPORTED_VERSIONS
from tests.support.apiserver import KubeAPIServer
from tests.support.conformance import CONFORMANCE
from tests.support.kubeconfig import write_kubeconfig
from tests.support.netns import NetNS, flocked, veth_pair
from tests.support.pki import Pki
from tests.support.plugin import PluginRun, cni_env, k8s_args, netconf, prev_result, run_plugin
from tests.support.pods import meshed_pod, pod_from_case

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
CNI_CASES = json.loads((CONFORMANCE / "cni_cases.json").read_text())
TOKEN = "kernel-test-token"
NS = "shop"


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory, api: KubeAPIServer, pki: Pki) -> Path:
    # certificate-authority-data and a token file, as Istio's installer writes them.
    d = tmp_path_factory.mktemp("kc")
    (d / "token").write_text(TOKEN + "\n")
    return write_kubeconfig(
        d / "ZZZ-istio-cni-kubeconfig", api.url, ca_data=pki.ca_cert, token_file=d / "token"
    )


def save(ns: NetNS, tool: str = "iptables-save") -> str:
    return ns.run([tool]).stdout


def istio_lines(ns: NetNS, tool: str = "iptables-save") -> list[str]:
    return [line for line in save(ns, tool).splitlines() if "ISTIO" in line]


def add(exe: Path, ns: NetNS, conf: dict[str, Any], namespace: str, name: str) -> PluginRun:
    return run_plugin(exe, "ADD", conf, netns=ns.path, args=k8s_args(namespace, name))


@pytest.mark.parametrize("case", CNI_CASES, ids=[c["name"] for c in CNI_CASES])
def test_cni_case_installs_istios_rules(
    case: dict[str, Any],
    exe: Path,
    kubeconfig: Path,
    api: KubeAPIServer,
    netns: Callable[..., NetNS],
    tmp_path: Path,
) -> None:
    pod = case["pod"]
    api.add_pod(pod_from_case(pod))
    ns = netns("cni-case")
    prev = prev_result("1.0.0", netns=ns.path)
    run = add(exe, ns, netconf(kubeconfig, prev_result=prev), pod["namespace"], pod["name"])
    assert run.code == 0, f"{run.stdout}\n{run.stderr}"
    assert json.loads(run.stdout) == prev
    actual = tmp_path / "actual.rules"
    actual.write_text("# iptables-restore\n" + save(ns))
    r = subprocess.run(
        [sys.executable, str(CONFORMANCE / "compare.py"), str(CONFORMANCE / case["expected"]["v4"])]
        + ["--actual-file", str(actual)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert not istio_lines(ns, "ip6tables-save")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_meshed_pod_in_every_version(
    version: str, exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    name = f"web-{version.replace('.', '-')}"
    api.add_pod(meshed_pod(name, NS))
    ns = netns("ver")
    prev = prev_result(version, netns=ns.path)
    run = add(exe, ns, netconf(kubeconfig, version=version, prev_result=prev), NS, name)
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout) == prev
    assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_lines(ns)
    assert f"installed REDIRECT capture rules (IPv4) in {ns.path}" in run.stderr


def test_standalone_reads_addresses_from_the_namespace(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    # Multus: no prevResult. The pod already has its IPv6-only primary interface.
    api.add_pod(meshed_pod("multus-v6", NS))
    pod, peer = netns("pod6"), netns("peer6")
    veth_pair(pod, peer, addrs_a=["fd00:10:244::5/64"], addrs_b=["fd00:10:244::1/64"])
    run = add(exe, pod, netconf(kubeconfig, version="0.3.1"), NS, "multus-v6")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout) == {"cniVersion": "0.3.1", "dns": {}}
    assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_lines(pod, "ip6tables-save")
    assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_lines(pod)


def test_family_order_is_gos_ipv4_first_whatever_came_first(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    # The decision, stated: without ISTIO_DUAL_STACK Istio's plugin takes the family of the first
    # address Go's net.InterfaceAddrs lists, and the kernel's dump lists every IPv4 address before
    # any IPv6 one. So a pod with both gets IPv4 rules, even when its IPv6 address came first, on
    # a lower interface, and prevResult lists it first.
    api.add_pod(meshed_pod("v6-first", NS))
    pod, peer, peer2 = netns("first6"), netns("peer6a"), netns("peer6b")
    veth_pair(pod, peer, addrs_a=["fd00:10:244::7/64"], addrs_b=["fd00:10:244::1/64"], ifname_a="eth0")
    veth_pair(pod, peer2, addrs_a=["10.244.9.7/24"], addrs_b=["10.244.9.1/24"], ifname_a="eth1")
    links = {link["ifname"]: link["ifindex"] for link in json.loads(pod.run(["ip", "-j", "link"]).stdout)}
    assert links["eth0"] < links["eth1"], "the IPv6 address is on the lower interface"

    standalone = add(exe, pod, netconf(kubeconfig, version="1.0.0"), NS, "v6-first")
    assert standalone.code == 0, standalone.stderr
    assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_lines(pod)
    assert not istio_lines(pod, "ip6tables-save"), "an IPv4 address decides without dual stack"
    assert "installed REDIRECT capture rules (IPv4)" in standalone.stderr

    ns = netns("prev6")
    prev = prev_result("1.0.0", netns=ns.path)
    prev["ips"].insert(0, {"interface": 2, "address": "fd00:10:244::8/64"})
    chained = add(exe, ns, netconf(kubeconfig, version="1.0.0", prev_result=prev), NS, "v6-first")
    assert chained.code == 0, chained.stderr
    assert istio_lines(ns) and not istio_lines(ns, "ip6tables-save")


def test_dual_stack_pod_gets_both_families(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("dual", NS, proxy_env={"ISTIO_DUAL_STACK": "true"}))
    ns = netns("dual")
    prev = prev_result("1.1.0", netns=ns.path)
    prev["ips"].append({"interface": 2, "address": "fd00:10:244::5/64"})
    run = add(exe, ns, netconf(kubeconfig, version="1.1.0", prev_result=prev), NS, "dual")
    assert run.code == 0, run.stderr
    assert istio_lines(ns) and istio_lines(ns, "ip6tables-save")


def test_tproxy_pod_gets_its_policy_route(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("tp", NS, annotations={"sidecar.istio.io/interceptionMode": "TPROXY"}))
    ns = netns("tproxy")
    run = add(exe, ns, netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path)), NS, "tp")
    assert run.code == 0, run.stderr
    assert any("TPROXY --on-port 15006" in line for line in istio_lines(ns))
    assert "fwmark 0x539 lookup 133" in ns.run(["ip", "rule"]).stdout
    assert "local default dev lo" in ns.run(["ip", "route", "show", "table", "133"]).stdout


def test_bad_annotation_installs_nothing(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    bad = {
        "istio.io/reroute-virtual-interfaces": "eth0 -j ACCEPT",
        "traffic.sidecar.istio.io/includeInboundPorts": "80",
    }
    api.add_pod(meshed_pod("bad", NS, annotations=bad))
    ns = netns("bad")
    before = (save(ns), save(ns, "ip6tables-save"))
    run = add(exe, ns, netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path)), NS, "bad")
    doc = json.loads(run.stdout)
    assert run.code == 1 and doc["code"] == 999
    assert "istio.io/reroute-virtual-interfaces" in doc["msg"] and "'eth0 -j ACCEPT'" in doc["msg"]
    assert (save(ns), save(ns, "ip6tables-save")) == before
    assert not istio_lines(ns)


def test_readd_is_idempotent_and_converges_on_changed_annotations(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    ns = netns("readd")
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path))
    api.add_pod(meshed_pod("readd", NS))
    assert add(exe, ns, conf, NS, "readd").code == 0
    first = istio_lines(ns)
    assert add(exe, ns, conf, NS, "readd").code == 0
    assert istio_lines(ns) == first
    # A network reload re-runs ADD in the same namespace; the pod changed meanwhile.
    api.add_pod(
        meshed_pod("readd", NS, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})
    )
    run = add(exe, ns, conf, NS, "readd")
    assert run.code == 0, run.stderr
    now = istio_lines(ns)
    assert "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in now
    assert not any("--dport 15020 -j RETURN" in line and "ISTIO_OUTPUT" in line for line in now)


def test_del_with_and_without_the_namespace(exe: Path, kubeconfig: Path, netns: Callable[..., NetNS]) -> None:
    ns = netns("del")
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path))
    run = run_plugin(exe, "DEL", conf, netns=ns.path, args=k8s_args(NS, "gone"))
    assert (run.code, run.stdout) == (0, "")
    path = ns.path
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    run = run_plugin(exe, "DEL", conf, netns=path, args=k8s_args(NS, "gone"))
    assert (run.code, run.stdout) == (0, "")


def test_pass_through_pod_gets_nothing(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("plain", NS, init_containers=("istio-init",)))
    ns = netns("plain")
    pod_peer = netns("plainpeer")
    veth_pair(ns, pod_peer, addrs_a=["10.9.0.2/24"], addrs_b=["10.9.0.1/24"])
    run = add(exe, ns, netconf(kubeconfig), NS, "plain")
    assert run.code == 0, run.stderr
    assert not istio_lines(ns) and not istio_lines(ns, "ip6tables-save")


def test_standalone_without_any_address_plans_ipv4(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("bare", NS))
    ns = netns("bare")  # only lo
    run = add(exe, ns, netconf(kubeconfig, version="1.1.0"), NS, "bare")
    assert run.code == 0, run.stderr
    assert "the pod has no address yet; planning IPv4 rules only" in run.stderr
    assert istio_lines(ns) and not istio_lines(ns, "ip6tables-save")


def test_applier_records_reach_the_plugin_log_file(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS], tmp_path: Path
) -> None:
    api.add_pod(meshed_pod("logged", NS))
    ns = netns("log")
    log = tmp_path / "plugin.log"
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path), log_file=str(log))
    run = add(exe, ns, conf, NS, "logged")
    assert run.code == 0, run.stderr
    text = log.read_text()
    # The applier's backend choice, logged through the plugin's own logger.
    assert "IPv4: using iptables-nft" in text, text
    assert "IPv4: using iptables-nft" in run.stderr
    assert run.stdout.count("\n") <= 1 and "using" not in run.stdout


# --- races, swaps and busy namespaces --------------------------------------------------------------


def test_two_adds_into_one_namespace_at_once_both_succeed_with_every_rule(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("twice", NS))
    expected: list[str] | None = None
    for _ in range(8):
        ns = netns("twice")
        conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path))
        env = plugin_env(ns.path, k8s_args(NS, "twice"))
        procs = [start_plugin(exe, env, conf) for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        lines = istio_lines(ns)
        if expected is None:
            solo = netns("solo")
            assert (
                add(exe, solo, conf | {"prevResult": prev_result("1.0.0", netns=solo.path)}, NS, "twice").code
                == 0
            )
            expected = istio_lines(solo)
        assert lines == expected


def test_add_and_del_at_once_end_defined(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS]
) -> None:
    api.add_pod(meshed_pod("adddel", NS))
    for _ in range(5):
        ns = netns("adddel")
        conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path))
        env = plugin_env(ns.path, k8s_args(NS, "adddel"))
        adding = start_plugin(exe, env, conf)
        deleting = start_plugin(exe, {**env, "CNI_COMMAND": "DEL"}, conf)
        for p in (adding, deleting):
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        # DEL leaves the rules to die with the namespace: the ADD's rules are all there.
        assert "-A OUTPUT -j ISTIO_OUTPUT" in istio_lines(ns)


def test_namespace_path_switched_while_the_pod_is_read_gets_nothing(
    exe: Path, kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS], tmp_path: Path
) -> None:
    api.add_pod(meshed_pod("swapped", NS))
    pod, other = netns("pod"), netns("other")
    link = tmp_path / "netns"
    link.symlink_to(pod.path)
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=str(link)))
    seen = len(api.requests)
    api.fail_next(3)  # the plugin retries for a moment: the path is switched meanwhile
    p = start_plugin(exe, plugin_env(str(link), k8s_args(NS, "swapped")), conf)
    deadline = time.monotonic() + 30
    while len(api.requests) == seen:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.005)
    tmp = tmp_path / "netns.new"
    tmp.symlink_to(other.path)
    tmp.rename(link)
    out, err = p.communicate(timeout=120)
    assert not istio_lines(other) and not istio_lines(other, "ip6tables-save"), (
        "rules went to the swapped-in namespace"
    )
    # The rules are in the namespace the plugin opened; the path no longer names it, so the ADD
    # fails as for a namespace deleted meanwhile (the runtime tears the pod down).
    assert istio_lines(pod)
    assert p.returncode == 1 and json.loads(out)["code"] == 3, out


def test_pod_namespace_held_past_the_wait_is_try_again_later(
    kubeconfig: Path, api: KubeAPIServer, netns: Callable[..., NetNS], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from cni import plugin
    from istio_iptables import logsink

    monkeypatch.setattr(plugin, "LOCK_WAIT", 1)
    api.add_pod(meshed_pod("busy", NS))
    ns = netns("busy")
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0", netns=ns.path))
    out, err = io.StringIO(), io.StringIO()
    previous = logsink.get_sink()
    try:
        with flocked(ns.path):  # another apply, or Istio's own xtables lock for this pod
            code = plugin.run(
                plugin_env(ns.path, k8s_args(NS, "busy")), io.BytesIO(json.dumps(conf).encode()), out, err
            )
    finally:
        logsink.set_sink(previous)
    doc = json.loads(out.getvalue())
    assert code == 1 and doc["code"] == 11, doc
    assert "try again later" in doc["details"]
    assert not istio_lines(ns)


def plugin_env(netns_path: str, args: str) -> dict[str, str]:
    import os

    return {
        **cni_env("ADD", netns=netns_path, args=args),
        # A runtime passes no PYTHONPATH; one given to the suite points the plugin at that code.
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }


def start_plugin(exe: Path, env: dict[str, str], conf: dict[str, Any]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    assert p.stdin is not None
    p.stdin.write(json.dumps(conf))
    p.stdin.close()
    p.stdin = None  # communicate() must not touch it again
    return p


# --- native nftables ------------------------------------------------------------------------------


def cli_args(cfg: Any) -> tuple[list[str], dict[str, str]]:
    """istio-iptables options (and environment) that give exactly ``cfg`` (a Config)."""
    from istio_iptables.config import InterceptionMode

    def joined(values: Any) -> str:
        return ",".join(str(v) for v in values)

    inbound = "*" if cfg.inbound_ports.wildcard else joined(cfg.inbound_ports.ports)
    include = "*" if cfg.outbound_ip_ranges_include.wildcard else joined(cfg.outbound_ip_ranges_include.cidrs)
    args = [
        f"--envoy-port={cfg.proxy_port}",
        f"--inbound-capture-port={cfg.inbound_capture_port}",
        f"--inbound-tunnel-port={cfg.inbound_tunnel_port}",
        f"--proxy-uid={joined(cfg.proxy_uids)}",
        f"--proxy-gid={joined(cfg.proxy_gids)}",
        f"--istio-inbound-interception-mode={'TPROXY' if cfg.interception_mode is InterceptionMode.TPROXY else 'REDIRECT'}",
        f"--istio-inbound-ports={inbound}",
        f"--istio-local-exclude-ports={joined(cfg.inbound_ports_exclude)}",
        f"--istio-exclude-interfaces={joined(cfg.exclude_interfaces)}",
        f"--istio-service-cidr={include}",
        f"--istio-service-exclude-cidr={joined(cfg.outbound_ip_ranges_exclude)}",
        f"--istio-outbound-ports={joined(cfg.outbound_ports_include)}",
        f"--istio-local-outbound-ports-exclude={joined(cfg.outbound_ports_exclude)}",
        f"--kube-virt-interfaces={joined(cfg.kube_virt_interfaces)}",
        f"--istio-inbound-tproxy-mark={cfg.tproxy_mark}",
        f"--istio-inbound-tproxy-route-table={cfg.tproxy_route_table}",
        f"--redirect-dns={str(cfg.redirect_dns).lower()}",
        f"--capture-all-dns={str(cfg.capture_all_dns).lower()}",
        f"--dns-servers={joined([*cfg.dns_servers_v4, *cfg.dns_servers_v6])}",
        f"--drop-invalid={str(cfg.drop_invalid).lower()}",
        "--enable-ipv6" if cfg.enable_ipv6 else "--no-enable-ipv6",
    ]
    groups = cfg.owner_groups
    env = {
        "ISTIO_OUTBOUND_OWNER_GROUPS": "*" if groups.except_ else joined(groups.values),
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": joined(groups.values) if groups.except_ else "",
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": cfg.host_ipv4_loopback_cidr,
    }
    return args, env


def nft_ruleset(ns: NetNS) -> list[str]:
    """Our nftables tables as nft prints them, counters zeroed."""
    import re

    out = ns.run(["nft", "list", "ruleset"]).stdout
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", ln) for ln in out.splitlines()]


@pytest.mark.parametrize("case", CNI_CASES, ids=[c["name"] for c in CNI_CASES])
def test_cni_case_with_native_nftables_installs_what_istio_iptables_does(
    case: dict[str, Any],
    exe: Path,
    kubeconfig: Path,
    api: KubeAPIServer,
    netns: Callable[..., NetNS],
    venv_bin: Path,
    tmp_path: Path,
) -> None:
    import ipaddress
    import os

    from cni.pod import build_config, pod_info

    pod = case["pod"]
    obj = pod_from_case(pod)
    api.add_pod(obj)
    ns = netns("cni-nft")
    prev = prev_result("1.0.0", netns=ns.path)
    run = add(
        exe, ns, netconf(kubeconfig, prev_result=prev, native_nftables=True), pod["namespace"], pod["name"]
    )
    assert run.code == 0, f"{run.stdout}\n{run.stderr}"
    assert "nftables" in run.stderr
    assert not istio_lines(ns) and not istio_lines(ns, "ip6tables-save"), "no iptables rules at all"
    plugin = nft_ruleset(ns)
    # The equivalent command line: the Config the plugin builds for this pod, as options. That
    # it is Istio's configuration for the case is shown by its iptables rules, which must be the
    # ones Istio's CNI case expects.
    args, env = cli_args(build_config(pod_info(obj), [ipaddress.ip_address("10.244.1.5")]).config)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
    dry = subprocess.run(
        [str(venv_bin / "istio-iptables"), *args, "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / "cli.rules").write_text(dry.stdout)
    r = subprocess.run(
        [sys.executable, str(CONFORMANCE / "compare.py"), str(CONFORMANCE / case["expected"]["v4"])]
        + ["--actual-file", str(tmp_path / "cli.rules")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, (
        f"the equivalent options are not Istio's configuration for the case:\n{r.stdout}"
    )
    other = netns("cli-nft")
    p = subprocess.run(
        [str(venv_bin / "istio-iptables"), *args, "--native-nftables", f"--network-namespace={other.path}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert "table inet istio-proxy-nat {" in plugin and plugin == nft_ruleset(other)
