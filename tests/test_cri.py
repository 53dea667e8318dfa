"""End to end as kubelet drives it: a private containerd (Debian 12's 1.6 with its CRI plugin)
runs pods through the CRI, the way kubelet asks for them, on a node whose CNI chain is put in
place by install-cni running as the istio-cni-node DaemonSet's pod (its image, manifest,
ConfigMap and security context). Both appliers are shown to capture real traffic: the chained
plugin (meshed, unmeshed, opted-out and excluded pods, a bad annotation, the API down, stop and
remove) and the init container (the project's istio-iptables image as the pod's first
container), plus Istio's validation container in CNI mode.

What containerd passes to the plugin is what it passes on a node: ``CNI_ARGS`` with
``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``, ``K8S_POD_INFRA_CONTAINER_ID`` and ``K8S_POD_UID`` in
random order, its own netns paths (under its state dir), the chain's ``prevResult`` and
``runtimeConfig``, and DEL twice on stop + remove. Recipe and quirks:
../shared/notes/containerd-cri.md; docs/cri-tests.md describes this module."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from containerd import Containerd, plugin_types
from cri import CRIError, container_config, pb, sandbox_config
from tests.support.apiserver import KubeAPIServer
from tests.support.pki import make_pki
from tests.support.pods import meshed_pod, pod_object

pytestmark = [pytest.mark.cri, pytest.mark.kernel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "istio-cni-service-account-token"
ADMIN_TOKEN = "test-cluster-admin-token"
NS = "default"
NODE_NAME = "node-1"
BUSYBOX = Containerd.BUSYBOX_IMAGE
# The classic arguments of Istio's injector for istio-init (its image's entrypoint is
# istio-iptables here, pilot-agent's "istio-iptables" subcommand in Istio's proxy image).
INIT_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
             "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]  # fmt: skip
# Istio's istio-validation init container in CNI mode: the same, only validating.
VALIDATION_ARGS = [*INIT_ARGS, "--run-validation", "--skip-rule-apply"]
# The two containers of a meshed pod that the traffic checks use: the "proxy" (uid 1337, the
# listeners where captured connections land) and the "app" (uid 1000).
PROXY_CMD = (
    "nc -ll -p 15001 -e echo outbound-captured & nc -ll -p 15006 -e echo inbound-captured & exec sleep 3600"
)
APP_CMD = "nc -ll -p 8080 -e echo app & exec sleep 3600"
PEER_CMD = "nc -ll -p 8080 -e echo direct & exec sleep 3600"
# DaemonSet settings that differ on this test node: where containerd keeps its CNI dirs (the
# ConfigMap names /etc/cni/net.d and /opt/cni/bin) and debug logs, so that every DEL is logged.
LOG_LEVEL = "debug"
# The plugin's API deadline (seconds) in the API-down test.
DEADLINE = 5
# Istio's securityContext of istio-validation (and of the proxy): nothing beyond a plain user.
ISTIO_VALIDATION_SECURITY: dict[str, Any] = dict(
    run_as_user=1337, run_as_group=1337, drop_caps=["ALL"], readonly_rootfs=True, no_new_privs=True
)


@dataclass
class Pod:
    """A pod whose sandbox runs in containerd: the Pod object (served by the API server), its
    PodSandboxConfig as kubelet builds it, the sandbox id, and its containers by name."""

    node: Node
    obj: dict[str, Any]
    config: Any
    id: str
    containers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.obj["metadata"]["namespace"])

    @property
    def ip(self) -> str:
        return self.node.cri.pod_ip(self.id)

    @property
    def netns(self) -> str:
        return self.node.cri.netns_path(self.id)

    def rules(self) -> str:
        """iptables-save and ip6tables-save of the sandbox's network namespace, from the node."""
        out = []
        for cmd in ("iptables-save", "ip6tables-save"):
            p = _run(["nsenter", f"--net={self.netns}", cmd])
            assert p.returncode == 0, p.stderr
            out.append(p.stdout)
        return "".join(out)

    def container(self, name: str, image: str, *, attempt: int = 0, start: bool = True, **kw: Any) -> str:
        labels = {k: v for k, v in self.config.labels.items() if k.startswith("io.kubernetes.pod.")}
        cfg = container_config(name, image, attempt=attempt, pod_labels=labels, **kw)
        cid = self.node.cri.create_container(self.id, cfg, self.config)
        self.containers[name] = cid
        if start:
            self.node.cri.start_container(cid)
        return cid

    def run_to_completion(self, name: str, image: str, *, timeout: float = 60, **kw: Any) -> tuple[int, str]:
        """Runs a container as kubelet runs an init container: create, start, wait for it to
        exit; (exit code, its log)."""
        cid = self.container(name, image, **kw)
        deadline = time.monotonic() + timeout
        while (st := self.node.cri.container_status(cid)).state != pb.CONTAINER_EXITED:
            assert time.monotonic() < deadline, f"{name} still {st.state} after {timeout}s"
            time.sleep(0.05)
        return int(st.exit_code), self.log(name, int(st.metadata.attempt))

    def _log_lines(self, name: str, attempt: int) -> list[list[str]]:
        """The container's CRI log (kubelet's format: ``TIME STREAM TAG MESSAGE`` per line, TAG
        ``P`` for a partial line) as [stream, tag, message] entries."""
        path = Path(self.config.log_directory) / name / f"{attempt}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return [line.split(" ", 3)[1:] for line in lines if line.count(" ") >= 3]

    def log(self, name: str, attempt: int = 0) -> str:
        """Everything the container wrote, stdout and stderr, one message per line."""
        return "\n".join(msg for _, _, msg in self._log_lines(name, attempt))

    def output(self, name: str, attempt: int = 0) -> str:
        """The container's stdout exactly as it wrote it."""
        return "".join(msg + ("" if tag == "P" else "\n") for stream, tag, msg in self._log_lines(name, attempt)
                       if stream == "stdout")  # fmt: skip

    def sh(self, container: str, script: str) -> str:
        code, out, err = self.node.cri.exec_sync(self.containers[container], ["sh", "-c", script])
        assert code == 0, f"{container}: {script!r} exited {code}: {err}"
        return out

    def connect(self, container: str, ip: str, port: int) -> str:
        """One TCP connection from ``container`` (as its own user) to ip:port; what came back."""
        return self.sh(container, f"nc -w 3 {ip} {port} </dev/null").strip()

    def wait_listening(self, container: str, ports: Sequence[int]) -> None:
        self.sh(
            container,
            "for i in $(seq 100); do ok=1; for p in " + " ".join(map(str, ports)) + "; do "
            'netstat -ltn 2>/dev/null | grep -q ":$p " || ok=0; done; [ $ok = 1 ] && exit 0; sleep 0.05; done; exit 1',
        )

    def stop_and_remove(self) -> None:
        self.node.cri.stop_pod_sandbox(self.id)
        self.node.cri.remove_pod_sandbox(self.id)


@dataclass
class Node:
    """The test node: containerd, the Kubernetes API, install-cni as the DaemonSet's pod."""

    work: Path
    containerd: Containerd
    api: KubeAPIServer
    images: dict[str, str]
    installer: Pod | None = None
    installer_attempts: int = 0
    original_conflist: bytes = b""

    @property
    def cri(self) -> Any:
        return self.containerd.client

    def run_pod(self, obj: Mapping[str, Any], *, runtime_handler: str = "", serve: bool = True) -> Pod:
        """RunPodSandbox for a Pod object as kubelet does: name, namespace and uid from its
        metadata, its labels and annotations, a log directory; the API serves the object first."""
        obj = dict(obj)
        if serve:
            self.api.add_pod(obj)
        config = self.sandbox_config(obj)
        sid = self.cri.run_pod_sandbox(config, runtime_handler=runtime_handler)
        return Pod(self, obj, config, sid)

    def sandbox_config(self, obj: Mapping[str, Any]) -> Any:
        meta = obj["metadata"]
        logs = self.work / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        logs.mkdir(parents=True, exist_ok=True)
        return sandbox_config(
            meta["name"],
            meta["namespace"],
            meta["uid"],
            labels=meta.get("labels") or {},
            annotations=meta.get("annotations") or {},
            log_directory=str(logs),
            cgroup_parent=self.containerd.cgroup_parent,
        )

    def plugin_log(self) -> str:
        """istio-cni's log lines: its stderr, which containerd passes on to its own log."""
        return "\n".join(line for line in self.containerd.log_text().splitlines() if "\tistio-cni\t" in line)

    # --- install-cni as the DaemonSet runs it ------------------------------------------------

    def start_installer(self, configmap: Mapping[str, str] | None = None) -> None:
        """The istio-cni-node pod of deploy/kubernetes: the DaemonSet's pod template and the
        ConfigMap (plus ``configmap``'s settings), on the pod network (the manifest does not ask
        for the host's), its hostPath volumes pointed at containerd's CNI dirs; ready when
        kubelet's readiness probe would say so (GET /readyz on the pod IP) and containerd has
        loaded the chain with istio-cni. Again: a new container in the same pod, as a restart."""
        ds = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
        cm = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
        tmpl = ds["spec"]["template"]
        spec = tmpl["spec"]
        assert not spec.get("hostNetwork"), "the installer now asks for the host network: update this test"
        (c,) = spec["containers"]
        if self.installer is None:
            self.original_conflist = self.containerd.network.conflist_path.read_bytes()
            obj = {
                "metadata": {
                    "name": f"istio-cni-node-{secrets.token_hex(3)[:5]}",
                    "namespace": ds["metadata"]["namespace"],
                    "uid": str(uuid.uuid4()),
                    "labels": tmpl["metadata"]["labels"],
                    "annotations": tmpl["metadata"]["annotations"],
                }
            }
            # Served too (as a pod without a sidecar): what the plugin sees when it is chained
            # while the installer's sandbox is recreated.
            self.api.add_pod(pod_object(obj["metadata"]["name"], obj["metadata"]["namespace"],
                                        containers=(c["name"],), labels=tmpl["metadata"]["labels"]))  # fmt: skip
            self.installer = self.run_pod(obj, serve=False)
        pod = self.installer
        env: dict[str, str] = {}
        for source in c.get("envFrom", []):
            assert source["configMapRef"]["name"] == cm["metadata"]["name"]
            env.update({k: str(v) for k, v in cm["data"].items()})
        env.update(configmap or {})
        fields = {"metadata.namespace": pod.namespace, "spec.nodeName": NODE_NAME}
        for e in c.get("env", []):
            env[e["name"]] = (
                str(e["value"]) if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            )
        # Kubelet's service variables: where the node's processes (the plugin) and the pods (the
        # installer's agent) reach the API: the pod network's gateway, a host address.
        env.update(KUBERNETES_SERVICE_HOST=self.api.host, KUBERNETES_SERVICE_PORT=str(self.api.port))
        agent_run = self.work / "agent-run"
        agent_run.mkdir(exist_ok=True)
        env.update(CNI_NET_DIR=str(self.containerd.conf_dir), CNI_BIN_DIR=str(self.containerd.bin_dir),
                   CNI_AGENT_RUN_DIR=str(agent_run), LOG_LEVEL=LOG_LEVEL)  # fmt: skip
        sa = self.work / "serviceaccount"
        sa.mkdir(exist_ok=True)
        (sa / "token").write_text(TOKEN)
        (sa / "ca.crt").write_bytes(self.api.pki.ca_cert.read_bytes())
        (sa / "namespace").write_text(pod.namespace)
        netns_dir = self.containerd.state / "io.containerd.grpc.v1.cri" / "netns"
        netns_dir.mkdir(parents=True, exist_ok=True)
        volumes = {
            "cni-bin-dir": str(self.containerd.bin_dir),
            "cni-net-dir": str(self.containerd.conf_dir),
            "tmp": str(self.work / "installer-tmp"),
            # The agent's: the node's /proc, where containerd pins pod namespaces (here under its
            # state dir), and the plugin's statistics socket's directory.
            "cni-host-procfs": "/proc",
            "cni-netns-dir": str(netns_dir),
            "cni-socket-dir": str(agent_run),
        }
        Path(volumes["tmp"]).mkdir(exist_ok=True)
        for v in spec["volumes"]:
            assert v["name"] in volumes, f"a new volume in the DaemonSet: {v}"
        mounts = [(volumes[m["name"]], m["mountPath"], bool(m.get("readOnly"))) for m in c["volumeMounts"]]
        mounts.append((str(sa), "/var/run/secrets/kubernetes.io/serviceaccount", True))
        sc = c["securityContext"]
        assert not sc.get("privileged")
        pod.container(
            c["name"],
            self.images["install"],
            attempt=self.installer_attempts,
            env=env,
            mounts=mounts,
            run_as_user=sc["runAsUser"],
            run_as_group=sc["runAsGroup"],
            add_caps=sc["capabilities"].get("add", []),
            drop_caps=sc["capabilities"].get("drop", []),
            readonly_rootfs=sc["readOnlyRootFilesystem"],
            no_new_privs=not sc["allowPrivilegeEscalation"],
            seccomp_runtime_default=sc["seccompProfile"]["type"] == "RuntimeDefault",
        )
        self.installer_attempts += 1
        port = next(
            p["containerPort"] for p in c["ports"] if p["name"] == c["readinessProbe"]["httpGet"]["port"]
        )
        url = f"http://{pod.ip}:{port}{c['readinessProbe']['httpGet']['path']}"
        deadline = time.monotonic() + 60
        while _http_status(url) != 200:
            assert time.monotonic() < deadline, (
                f"install-cni not ready:\n{pod.log(c['name'], self.installer_attempts - 1)}"
            )
            time.sleep(0.1)
        self.containerd.wait_cni_config(lambda types: "istio-cni" in types)

    def stop_installer(self) -> None:
        """SIGTERM to install-cni (StopContainer, as on a rollout): it takes its entry out; waits
        until containerd has loaded the chain without istio-cni."""
        assert self.installer is not None
        self.cri.stop_container(self.installer.containers["install-cni"], timeout=10)
        self.containerd.wait_cni_config(lambda types: "istio-cni" not in types)


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


@contextlib.contextmanager
def running_node(
    project_images: dict[str, str], work: Path, prepare: Callable[[Node], None] | None = None
) -> Iterator[Node]:
    """A containerd, the API stand-in and install-cni running as the DaemonSet's pod; ``prepare``
    sees the node before install-cni starts. Everything is stopped and checked afterwards."""
    # A short root: the CNI bin dir is in the self-contained plugin's shebang (pytest's own
    # temporary paths are too long for it); containerd.stop() removes it.
    ctd = Containerd(Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")))
    api: KubeAPIServer | None = None
    try:
        ctd.start()
        api = start_api(work, ctd)
        n = Node(work, ctd, api, project_images)
        if prepare is not None:
            prepare(n)
        ctd.import_busybox_images()
        ctd.import_podman_images([project_images["install"], project_images["init"]])
        n.start_installer()
        yield n
    finally:
        problems = ctd.stop()
        if api is not None:
            api.stop()
        assert not problems, problems


@pytest.fixture(scope="module")
def node(project_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(project_images, tmp_path_factory.mktemp("cri")) as n:
        yield n


# The verbs of deploy/kubernetes/clusterrole.yaml: the service account's token may do only these.
def granted(*roles: Path) -> list[str]:
    verbs = []
    for path in (ROOT / "deploy" / "kubernetes" / "clusterrole.yaml", *roles):
        for rule in yaml.safe_load(path.read_text())["rules"]:
            verbs += [f"{v} {r}" for r in rule["resources"] for v in rule["verbs"]]
    return verbs


def start_api(work: Path, ctd: Containerd) -> KubeAPIServer:
    """The API on the pod network's gateway (bound before the bridge exists), with this node
    (untainted) and the service account's token granted what the manifests' RBAC grants."""
    gateway = f"{ctd.network.subnet}.1"
    api = KubeAPIServer(make_pki(work / "pki", server_ips=[gateway]), ADMIN_TOKEN, host=gateway).start()
    api.grant(TOKEN, *granted())
    api.add_node(NODE_NAME)
    return api


def plugin_requests(api: KubeAPIServer, since: int = 0) -> list[str]:
    """The paths the plugin asked for (the installer's agent identifies itself as install-cni)."""
    return [c.path for c in api.calls[since:] if c.user_agent != "install-cni"]


def start_peer(node: Node) -> Pod:
    """An unmeshed pod on the node that answers "direct" on port 8080."""
    pod = node.run_pod(pod_object(f"peer-{secrets.token_hex(3)}", NS, containers=("peer",)))
    pod.container("peer", BUSYBOX, command=["sh", "-c", PEER_CMD], run_as_user=1000)
    pod.wait_listening("peer", [8080])
    return pod


@pytest.fixture(scope="module")
def peer(node: Node) -> Pod:
    return start_peer(node)


def start_sidecar_and_app(pod: Pod) -> None:
    pod.container(
        "istio-proxy", BUSYBOX, command=["sh", "-c", PROXY_CMD], run_as_user=1337, run_as_group=1337
    )
    pod.container("app", BUSYBOX, command=["sh", "-c", APP_CMD], run_as_user=1000, run_as_group=1000)
    pod.wait_listening("app", [15001, 15006, 8080])


def assert_traffic_captured(pod: Pod, peer: Pod) -> None:
    """Real connections: the app's outbound one lands on the proxy's 15001, the proxy's own
    (uid 1337) reaches the peer untouched, inbound to the app's port lands on 15006."""
    assert pod.connect("app", peer.ip, 8080) == "outbound-captured"
    assert pod.connect("istio-proxy", peer.ip, 8080) == "direct"
    assert peer.connect("peer", pod.ip, 8080) == "inbound-captured"


def sandbox_names(node: Node) -> set[str]:
    return {sb.metadata.name for sb in node.cri.list_pod_sandbox()}


def netns_files(node: Node) -> set[str]:
    d = node.containerd.state / "io.containerd.grpc.v1.cri" / "netns"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


# --- install-cni and the node ------------------------------------------------------------------


def test_install_cni_pod_chains_the_plugin_into_containerds_network(node: Node) -> None:
    net = node.containerd.network
    installed = json.loads(net.conflist_path.read_bytes())
    original = json.loads(node.original_conflist)
    assert [p["type"] for p in installed["plugins"]] == ["bridge", "portmap", "istio-cni"]
    assert installed["plugins"][:2] == original["plugins"]
    entry = installed["plugins"][2]
    assert entry["kubernetes"]["kubeconfig"] == str(node.containerd.conf_dir / "ZZZ-istio-cni-kubeconfig")
    assert entry["kubernetes"]["exclude_namespaces"] == ["istio-system", "kube-system"]
    assert (node.containerd.bin_dir / "istio-cni").stat().st_mode & 0o111
    # containerd loaded it (loopback is its own, first).
    assert plugin_types(node.cri.cni_config()) == ["loopback", "bridge", "portmap", "istio-cni"]
    assert node.cri.version().runtime_api_version == "v1"


# --- the CNI path ------------------------------------------------------------------------------


def test_meshed_pod_gets_the_rules_in_its_sandbox_and_its_traffic_is_captured(node: Node, peer: Pod) -> None:
    pod = node.run_pod(meshed_pod(f"productpage-{secrets.token_hex(3)}", NS))
    rules = pod.rules()
    assert "-A OUTPUT -j ISTIO_OUTPUT" in rules and "-A PREROUTING -p tcp -j ISTIO_INBOUND" in rules
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    log = node.plugin_log()
    assert f"pod={NS}/{pod.name}\tinstalled REDIRECT capture rules (IPv4) in {pod.netns}" in log
    # The plugin read the Pod with the kubeconfig install-cni wrote (the service account token).
    assert ("GET", f"/api/v1/namespaces/{NS}/pods/{pod.name}", True) in node.api.requests

    # Istio's istio-validation init container, as the injector adds it in CNI mode: no
    # capabilities, uid 1337, read-only root. The plugin's rules pass it.
    code, out = pod.run_to_completion("istio-validation", node.images["init"], args=VALIDATION_ARGS,
                                      **ISTIO_VALIDATION_SECURITY)  # fmt: skip
    assert code == 0, out
    assert "validation passed: 127.0.0.6:15002 was redirected to 127.0.0.1:15006" in out

    start_sidecar_and_app(pod)
    assert_traffic_captured(pod, peer)


@pytest.mark.parametrize(
    "kind",
    ["unmeshed", "opted-out", "excluded-namespace"],
)
def test_pods_that_are_not_meshed_get_no_rules(node: Node, peer: Pod, kind: str) -> None:
    name = f"{kind}-{secrets.token_hex(3)}"
    if kind == "unmeshed":
        obj, reason = (
            pod_object(name, NS, containers=("app",)),
            "excluded because it does not have istio-proxy container",
        )
    elif kind == "opted-out":
        obj = meshed_pod(name, NS, labels={"sidecar.istio.io/inject": "false"})
        reason = "excluded due to inject-disabled annotation"
    else:
        obj, reason = meshed_pod(name, "kube-system"), "pod namespace excluded"
    before = len(node.api.calls)
    pod = node.run_pod(obj)
    assert "ISTIO" not in pod.rules()
    assert f"pod={obj['metadata']['namespace']}/{name}\t{reason}" in node.plugin_log()
    asked = plugin_requests(node.api, before)
    assert asked == ([] if kind == "excluded-namespace" else [f"/api/v1/namespaces/{NS}/pods/{name}"])
    # Its traffic goes where it was sent.
    pod.container("app", BUSYBOX, command=["sh", "-c", "exec sleep 3600"], run_as_user=1000)
    assert pod.connect("app", peer.ip, 8080) == "direct"
    pod.stop_and_remove()


def test_bad_annotation_fails_the_sandbox_with_our_message_and_leaves_nothing(node: Node) -> None:
    net = node.containerd.network
    before = (netns_files(node), net.host_veths(), net.leases(), net.cache_entries())
    name = f"reviews-{secrets.token_hex(3)}"
    obj = meshed_pod(name, NS, annotations={"traffic.sidecar.istio.io/excludeInboundPorts": "15020,70000"})
    with pytest.raises(CRIError) as failed:
        node.run_pod(obj)
    msg = failed.value.details
    assert 'plugin type="istio-cni" failed (add):' in msg, msg
    assert (
        f"pod {NS}/{name}: invalid traffic.sidecar.istio.io/excludeInboundPorts value '15020,70000'" in msg
    ), msg
    sandbox = re.search(r'failed to setup network for sandbox "([0-9a-f]{64})"', msg)
    assert sandbox, msg
    # Nothing is left: no sandbox, namespace, veth, address lease or libcni cache entry.
    assert name not in sandbox_names(node)
    assert (netns_files(node), net.host_veths(), net.leases(), net.cache_entries()) == before
    assert not any(sandbox.group(1) in p.name for p in net.cache_entries())


def test_api_down_fails_the_sandbox_within_the_deadline(node: Node) -> None:
    """Fail closed: with the API unreachable, RunPodSandbox fails once the plugin's API deadline
    has passed, and no sandbox is left. The deadline (30 s unless configured) is set to 5 s the
    way Istio's chart configures the plugin: the ConfigMap's CNI_NETWORK_CONFIG, here the entry
    install-cni wrote by default plus the two API keys."""
    entry = json.loads(node.containerd.network.conflist_path.read_bytes())["plugins"][-1]
    assert entry["type"] == "istio-cni" and "api_deadline_seconds" not in entry["kubernetes"]
    entry["kubernetes"].update(api_deadline_seconds=DEADLINE, api_request_timeout_seconds=1)
    node.stop_installer()
    node.start_installer({"CNI_NETWORK_CONFIG": json.dumps(entry)})
    try:
        written = json.loads(node.containerd.network.conflist_path.read_bytes())["plugins"][-1]
        assert written == entry
        name = f"ratings-{secrets.token_hex(3)}"
        obj = meshed_pod(name, NS)
        node.api.add_pod(obj)
        with node.api.down():
            t0 = time.monotonic()
            with pytest.raises(CRIError) as failed:
                node.run_pod(obj, serve=False)
            elapsed = time.monotonic() - t0
    finally:
        node.stop_installer()
        node.start_installer()
    msg = failed.value.details
    assert f"cannot read pod {NS}/{name} from the Kubernetes API" in msg and "gave up after" in msg, msg
    assert DEADLINE - 1 < elapsed < DEADLINE + 30, elapsed
    assert name not in sandbox_names(node)


def test_stop_and_remove_both_dels_succeed_and_the_namespace_goes(node: Node, peer: Pod) -> None:
    net = node.containerd.network
    pod = node.run_pod(meshed_pod(f"details-{secrets.token_hex(3)}", NS))
    netns, cache = pod.netns, [p for p in net.cache_entries() if pod.id in p.name]
    assert Path(netns).exists() and cache
    node.cri.stop_pod_sandbox(pod.id)  # DEL with the netns and the cached prevResult
    assert not Path(netns).exists()
    node.cri.remove_pod_sandbox(pod.id)  # DEL again: CNI_NETNS empty, no prevResult
    dels = [line for line in node.plugin_log().splitlines() if f"\tDEL {pod.id}: nothing to release" in line]
    assert len(dels) == 2, node.plugin_log()[-3000:]
    assert pod.name not in sandbox_names(node)
    assert not any(pod.id in p.name for p in net.cache_entries())
    assert not any(pod.id in n for n in netns_files(node))


# --- the init-container path -------------------------------------------------------------------


def test_init_container_installs_the_rules_and_captures_traffic(node: Node, peer: Pod) -> None:
    """A pod injected without the CNI: istio-init is its first container, the project's
    istio-iptables image with the injector's arguments, NET_ADMIN and NET_RAW, as root. The
    chained plugin leaves such a pod alone."""
    name = f"reviews-v2-{secrets.token_hex(3)}"
    obj = pod_object(name, NS, annotations={"sidecar.istio.io/status": '{"initContainers":["istio-init"],"containers":["istio-proxy"]}'},
                     init_containers=("istio-init",), containers=("app", "istio-proxy"),
                     proxy_args=("proxy", "sidecar"), proxy_security_context={"runAsUser": 1337, "runAsGroup": 1337})  # fmt: skip
    pod = node.run_pod(obj)
    assert "ISTIO" not in pod.rules()
    assert (
        f"pod={NS}/{name}\texcluded due to being already injected with istio-init container, passing through"
        in node.plugin_log()
    )
    code, out = pod.run_to_completion(
        "istio-init", node.images["init"], args=INIT_ARGS, run_as_user=0, run_as_group=0,
        add_caps=["NET_ADMIN", "NET_RAW"], drop_caps=["ALL"], no_new_privs=True,
    )  # fmt: skip
    assert code == 0, out
    assert "iptables rules are in place" in out
    nat = _run(["nsenter", f"--net={pod.netns}", "iptables-nft-save", "-t", "nat"]).stdout
    assert "-A OUTPUT -j ISTIO_OUTPUT" in nat and "--to-ports 15001" in nat
    assert nat.count("\n-A ") == 18, nat
    start_sidecar_and_app(pod)
    assert_traffic_captured(pod, peer)


def test_init_image_dry_run_is_this_trees(node: Node, venv_bin: Path) -> None:
    """The image prints exactly what this working tree prints for the injector's arguments."""
    pod = node.run_pod(pod_object(f"dryrun-{secrets.token_hex(3)}", NS, init_containers=("istio-init",)))
    code, log = pod.run_to_completion("istio-init", node.images["init"], args=[*INIT_ARGS, "--dry-run"],
                                      run_as_user=0, drop_caps=["ALL"], no_new_privs=True)  # fmt: skip
    assert code == 0, log
    local = _run([str(venv_bin / "istio-iptables"), *INIT_ARGS, "--dry-run"])
    assert local.returncode == 0, local.stderr
    assert pod.output("istio-init") == local.stdout
    assert "# ip6tables-restore" not in local.stdout  # the pod has one address, IPv4
    assert "ISTIO" not in pod.rules()
    pod.stop_and_remove()


def test_init_container_without_net_admin_fails_and_changes_nothing(node: Node) -> None:
    pod = node.run_pod(pod_object(f"noadmin-{secrets.token_hex(3)}", NS, init_containers=("istio-init",)))
    code, out = pod.run_to_completion("istio-init", node.images["init"], args=INIT_ARGS, run_as_user=0,
                                      drop_caps=["ALL"], no_new_privs=True)  # fmt: skip
    assert code == 1 and ("Permission denied" in out or "not permitted" in out), out
    assert "ISTIO" not in pod.rules()
    pod.stop_and_remove()


# --- a pod that started before the plugin was chained --------------------------------------------


def test_validation_fails_in_a_pod_created_while_the_plugin_was_not_chained(node: Node) -> None:
    """install-cni stopped (a rollout): the entry goes and the primary plugin's file is back byte
    for byte; a meshed pod started then has no rules, and Istio's validation container in it
    exits 126 even after install-cni is back, while a pod started after that passes."""
    node.stop_installer()
    try:
        assert node.installer is not None
        assert node.cri.container_status(node.installer.containers["install-cni"]).exit_code == 0
        assert node.containerd.network.conflist_path.read_bytes() == node.original_conflist
        before = len(node.api.calls)
        early = node.run_pod(meshed_pod(f"early-{secrets.token_hex(3)}", NS))
        assert "ISTIO" not in early.rules()
        assert plugin_requests(node.api, before) == [], "no plugin in the chain, no API request"
    finally:
        node.start_installer()
    code, out = early.run_to_completion("istio-validation", node.images["init"],
                                        args=VALIDATION_ARGS, **ISTIO_VALIDATION_SECURITY)  # fmt: skip
    assert code == 126, out
    assert "iptables validation failed; workload is not ready for Istio" in out
    later = node.run_pod(meshed_pod(f"later-{secrets.token_hex(3)}", NS))
    code, out = later.run_to_completion("istio-validation", node.images["init"], args=VALIDATION_ARGS,
                                        **ISTIO_VALIDATION_SECURITY)  # fmt: skip
    assert code == 0, out
