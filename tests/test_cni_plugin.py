"""``istio-cni`` driven as a runtime drives it (environment + stdin -> stdout + exit status), against
an HTTPS test API server: every command, every spec version, every pass-through decision and
every error. Pods that would be captured are in test_cni_kernel.py (they need a namespace)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from cni.protocol import SUPPORTED_VERSIONS
from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import write_kubeconfig
from tests.support.pki import Pki, make_pki
from tests.support.plugin import PluginRun, k8s_args, netconf, prev_result, run_plugin
from tests.support.pods import meshed_pod, pod_object

TOKEN = "t0k3n-for-istio-cni"
NS = "shop"


def one_json(run: PluginRun) -> Any:
    """stdout holds exactly one JSON document and nothing else."""
    doc = json.loads(run.stdout)
    assert run.stdout.strip() == json.dumps(doc, separators=(",", ":"))
    return doc


def ok(run: PluginRun) -> Any:
    assert run.code == 0, f"stdout={run.stdout} stderr={run.stderr}"
    return one_json(run) if run.stdout else None


def err(run: PluginRun, code: int) -> dict[str, Any]:
    assert run.code != 0, run.stderr
    doc = one_json(run)
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}
    assert doc["code"] == code, doc
    return doc


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**9}"


# --- VERSION and no command ----------------------------------------------------------------


def test_version(exe: Path) -> None:
    run = run_plugin(exe, "VERSION", b'{"cniVersion":"1.0.0"}', netns="dummy")
    assert ok(run) == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_version_with_empty_environment_and_stdin(exe: Path) -> None:
    run = run_plugin(exe, "VERSION", None, container_id="", ifname="", cni_path="")
    assert ok(run)["supportedVersions"] == list(SUPPORTED_VERSIONS)


def test_no_command_prints_about_on_stderr(exe: Path) -> None:
    run = run_plugin(exe, "", None)
    assert run.code == 0
    assert run.stdout == ""
    assert "CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in run.stderr


# --- ADD: pass-through answers -------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_chained_add_prints_prev_result_in_requested_version(
    exe: Path, kubeconfig: Path, sandbox: str, version: str
) -> None:
    prev = prev_result(version)
    run = run_plugin(exe, "ADD", netconf(kubeconfig, version=version, prev_result=prev), netns=sandbox)
    assert ok(run) == prev


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_standalone_add_prints_an_empty_result_with_the_version(
    exe: Path, kubeconfig: Path, sandbox: str, version: str
) -> None:
    run = run_plugin(exe, "ADD", netconf(kubeconfig, version=version), netns=sandbox)
    assert ok(run) == {"cniVersion": version, "dns": {}}


def test_prev_result_from_0_4_0_plugin_converted_for_1_0_0(exe: Path, kubeconfig: Path, sandbox: str) -> None:
    # A runtime hands over prevResult in the configuration's version; a 0.x-shaped one in a 1.0.0
    # configuration still comes back as 1.0.0.
    conf = netconf(kubeconfig, version="1.0.0", prev_result=prev_result("0.4.0"))
    out = ok(run_plugin(exe, "ADD", conf, netns=sandbox))
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"] == [{"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}]


def test_not_a_kubernetes_pod_does_not_touch_the_api(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer
) -> None:
    before = len(api.requests)
    for args in ("", "IgnoreUnknown=1;K8S_POD_NAME=only-a-name", "IgnoreUnknown=1;K8S_POD_NAMESPACE=only-ns"):
        run = run_plugin(
            exe, "ADD", netconf(kubeconfig, prev_result=prev_result("1.0.0")), netns=sandbox, args=args
        )
        assert ok(run) == prev_result("1.0.0")
        assert "not a Kubernetes pod" in run.stderr
    assert len(api.requests) == before


@pytest.mark.parametrize(
    "conf_extra",
    [{"exclude_namespaces": ["kube-system", NS]}, {"kubernetes": {"exclude_namespaces": [NS]}}],
    ids=["top-level", "under-kubernetes"],
)
def test_excluded_namespace_does_not_touch_the_api(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer, conf_extra: dict[str, Any]
) -> None:
    before = len(api.requests)
    conf = netconf(kubeconfig, prev_result=prev_result("1.0.0"), **conf_extra)
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0"))
    assert ok(run) == prev_result("1.0.0")
    assert "pod namespace excluded" in run.stderr
    assert len(api.requests) == before


# Each pod Istio's sidecar mode leaves alone, with the reason it logs.
PASS_THROUGH: dict[str, tuple[dict[str, Any], str]] = {
    "istio-init": (
        dict(init_containers=("istio-init",)),
        "excluded due to being already injected with istio-init container",
    ),
    "disable-envoy": (
        dict(proxy_env={"DISABLE_ENVOY": "true"}),
        "excluded due to DISABLE_ENVOY on istio-proxy",
    ),
    "no-istio-proxy": (
        dict(containers=("app", "other")),
        "excluded because it does not have istio-proxy container (have ['app', 'istio-validation', 'other'])",
    ),
    "router-proxy": (
        dict(proxy_args=("proxy", "router")),
        "excluded because it has proxy type router",
    ),
    "inject-label-false": (
        dict(labels={"sidecar.istio.io/inject": "false"}),
        "excluded due to inject-disabled annotation",
    ),
    "inject-annotation-false": (
        dict(annotations={"sidecar.istio.io/inject": "f"}),
        "excluded due to inject-disabled annotation",
    ),
    "label-wins-over-annotation": (
        dict(
            labels={"sidecar.istio.io/inject": "true"},
            annotations={"sidecar.istio.io/inject": "false"},
            status=None,
        ),
        "excluded due to not containing sidecar annotation",
    ),
    "no-status-annotation": (dict(status=None), "excluded due to not containing sidecar annotation"),
}


@pytest.mark.parametrize("case", list(PASS_THROUGH), ids=list(PASS_THROUGH))
def test_pods_istio_leaves_alone_pass_through(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer, case: str
) -> None:
    spec, reason = PASS_THROUGH[case]
    kw = dict(spec)
    name = unique(case)
    if "status" in kw and kw.pop("status") is None:
        pod = meshed_pod(name, NS, **kw)
        del pod["metadata"]["annotations"]["sidecar.istio.io/status"]
    else:
        pod = meshed_pod(name, NS, **kw)
    api.add_pod(pod)
    prev = prev_result("0.4.0")
    run = run_plugin(
        exe,
        "ADD",
        netconf(kubeconfig, version="0.4.0", prev_result=prev),
        netns=sandbox,
        args=k8s_args(NS, name),
    )
    assert ok(run) == prev
    assert f"{reason}, passing through" in run.stderr
    assert api.requests[-1] == ("GET", f"/api/v1/namespaces/{NS}/pods/{name}", True)


def test_unparsable_inject_value_and_disable_envoy_are_ignored_as_istio_does(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer
) -> None:
    # Neither "maybe" nor DISABLE_ENVOY="yes" parse as Go booleans: Istio goes on and captures.
    # Here the capture is attempted (and fails on the placeholder namespace), which shows the
    # decision; the kernel tests show the rules themselves.
    name = unique("unparsable")
    api.add_pod(
        meshed_pod(
            name, NS, annotations={"sidecar.istio.io/inject": "maybe"}, proxy_env={"DISABLE_ENVOY": "yes"}
        )
    )
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, args=k8s_args(NS, name))
    doc = err(run, 8)
    assert "failed to install the capture rules" in doc["msg"] and "not a namespace file" in doc["details"]


# --- ADD: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"not json", 6),
        (b'{"cniVersion":"1.0.0","type":"istio-cni"}', 7),
        (b'{"cniVersion":"1.0.0","name":"a b"}', 7),
        (b'{"cniVersion":"0.2.0","name":"n"}', 1),
        (b'{"cniVersion":"1.2.0","name":"n"}', 1),
        (b'{"name":"n"}', 1),
        (b'{"cniVersion":1,"name":"n"}', 6),
    ],
)
def test_bad_configuration(exe: Path, sandbox: str, stdin: bytes, code: int) -> None:
    doc = err(run_plugin(exe, "ADD", stdin, netns=sandbox), code)
    assert doc["cniVersion"] == "1.1.0"


def test_error_carries_the_requested_version(exe: Path, sandbox: str) -> None:
    conf = netconf(None, version="0.3.1", prev_result={"ips": "nope"})
    doc = err(run_plugin(exe, "ADD", conf, netns=sandbox), 6)
    assert doc["cniVersion"] == "0.3.1"
    assert doc["msg"] == "could not parse prevResult"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("exclude_namespaces", "kube-system"),
        ("kubernetes", ["x"]),
        ("native_nftables", "yes"),
        ("plugin_log_level", "loud"),
        ("pod_namespace", 3),
        ("log_file", ["x"]),
    ],
)
def test_bad_plugin_keys_are_error_7(exe: Path, sandbox: str, key: str, value: Any) -> None:
    conf = netconf(None)
    conf[key] = value
    doc = err(run_plugin(exe, "ADD", conf, netns=sandbox), 7)
    assert key in doc["msg"]


def test_unknown_keys_are_ignored(exe: Path, kubeconfig: Path, sandbox: str) -> None:
    conf = netconf(kubeconfig, enablement_selectors=[], ambient_enabled=False, something={"a": 1})
    conf["kubernetes"]["k8s_api_root"] = "https://x"
    assert ok(run_plugin(exe, "ADD", conf, netns=sandbox)) == {"cniVersion": "1.0.0", "dns": {}}


@pytest.mark.parametrize(
    ("env", "code", "text"),
    [
        ({"CNI_NETNS": ""}, 4, "CNI_NETNS"),
        ({"CNI_CONTAINERID": ""}, 4, "CNI_CONTAINERID"),
        ({"CNI_PATH": ""}, 4, "CNI_PATH"),
        ({"CNI_IFNAME": "a-very-long-ifname"}, 4, "interface name is too long"),
        ({"CNI_CONTAINERID": "../x"}, 4, "invalid characters in containerID"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, 4, "invalid CNI_ARGS"),
        ({"CNI_ARGS": "K8S_POD_NAME=a;SOMETHING=b"}, 4, "invalid CNI_ARGS"),
        ({"CNI_COMMAND": "REFRESH"}, 4, "unknown CNI_COMMAND"),
    ],
)
def test_bad_environment(
    exe: Path, kubeconfig: Path, sandbox: str, env: dict[str, str], code: int, text: str
) -> None:
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, extra_env=env)
    assert text in err(run, code)["msg"]


def test_missing_netns_is_error_3_container_unknown(exe: Path, kubeconfig: Path, tmp_path: Path) -> None:
    # The spec's code for a container that does not exist (libcni's 8, "invalid netns", is kept
    # for a CNI_NETNS that exists but cannot be used).
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=str(tmp_path / "gone"))
    doc = err(run, 3)
    assert doc["msg"].startswith("cannot open network namespace") and doc["details"] == "No such file or directory"


def test_the_plugins_own_namespace_is_refused(exe: Path, kubeconfig: Path) -> None:
    # Rules installed there would capture the node's traffic.
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns="/proc/self/ns/net", args=k8s_args(NS, "x"))
    assert err(run, 8)["msg"] == "plugin's netns and netns from CNI_NETNS should not be the same"


def test_kubeconfig_not_configured_is_error_7(exe: Path, sandbox: str) -> None:
    run = run_plugin(exe, "ADD", netconf(None), netns=sandbox, args=k8s_args(NS, "web-0"))
    assert "kubernetes.kubeconfig is not set" in err(run, 7)["msg"]


def fast(kubeconfig: Path | str | None, **kw: Any) -> dict[str, Any]:
    """A configuration whose API deadline is short, for the failure paths."""
    kube = {"api_deadline_seconds": 1.5, "api_request_timeout_seconds": 0.5}
    return netconf(kubeconfig, kubernetes=kube, **kw)


def test_wrong_token_fails_after_the_deadline(
    exe: Path, sandbox: str, api: KubeAPIServer, pki: Pki, tmp_path: Path
) -> None:
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token="wrong")
    name = unique("wrong-token")
    api.add_pod(meshed_pod(name, NS))
    run = run_plugin(exe, "ADD", fast(kc), netns=sandbox, args=k8s_args(NS, name))
    doc = err(run, 11)
    assert doc["msg"] == f"cannot read pod {NS}/{name} from the Kubernetes API"
    assert "HTTP 401 Unauthorized" in doc["details"]
    assert "gave up after" in doc["details"]
    tries = [r for r in api.requests if r[1].endswith(f"/pods/{name}")]
    assert len(tries) > 1  # retried
    assert not any(authorized for _, _, authorized in tries)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_api_server_down_fails_after_the_deadline(exe: Path, sandbox: str, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", f"https://127.0.0.1:{_closed_port()}", ca_file=pki.ca_cert, token=TOKEN
    )
    run = run_plugin(exe, "ADD", fast(kc), netns=sandbox, args=k8s_args(NS, "web-0"))
    assert "Connection refused" in err(run, 11)["details"]


def test_unknown_server_certificate_is_refused(
    exe: Path, sandbox: str, api: KubeAPIServer, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=other.ca_cert, token=TOKEN)
    run = run_plugin(exe, "ADD", fast(kc), netns=sandbox, args=k8s_args(NS, "web-0"))
    assert "TLS verification" in err(run, 11)["details"]


def test_system_cas_do_not_trust_the_test_ca(
    exe: Path, sandbox: str, api: KubeAPIServer, tmp_path: Path
) -> None:
    kc = write_kubeconfig(tmp_path / "kc", api.url, token=TOKEN)
    run = run_plugin(exe, "ADD", fast(kc), netns=sandbox, args=k8s_args(NS, "web-0"))
    assert "TLS verification" in err(run, 11)["details"]


def test_insecure_skip_tls_verify_is_refused(
    exe: Path, sandbox: str, api: KubeAPIServer, tmp_path: Path
) -> None:
    kc = tmp_path / "kc.json"
    kc.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": api.url, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": TOKEN}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    run = run_plugin(exe, "ADD", fast(kc), netns=sandbox, args=k8s_args(NS, "web-0"))
    assert "insecure-skip-tls-verify is not supported" in err(run, 11)["details"]


def test_pod_missing_from_the_api_fails(exe: Path, kubeconfig: Path, sandbox: str) -> None:
    conf = netconf(kubeconfig, kubernetes={"api_deadline_seconds": 1})
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "never-created"))
    assert "HTTP 404" in err(run, 11)["details"]


def test_transient_api_errors_are_retried(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer
) -> None:
    name = unique("flaky")
    api.add_pod(pod_object(name, NS))  # not meshed: no istio-proxy
    api.fail_next(2)
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, args=k8s_args(NS, name))
    assert ok(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "does not have istio-proxy container" in run.stderr
    assert len([r for r in api.requests if r[1].endswith(name)]) == 3


@pytest.mark.parametrize("how", ["api-down", "no-kubeconfig"])
def test_node_daemon_pod_passes_when_the_api_cannot_be_used(
    exe: Path, sandbox: str, pki: Pki, tmp_path: Path, how: str
) -> None:
    kc: Path | None = None
    if how == "api-down":
        kc = write_kubeconfig(
            tmp_path / "kc", f"https://127.0.0.1:{_closed_port()}", ca_file=pki.ca_cert, token=TOKEN
        )
    conf = netconf(kc, pod_namespace="istio-system", exclude_namespaces=[])
    conf["kubernetes"]["exclude_namespaces"] = []
    conf["kubernetes"]["api_deadline_seconds"] = 60  # the bypass must not wait for the deadline
    start = time.monotonic()
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args("istio-system", "istio-cni-node-7xk2p"))
    assert ok(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "looks like our own istio-cni-node pod" in run.stderr
    assert time.monotonic() - start < 60


def test_node_daemon_name_in_another_namespace_is_not_let_through(
    exe: Path, sandbox: str, pki: Pki, tmp_path: Path
) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", f"https://127.0.0.1:{_closed_port()}", ca_file=pki.ca_cert, token=TOKEN
    )
    conf = fast(kc, pod_namespace="istio-system")
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "istio-cni-node-7xk2p"))
    err(run, 11)


BAD_ANNOTATIONS = [
    ("sidecar.istio.io/interceptionMode", "tproxy"),
    ("sidecar.istio.io/interceptionMode", ""),
    ("traffic.sidecar.istio.io/includeInboundPorts", "80,http"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "0"),
    ("traffic.sidecar.istio.io/includeOutboundPorts", "65536"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "*"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8 -j ACCEPT"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "eth0 -j ACCEPT"),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1,-o"),
    ("istio.io/reroute-virtual-interfaces", "a-name-far-too-long"),
    ("istio.io/reroute-virtual-interfaces", "eth0\n-A OUTPUT -j ACCEPT"),
    ("status.sidecar.istio.io/port", "15020x"),
]


@pytest.mark.parametrize(("annotation", "value"), BAD_ANNOTATIONS)
def test_bad_annotation_fails_the_add_naming_it(
    exe: Path, kubeconfig: Path, sandbox: str, api: KubeAPIServer, annotation: str, value: str
) -> None:
    name = unique("bad-annotation")
    api.add_pod(meshed_pod(name, NS, annotations={annotation: value}))
    run = run_plugin(exe, "ADD", netconf(kubeconfig), netns=sandbox, args=k8s_args(NS, name))
    doc = err(run, 999)
    assert doc["msg"] == f"pod {NS}/{name}: invalid {annotation} value {value!r}"
    assert doc["details"]
    assert "install" not in run.stderr


# --- DEL, CHECK, GC, STATUS ----------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_del_succeeds_for_anything(exe: Path, kubeconfig: Path, tmp_path: Path, version: str) -> None:
    gone = str(tmp_path / "deleted-netns")
    for netns, conf in [
        (gone, netconf(kubeconfig, version=version, prev_result=prev_result(version))),
        ("", netconf(kubeconfig, version=version)),
        (gone, netconf(None, version=version, exclude_namespaces="not-a-list")),
    ]:
        run = run_plugin(exe, "DEL", conf, netns=netns, args=k8s_args(NS, "never-seen"))
        assert run.code == 0, run.stdout
        assert run.stdout == ""


def test_del_with_unsupported_version_is_error_1(exe: Path) -> None:
    err(run_plugin(exe, "DEL", {"cniVersion": "0.2.0", "name": "n"}), 1)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_succeeds(exe: Path, kubeconfig: Path, tmp_path: Path, version: str) -> None:
    conf = netconf(kubeconfig, version=version, prev_result=prev_result(version))
    run = run_plugin(exe, "CHECK", conf, netns=str(tmp_path / "gone"), args=k8s_args(NS, "x"))
    assert (run.code, run.stdout) == (0, "")


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_0_4_0(exe: Path, kubeconfig: Path, tmp_path: Path, version: str) -> None:
    run = run_plugin(exe, "CHECK", netconf(kubeconfig, version=version), netns=str(tmp_path / "gone"))
    assert "does not allow CHECK" in err(run, 1)["msg"]


def test_gc(exe: Path, kubeconfig: Path) -> None:
    conf = netconf(kubeconfig, version="1.1.0")
    conf["cni.dev/valid-attachments"] = [{"containerID": "abc", "ifname": "eth0"}]
    run = run_plugin(exe, "GC", conf, container_id="", ifname="", netns="")
    assert (run.code, run.stdout) == (0, "")
    conf["cni.dev/valid-attachments"] = {"containerID": "abc"}
    err(run_plugin(exe, "GC", conf, container_id="", ifname=""), 6)
    err(run_plugin(exe, "GC", netconf(kubeconfig, version="1.0.0")), 1)


def test_status(exe: Path, kubeconfig: Path, tmp_path: Path) -> None:
    run = run_plugin(exe, "STATUS", netconf(kubeconfig, version="1.1.0"), container_id="", ifname="")
    assert (run.code, run.stdout) == (0, "")
    missing = netconf(tmp_path / "not-written-yet", version="1.1.0")
    assert "not usable" in err(run_plugin(exe, "STATUS", missing), 50)["msg"]
    err(run_plugin(exe, "STATUS", netconf(None, version="1.1.0")), 50)
    err(run_plugin(exe, "STATUS", netconf(kubeconfig, version="1.0.0")), 1)


# --- logging -------------------------------------------------------------------------------


def test_log_file_and_level(exe: Path, kubeconfig: Path, sandbox: str, tmp_path: Path) -> None:
    log = tmp_path / "istio-cni.log"
    conf = netconf(kubeconfig, log_file=str(log), exclude_namespaces=[NS])
    run = run_plugin(exe, "ADD", conf, netns=sandbox, args=k8s_args(NS, "web-0"))
    assert ok(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "pod namespace excluded" in run.stderr
    assert f"pod={NS}/web-0\tpod namespace excluded" in log.read_text()
    quiet = netconf(kubeconfig, plugin_log_level="error", exclude_namespaces=[NS])
    run = run_plugin(exe, "ADD", quiet, netns=sandbox, args=k8s_args(NS, "web-0"))
    assert ok(run) and run.stderr == ""
    # log_level is the older spelling; plugin_log_level wins when both are set.
    both = netconf(kubeconfig, log_level="error", plugin_log_level="info", exclude_namespaces=[NS])
    assert "excluded" in run_plugin(exe, "ADD", both, netns=sandbox, args=k8s_args(NS, "web-0")).stderr


def test_unwritable_log_file_is_a_warning(exe: Path, kubeconfig: Path, sandbox: str, tmp_path: Path) -> None:
    conf = netconf(kubeconfig, log_file=str(tmp_path / "no" / "such" / "dir.log"))
    run = run_plugin(exe, "ADD", conf, netns=sandbox)
    assert ok(run) == {"cniVersion": "1.0.0", "dns": {}}
    assert "cannot open log file" in run.stderr
