"""install-cni's node agent end to end, through containerd's CRI as kubelet drives a node
(test_cri.py's node: install-cni as the DaemonSet's pod, its image, manifest and ConfigMap).

The tests' API server (tests/support/apiserver.py) is the Kubernetes API: the agent lists and
watches the node's pods there, and the service account's token may do only what the manifests'
RBAC grants (403 otherwise). Where kubelet would update a Pod's status, the tests do (phase
Running and the sandbox's IP, or a failed istio-validation init container). Proven here: a pod
started before the plugin was chained is repaired in place within 5 s of the agent seeing it
running and then captures real traffic; a Job-style pod (restartPolicy Never) is repaired too;
the delete and label modes act on the API with the variants' grants; the startup taint goes only
once the plugin is in place, and no other taint with it; a watch cut off mid-stream or answered
410 Gone misses no pod; the metrics are scraped from the pod's :15014."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from test_cri import (
    NODE_NAME,
    NS,
    ROOT,
    TOKEN,
    Node,
    Pod,
    assert_traffic_captured,
    granted,
    running_node,
    start_peer,
    start_sidecar_and_app,
)
from tests.support.apiserver import Call
from tests.support.metrics import scrape
from tests.support.pods import meshed_pod

pytestmark = [pytest.mark.cri, pytest.mark.kernel, pytest.mark.slow]

TAINT = "cni.istio.io/not-ready"
OTHER_TAINT = {"key": "example.com/dedicated", "value": "mesh", "effect": "NoSchedule"}
REPAIR_WITHIN = 5.0  # seconds from the pod's status saying Running to its rules being in place


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def node(project_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    patched_with_plugin: list[bool] = []

    def prepare(n: Node) -> None:
        # The node as it registers: our startup taint, and another that must stay.
        n.api.set_node_taints(NODE_NAME, [OTHER_TAINT, {"key": TAINT, "effect": "NoSchedule"}])
        conflist = n.containerd.network.conflist_path

        def on_call(call: Call) -> None:
            # When the Node is patched, is the plugin in the node's chain already?
            if call.method == "PATCH" and call.resource == "nodes":
                plugins = [p["type"] for p in json.loads(conflist.read_bytes())["plugins"]]
                patched_with_plugin.append("istio-cni" in plugins)

        n.api.on_call(on_call)
        n.patched_with_plugin = patched_with_plugin  # type: ignore[attr-defined]

    with running_node(project_images, tmp_path_factory.mktemp("cri-agent"), prepare) as n:
        yield n


@pytest.fixture(scope="module")
def peer(node: Node) -> Pod:
    return start_peer(node)


@pytest.fixture(scope="module")
def early(node: Node) -> dict[str, Pod]:
    """Pods whose sandboxes were created while install-cni was stopped (no plugin in the chain,
    so no rules): a Deployment-style pod and a Job's (restartPolicy Never)."""
    node.stop_installer()
    try:
        pods = {
            "app": node.run_pod(meshed_pod(f"early-{secrets.token_hex(3)}", NS)),
            "job": node.run_pod(meshed_pod(f"job-{secrets.token_hex(3)}", NS)),
        }
        for pod in pods.values():
            assert "ISTIO" not in pod.rules()
    finally:
        node.start_installer()
    return pods


def running(node: Node, pod: Pod, **spec: Any) -> float:
    """The Pod's status says Running with its sandbox's IP, as kubelet reports it; when."""
    patch: dict[str, Any] = {"status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}}
    if spec:
        patch["spec"] = spec
    node.api.update_pod(pod.namespace, pod.name, patch)
    return time.monotonic()


def metrics(node: Node) -> dict[str, float]:
    assert node.installer is not None
    return scrape(f"http://{node.installer.ip}:15014/metrics")


def agent_calls(node: Node, since: int = 0) -> list[Call]:
    return [c for c in node.api.calls[since:] if c.user_agent == "install-cni"]


def test_the_startup_taint_goes_once_the_plugin_is_in_place(node: Node) -> None:
    wait_for(
        lambda: TAINT not in [t["key"] for t in node.api.node(NODE_NAME)["spec"]["taints"]], 15, "the taint"
    )
    assert node.api.node(NODE_NAME)["spec"]["taints"] == [OTHER_TAINT]
    patched = node.patched_with_plugin  # type: ignore[attr-defined]
    assert patched and all(patched), "the Node was patched before istio-cni was in the chain"
    # The agent's list used the node's field selector; nothing it asked for was forbidden.
    calls = agent_calls(node)
    assert any(c.verb == "list" and "fieldSelector=spec.nodeName%3Dnode-1" in c.path for c in calls)
    assert not [c for c in calls if c.status == 403]


def test_a_pod_started_before_the_plugin_is_repaired_in_place_and_captures_traffic(
    node: Node, early: dict[str, Pod], peer: Pod
) -> None:
    pod = early["app"]
    start_sidecar_and_app(pod)
    before = metrics(node)
    seen = running(node, pod)
    wait_for(lambda: "ISTIO_OUTPUT" in pod.rules(), REPAIR_WITHIN, "the repair in place")
    took = time.monotonic() - seen
    assert took < REPAIR_WITHIN
    assert_traffic_captured(pod, peer)
    (event,) = [e for e in node.api.events if e["involvedObject"]["name"] == pod.name]
    assert (
        event["reason"] == "RepairBrokenPod" and event["involvedObject"]["uid"] == pod.obj["metadata"]["uid"]
    )
    assert "running without the capture rules" in event["message"]
    after = wait_for(
        lambda: (
            (m := metrics(node))['istio_cni_repair_pods_repaired_total{result="success",type="repair"}']
            > before['istio_cni_repair_pods_repaired_total{result="success",type="repair"}']
            and m
        ),
        5,
        "the repair's metric",
    )
    assert after['istio_cni_repair_pods_repaired_total{result="fail",type="repair"}'] == 0
    assert node.installer is not None
    log = node.installer.log("install-cni", node.installer_attempts - 1)
    assert f"pod {NS}/{pod.name} detected as broken (running without the capture rules" in log
    assert f"pod {NS}/{pod.name} repaired" in log
    # Never twice: more status updates change nothing.
    node.api.update_pod(pod.namespace, pod.name, {"metadata": {"labels": {"touched": "1"}}})
    time.sleep(1)
    assert len([e for e in node.api.events if e["involvedObject"]["name"] == pod.name]) == 1


def test_a_job_pod_that_never_restarts_is_repaired_too(node: Node, early: dict[str, Pod], peer: Pod) -> None:
    pod = early["job"]
    start_sidecar_and_app(pod)
    seen = running(node, pod, restartPolicy="Never")
    wait_for(lambda: "ISTIO_OUTPUT" in pod.rules(), REPAIR_WITHIN, "the repair of the Job's pod")
    assert time.monotonic() - seen < REPAIR_WITHIN
    assert_traffic_captured(pod, peer)


def test_plugin_calls_are_counted_on_the_nodes_metrics(node: Node) -> None:
    before = metrics(node)
    pod = node.run_pod(meshed_pod(f"counted-{secrets.token_hex(3)}", NS))
    pod.stop_and_remove()  # two DELs

    def delta(name: str) -> float:
        return metrics(node)[name] - before[name]

    wait_for(lambda: delta('istio_cni_plugin_dels_total{result="success"}') == 2, 5, "the DELs")
    assert delta('istio_cni_plugin_adds_total{result="success"}') == 1
    assert delta("istio_cni_plugin_add_duration_seconds_count") == 1
    m = metrics(node)
    assert m["istio_cni_install_ready"] == 1 and m['istio_cni_installs_total{result="SUCCESS"}'] == 1


def broken(name: str, **kw: Any) -> dict[str, Any]:
    """A meshed pod of this node whose istio-validation container failed with 126 (no sandbox:
    the delete and label modes act on the API only)."""
    pod = meshed_pod(name, NS, **kw)
    pod["status"] = {
        "phase": "Pending",
        "podIP": "10.255.255.1",
        "initContainerStatuses": [
            {
                "name": "istio-validation",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}},
                "restartCount": 2,
            }
        ],
    }
    return pod


@pytest.fixture
def mode(node: Node, request: pytest.FixtureRequest) -> Iterator[str]:
    """install-cni restarted with a deploy/kubernetes-repair-MODE variant: its ConfigMap patch and
    its extra grant; back to the base afterwards."""
    import yaml

    name: str = request.param
    variant = ROOT / "deploy" / f"kubernetes-repair-{name}"
    settings = yaml.safe_load((variant / "configmap-patch.yaml").read_text())["data"]
    node.api.grant(TOKEN, *granted(variant / "clusterrole.yaml"))
    node.stop_installer()
    node.start_installer(settings)
    try:
        yield name
    finally:
        node.api.grant(TOKEN, *granted())
        node.stop_installer()
        node.start_installer()


@pytest.mark.parametrize("mode", ["delete"], indirect=True)
def test_delete_mode_deletes_the_broken_pod_with_preconditions(node: Node, mode: str) -> None:
    name = f"broken-{secrets.token_hex(3)}"
    node.api.add_pod(broken(name))
    pod = node.api.get_pod(NS, name)
    assert pod is not None
    wait_for(lambda: node.api.get_pod(NS, name) is None, 10, "the delete")
    (delete,) = [c for c in agent_calls(node) if c.method == "DELETE" and name in c.path]
    assert delete.status == 200
    assert delete.body["preconditions"] == {
        "uid": pod["metadata"]["uid"],
        "resourceVersion": pod["metadata"]["resourceVersion"],
    }
    (event,) = [e for e in node.api.events if e["involvedObject"]["name"] == name]
    assert event["reason"] == "DeleteBrokenPod" and event["message"].endswith("deleted")


@pytest.mark.parametrize("mode", ["label"], indirect=True)
def test_label_mode_labels_and_a_broken_or_gone_watch_misses_no_pod(node: Node, mode: str) -> None:
    def labelled(name: str) -> bool:
        pod = node.api.get_pod(NS, name)
        return bool(pod and (pod["metadata"].get("labels") or {}).get("cni.istio.io/uninitialized") == "true")

    first = f"broken-{secrets.token_hex(3)}"
    node.api.add_pod(broken(first))
    wait_for(lambda: labelled(first), 10, "the label")
    (patch,) = [c for c in agent_calls(node) if c.method == "PATCH" and first in c.path]
    assert patch.resource == "pods/status" and patch.status == 200
    assert [e["reason"] for e in node.api.events if e["involvedObject"]["name"] == first] == [
        "LabelBrokenPod"
    ]
    # The server cuts every watch off mid-stream as the next pod arrives.
    watches = node.api.watches
    with node.api.state.lock:
        node.api.break_watches()
        second = f"broken-{secrets.token_hex(3)}"
        node.api.add_pod(broken(second))
    wait_for(lambda: labelled(second), 10, "the pod added while the watch was cut off")
    assert node.api.watches > watches
    # The history is compacted: the resumed watch gets 410 Gone, the agent lists again.
    for gone_as in ("event", "status"):
        lists = len([c for c in agent_calls(node) if c.verb == "list"])
        with node.api.state.lock:
            node.api.break_watches()
            third = f"broken-{secrets.token_hex(3)}"
            node.api.add_pod(broken(third))
            node.api.compact(gone_as=gone_as)
        wait_for(lambda name=third: labelled(name), 10, f"the pod added before a 410 ({gone_as})")
        assert len([c for c in agent_calls(node) if c.verb == "list"]) > lists
    # Pods of other nodes are never touched.
    far = broken(f"far-{secrets.token_hex(3)}")
    far["spec"]["nodeName"] = "node-2"
    node.api.add_pod(far)
    time.sleep(1)
    assert not labelled(far["metadata"]["name"])
    assert not [c for c in agent_calls(node) if c.status == 403]
