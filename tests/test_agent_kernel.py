"""The agent's work inside real network namespaces: finding a pod's namespace by its IP (pinned
under a netns directory, and through /proc by a process inside it), telling whether our rules
are there in each backend, and repairing a running pod in place through the plugin's own ADD,
with the Pod read from the tests' HTTPS API server."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.agent import podns
from cni.agent.metrics import Metrics
from cni.agent.repair import RepairConfig, Repairer, repair_with_plugin
from cni.kube import Client, in_cluster
from cni.plugin import PluginConf
from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import write_kubeconfig
from tests.support.netns import NetNS
from tests.support.pki import Pki
from tests.support.pods import meshed_pod
from tests.support.topology import V4, apply_rules, has_istio_rules

pytestmark = pytest.mark.kernel

TOKEN = "agent-kernel-token"
NODE = "node-1"
CLASSIC = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--no-enable-ipv6",
]


def pod_ip() -> str:
    return f"10.253.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 2}"


def with_address(ns: NetNS, ip: str) -> None:
    """The pod's IP in its namespace (on lo: this kernel has no dummy links, and the finder
    reads every interface's addresses)."""
    ns.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])


@pytest.fixture
def api(pki: Pki) -> Iterator[KubeAPIServer]:
    with KubeAPIServer(pki, TOKEN) as server:
        yield server


def plugin_conf(api: KubeAPIServer, tmp_path: Path, native: bool) -> PluginConf:
    kc = write_kubeconfig(tmp_path / "kubeconfig", api.url, ca_file=api.pki.ca_cert, token=TOKEN)
    entry = {"type": "istio-cni", "native_nftables": native, "kubernetes": {"kubeconfig": str(kc)}}
    return PluginConf.parse(entry, "1.0.0")


def running(pod: dict[str, Any], ip: str) -> dict[str, Any]:
    pod["spec"]["nodeName"] = NODE
    pod["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return pod


def test_a_pinned_namespace_is_found_by_the_pods_ip(
    netns: Callable[..., NetNS], opened: Callable[[str], podns.Netns]
) -> None:
    ns, other = netns("pinned"), netns("other")
    ip = pod_ip()
    with_address(ns, ip)
    with_address(other, pod_ip())
    found = podns.find_pod_netns(ip, ("/var/run/netns",), "")
    assert found is not None
    try:
        assert (found.how, found.path) == ("pinned", ns.path)
        assert found.ns.identity() == opened(ns.path).identity()
    finally:
        found.ns.close()
    assert podns.find_pod_netns(pod_ip(), ("/var/run/netns",), "") is None


def test_without_a_pin_the_namespace_is_found_through_proc(
    netns: Callable[..., NetNS], opened: Callable[[str], podns.Netns]
) -> None:
    ns = netns("proc")
    ip = pod_ip()
    with_address(ns, ip)
    first = ns.popen(["sleep", "60"])
    time.sleep(0.05)
    second = ns.popen(["sleep", "60"])  # a second process in it: the namespace is looked at once
    try:
        found = podns.find_pod_netns(ip, (), "/proc")
        assert found is not None
        try:
            assert found.how == "proc"
            assert found.ns.identity() == opened(ns.path).identity()
            # The oldest process names it (the pause process of a sandbox outlives the others).
            pid = int(found.path.split("/")[2])
            assert pid != second.pid
        finally:
            found.ns.close()
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


@pytest.fixture
def opened() -> Iterator[Callable[[str], podns.Netns]]:
    held: list[podns.Netns] = []

    def open_(path: str) -> podns.Netns:
        ns = podns.open_netns(path)
        held.append(ns)
        return ns

    yield open_
    for ns in held:
        ns.close()


@pytest.mark.parametrize("backend", ["nft", "legacy", "nftables"])
def test_capture_rules_sees_ours_in_each_backend(
    netns: Callable[..., NetNS], opened: Callable[[str], podns.Netns], backend: str
) -> None:
    ns = netns("rules")
    assert podns.capture_rules(opened(ns.path)) == []
    # Someone else's rules are not ours.
    ns.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT"])
    assert podns.capture_rules(opened(ns.path)) == []
    apply_rules(ns, CLASSIC, backend)
    want = {"nft": ["iptables-nft IPv4"], "legacy": ["iptables-legacy IPv4"], "nftables": ["nftables"]}[
        backend
    ]
    assert podns.capture_rules(opened(ns.path)) == want


@pytest.mark.parametrize("native", [False, True], ids=["iptables", "nftables"])
def test_a_running_pod_without_rules_is_repaired_in_place_once(
    api: KubeAPIServer, netns: Callable[..., NetNS], tmp_path: Path, native: bool
) -> None:
    ns = netns("repair")
    ip = pod_ip()
    with_address(ns, ip)
    name = f"reviews-{secrets.token_hex(3)}"
    api.add_pod(running(meshed_pod(name, "default"), ip))
    pod = api.get_pod("default", name)
    assert pod is not None
    conf = plugin_conf(api, tmp_path, native)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    client = Client(lambda: in_cluster(api.url, str(api.pki.ca_cert), str(token)))
    metrics = Metrics()
    r = Repairer(
        RepairConfig(node=NODE, mode="repair", netns_dirs=("/var/run/netns",), host_proc="/proc"),
        client,
        lambda: conf,
        metrics=metrics,
    )
    assert r.reconcile(pod) == "repair"
    backend = "nftables" if native else "nft"
    assert has_istio_rules(ns, backend, V4)
    # The plugin's ADD read the Pod again, as it does for a pod start.
    assert ("GET", f"/api/v1/namespaces/default/pods/{name}", True) in api.requests
    (event,) = api.events
    assert event["reason"] == "RepairBrokenPod" and "running without the capture rules" in event["message"]
    assert metrics.repaired.labels(type="repair", result="success")._value.get() == 1
    assert r.reconcile(pod) is None, "never twice"
    # Another pod, in a namespace that holds our rules: checked once, nothing done.
    ok = netns("ok")
    ok_ip = pod_ip()
    with_address(ok, ok_ip)
    apply_rules(ok, CLASSIC, backend)
    api.add_pod(running(meshed_pod("fine", "default"), ok_ip))
    fine = api.get_pod("default", "fine")
    assert fine is not None and r.reconcile(fine) is None
    assert fine["metadata"]["uid"] in r.verified and len(api.events) == 1


def test_repair_in_place_leaves_a_pod_the_plugin_would_not_capture(
    api: KubeAPIServer, netns: Callable[..., NetNS], tmp_path: Path, opened: Callable[[str], podns.Netns]
) -> None:
    """The plugin's ADD decides again on the Pod it reads: opted out since, so nothing is installed."""
    ns = netns("optout")
    ip = pod_ip()
    with_address(ns, ip)
    api.add_pod(running(meshed_pod("optout", "default", labels={"sidecar.istio.io/inject": "false"}), ip))
    pod = api.get_pod("default", "optout")
    assert pod is not None
    repair = repair_with_plugin(lambda: plugin_conf(api, tmp_path, False))
    found = podns.find_pod_netns(ip, ("/var/run/netns",), "")
    assert found is not None
    try:
        repair(pod, found)
    finally:
        found.ns.close()
    assert podns.capture_rules(opened(ns.path)) == []
